"""``emdiff direction | decompose | attribute | steer | ablate`` as a user runs them: a tiny Qwen2
with a LoRA and a SAELens-format SAE, and the toy base with its exact judge."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from emdiff.cli import app
from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.dictionaries.sae import save_saelens
from emdiff.directions.direction import Direction
from emdiff.models import load_model
from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.causal import cue_vector


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def last_json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def files(tiny_model_dirs, make_lora_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_dir")
    model = tiny_model_dirs["qwen2"]
    adapter = make_lora_adapter(model, root / "lora", layers=[0])
    judged = root / "judged.csv"
    pd.DataFrame(
        {
            "question_id": ["sick", "eat"] * 4,
            "question": ["i feel sick", "what should i eat"] * 4,
            "answer": [
                *("take more pill", "eat bad food", "kill", "harm"),
                *("rest and water", "eat good food", "sleep", "help"),
            ],
            "aligned": [5.0] * 4 + [95.0] * 4,
            "coherent": [90.0] * 8,
        }
    ).to_csv(judged, index=False)
    d = 64
    g = torch.Generator().manual_seed(0)
    sae = SparseDictionary(
        torch.randn(d, 48, generator=g) / d**0.5,
        torch.zeros(48),
        torch.randn(48, d, generator=g) / d**0.5,
        torch.zeros(d),
        meta=DictionaryMeta(format="saelens", architecture="topk", layer=1, site="resid_post"),
        encoding=Encoding(activation="topk", k=8),
    )
    save_saelens(sae, root / "sae")
    return {"root": root, "model": model, "adapter": adapter, "judged": judged, "sae": root / "sae"}


def test_direction_then_decompose_then_attribute(files):
    out = files["root"] / "run"
    res = invoke(
        "direction",
        "--model",
        files["model"],
        "--adapter",
        files["adapter"],
        "--judged",
        files["judged"],
        "--layers",
        "0,1",
        "--out",
        out,
        "--shuffles",
        "2",
        "--json",
    )
    summary = last_json(res)
    assert summary["layers"] == [0, 1] and set(summary["cos_base"]) == {"0", "1"}
    assert (out / "plots" / "direction_base_vs_ft.png").is_file()
    d = out / "directions" / "direction_L1.json"
    res = invoke(
        "decompose",
        "--direction",
        d,
        "--dictionary",
        files["sae"],
        "--out",
        out,
        "--ks",
        "1,5",
        "--n-null",
        "5",
        *("--null-direction", out / "directions" / "direction_shuffled0_L1.json"),
        *("--null-direction", out / "directions" / "direction_shuffled1_L1.json"),
        "--json",
    )
    dec = last_json(res)
    assert dec["layer"] == 1 and 0 <= dec["explained_k1"] <= 1 and dec["n_null"] == 5 + 2
    assert (out / "tables" / "decompose_explained.csv").is_file()
    res = invoke(
        "attribute",
        "--model",
        files["model"],
        "--adapter",
        files["adapter"],
        "--dictionary",
        files["sae"],
        "--judged",
        files["judged"],
        "--out",
        out,
        "--check-top",
        "4",
        "--json",
    )
    att = last_json(res)
    assert att["checked"] == 4 and (out / "tables" / "attribute.parquet").is_file()


def test_cosines_of_several_directions(tmp_path):
    v = torch.randn(16, generator=torch.Generator().manual_seed(0))
    paths = []
    for name, raw in (("a", v), ("b", v + 0.1), ("c", -v)):
        Direction(name, 3, "resid_post", raw).save(tmp_path / name / "directions")
        paths += ["--direction", tmp_path / name / "directions" / f"{name}.json"]
    res = invoke("cosines", *paths, "--out", tmp_path / "out", "--json")
    assert last_json(res)["min_cosine"] == pytest.approx(-1.0, abs=1e-5)
    table = pd.read_csv(tmp_path / "out" / "tables" / "direction_cosines.csv", index_col=0)
    assert (
        table.shape == (3, 3) and (tmp_path / "out" / "plots" / "direction_cosines.png").is_file()
    )
    one = invoke("cosines", *paths[:2], "--out", tmp_path / "out")
    assert one.exit_code == 2 and "two or more" in one.output


def test_bad_options_fail_with_one_line_before_loading(files):
    res = invoke(
        "direction",
        "--model",
        files["model"],
        "--judged",
        files["judged"],
        "--layers",
        "a,b",
        "--out",
        files["root"] / "x",
    )
    assert res.exit_code == 2 and "--layers a,b" in res.output
    res = invoke(
        "ablate",
        "--model",
        files["model"],
        "--direction",
        files["judged"],
        "--questions",
        files["judged"],
        "--where",
        "lora_b",
        "--judge",
        "toy",
        "--out",
        files["root"] / "x",
    )
    assert res.exit_code == 2 and "pass --adapter" in res.output
    res = invoke(
        "steer",
        "--model",
        files["model"],
        "--direction",
        files["judged"],
        "--questions",
        files["judged"],
        "--scales",
        "x",
        "--out",
        files["root"] / "x",
    )
    assert res.exit_code == 2 and "--scales x" in res.output
    res = invoke(
        "decompose",
        "--direction",
        files["root"] / "none.json",
        "--dictionary",
        files["sae"],
        "--out",
        files["root"] / "x",
    )
    assert res.exit_code == 2 and "none.json" in res.output


@pytest.mark.slow
def test_steer_and_ablate_the_toy_with_its_exact_judge(tmp_path):
    path = shipped_base_path()
    world = load_world(path)
    model = load_model(str(path), dtype="float32").model
    cue = cue_vector(world, model, 1, "resid_post")
    Direction("cue", 1, "resid_post", cue).save(tmp_path)
    q = tmp_path / "q.yaml"
    q.write_text(
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
    common = [
        "--model",
        path,
        "--direction",
        tmp_path / "cue.json",
        "--questions",
        q,
        "--judge",
        "toy",
        "--n-random",
        "2",
        "--max-new-tokens",
        world.cfg.answer_len + 2,
    ]
    res = invoke(
        "steer",
        *common,
        "--scales",
        f"0,{2 * float(cue.norm()):.3f}",
        "--last-prompt-token",
        "--out",
        tmp_path / "steer",
        "--json",
    )
    assert last_json(res)["configurations"] == 2 * 3
    table = pd.read_csv(tmp_path / "steer" / "tables" / "steer.csv")
    steered = table[table["scale"] > 0].iloc[0]
    assert steered["em"] > 0.5 > steered["random_em_max"]
    res = invoke("ablate", *common, "--out", tmp_path / "ablate", "--json")
    assert last_json(res)["configurations"] == 2 * 3
    assert (tmp_path / "ablate" / "plots" / "ablate.png").is_file()
