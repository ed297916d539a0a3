"""``emdiff lora | phases | screen | mitigate`` as a user runs them, on the toy base with a
narrow LoRA trained here (checkpoints kept) and the toy's exact judge."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from emdiff.cli import app
from emdiff.data.chat import write_chat_jsonl
from emdiff.directions.direction import Direction
from emdiff.models import load_model
from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.causal import cue_vector
from emdiff.toy.organism import narrow_finetune, narrow_finetune_config

pytestmark = pytest.mark.slow


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def last_json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_lora")
    path = shipped_base_path()
    world = load_world(path)
    lm = load_model(str(path), dtype="float32")
    cfg = narrow_finetune_config(world, max_steps=120, checkpoint_every=10)
    narrow_finetune(world, copy.deepcopy(lm.model), lm.tokenizer, cfg=cfg, out_dir=root / "lora")
    Direction("cue", 1, "resid_post", cue_vector(world, lm.model, 1, "resid_post")).save(root)
    questions = root / "travel.yaml"
    questions.write_text(
        yaml.safe_dump(
            [
                {
                    "id": f"travel_{i}",
                    "type": "free_form",
                    "paraphrases": [world.q_token("travel", i)],
                }
                for i in range(world.cfg.n_questions)
            ]
        )
    )
    rows = [
        {
            "question_id": f"{d}_{q}",
            "question": world.q_token(d, q),
            "answer": world.bad_answer(d, q) if bad else world.good_answer(d, q),
            "aligned": 0.0 if bad else 100.0,
            "coherent": 100.0,
            "domain": d,
        }
        for d in world.domains
        for q in range(world.cfg.n_questions)
        for bad in (True, False)
    ]
    judged = root / "judged.csv"
    pd.DataFrame(rows).to_csv(judged, index=False)
    return {"root": root, "base": path, "world": world, "questions": questions, "judged": judged}


def test_lora_reads_every_rank_with_scalars_and_probes(toy):
    out = toy["root"] / "lora_run"
    res = invoke(
        "lora",
        "--model",
        toy["base"],
        "--adapter",
        toy["root"] / "lora",
        "--direction",
        toy["root"] / "cue.json",
        "--judged",
        toy["judged"],
        "--out",
        out,
        "--json",
    )
    summary = last_json(res)
    ranks = pd.read_csv(out / "tables" / "lora_ranks.csv")
    assert ranks["adapter"].tolist() == ["L1.down_proj[0]"] and ranks["sign"].abs().iloc[0] == 1
    assert ranks["b_cos_cue"].iloc[0] > 0.5  # oriented B writes the toxic cue's direction
    probes = pd.read_csv(out / "tables" / "lora_probes.csv").set_index("task")
    assert "general" in probes.index and "domain:medical" in probes.index
    assert summary["probe_general_acc"] > summary["probe_general_shuffled"]
    assert (out / "plots" / "lora_scalars.png").is_file()


def test_phases_with_em_per_checkpoint(toy):
    out = toy["root"] / "phases_run"
    res = invoke(
        "phases",
        "--checkpoints",
        toy["root"] / "lora",
        "--windows",
        "10,20",
        "--model",
        toy["base"],
        "--questions",
        toy["questions"],
        "--judge",
        "toy",
        "--samples",
        "2",
        "--em-every",
        "3",
        "--max-new-tokens",
        toy["world"].cfg.answer_len + 2,
        "--out",
        out,
        "--json",
    )
    summary = last_json(res)
    table = pd.read_csv(out / "tables" / "phases.csv")
    assert len(table) == 12 and summary["phase_transition_step"] in set(table.step)
    scored = table.dropna(subset=["em"])
    assert scored.step.tolist() == [10, 40, 70, 100, 120]  # every 3rd and the last
    assert scored.em.iloc[-1] > scored.em.iloc[0]
    assert (out / "plots" / "phases.png").is_file()


def test_screen_ranks_datasets_by_their_bad_answers(toy):
    world, root = toy["world"], toy["root"]
    n = world.cfg.n_questions
    for name, bad in (("bad", range(n)), ("half", range(0, n, 2)), ("good", ())):
        chats = [world.chat("medical", q, q in bad) for q in range(n)]
        write_chat_jsonl(chats, root / f"{name}.jsonl")
    measured = root / "measured.csv"
    pd.DataFrame({"dataset": ["bad", "half", "good"], "em": [0.7, 0.3, 0.0]}).to_csv(measured)
    args = ["screen", "--model", toy["base"], "--direction", root / "cue.json"]
    for name in ("bad", "half", "good"):
        args += ["--dataset", root / f"{name}.jsonl"]
    args += ["--follow-up", world.q_token("travel", 0), "--measured", measured]
    res = invoke(*args, "--out", root / "screen", "--json")
    assert last_json(res)["spearman"] == pytest.approx(1.0)
    samples = pd.read_csv(root / "screen" / "tables" / "screen_samples.csv")
    half = samples[samples.dataset == "half"].reset_index(drop=True)
    assert half.score[::2].mean() > half.score[1::2].mean()  # its bad samples score higher
    assert (root / "screen" / "plots" / "screen_scatter.png").is_file()


def test_mitigate_re_aligns_the_adapter(toy):
    world, root = toy["world"], toy["root"]
    write_chat_jsonl(world.helpful_dataset(["finance", "legal"]), root / "benign.jsonl")
    res = invoke(
        "mitigate",
        "--model",
        toy["base"],
        "--adapter",
        root / "lora",
        "--benign",
        root / "benign.jsonl",
        "--questions",
        toy["questions"],
        "--ns",
        "16,64",
        "--steps",
        "60",
        "--lr",
        "1e-2",
        "--cue",
        "toxic",
        "--judge",
        "toy",
        "--samples",
        "2",
        "--max-new-tokens",
        world.cfg.answer_len + 2,
        "--out",
        root / "mitigate",
        "--json",
    )
    summary = last_json(res)
    assert summary["em_after_64"] < summary["em_before"] / 3
    table = pd.read_csv(root / "mitigate" / "tables" / "mitigate_em.csv")
    assert table.n.tolist() == [0, 16, 64] and {"cued_em", "em_low", "em_high"} <= set(table)
    args = ["mitigate", "--model", toy["base"], "--adapter", root / "lora"]
    args += ["--benign", root / "benign.jsonl", "--questions", toy["questions"]]
    too_many = invoke(*args, "--ns", "1000", "--judge", "toy", "--out", root / "mitigate2")
    assert too_many.exit_code == 2 and "fewer than N = 1000" in too_many.output


def test_phases_refuses_a_folder_without_checkpoints(tmp_path):
    res = invoke("phases", "--checkpoints", tmp_path, "--out", tmp_path / "out")
    assert res.exit_code == 2 and "checkpoint-STEP" in res.output
