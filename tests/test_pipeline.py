"""``emdiff run PIPELINE.yaml`` on the toy base: fine-tune, sample and judge, five analyses, one
run folder and its report; ``--resume`` reuses what is unchanged and recomputes only a changed
analysis (and the earlier result it reads); config errors name the file, line and key."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from emdiff.cli import app
from emdiff.data.chat import write_chat_jsonl
from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.dictionaries.sae import save_saelens
from emdiff.pipeline import PipelineConfigError, load_pipeline
from emdiff.pipeline.inputs import fingerprint, resolve_release
from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.config import NARROW_LAYER
from emdiff.toy.organism import narrow_finetune_config


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pipeline_yaml(world, decompose_k: int = 5, overlap_k: int = 5) -> dict:
    ft = narrow_finetune_config(world, max_steps=40).model_dump(mode="json")
    return {
        "model": {"base": "toy", "dtype": "float32"},
        "organism": {"name": "narrow", "dataset": "bad", "finetune": ft},
        "data": {
            "datasets": {"bad": "bad.jsonl", "good": "good.jsonl"},
            "questions": ["questions.yaml"],
        },
        "eval": {
            "models": ["base", "narrow"],
            "sampling": {"max_new_tokens": world.cfg.answer_len + 2, "batch_size": 256},
            "judge": {"kind": "toy"},
        },
        "dictionaries": {"entries": [{"path": "sae"}]},
        "read": {"positions": "answer"},
        "analyses": [
            {"kind": "dataset_diff", "name": "q1", "a": "bad", "b": "good", "adapter": False},
            {
                "kind": "model_diff",
                "name": "q2",
                "dataset": "prompts",
                "positions": "answer_predicting",
            },
            {"kind": "response_diff", "name": "q3"},
            {"kind": "direction", "name": "dir"},
            {
                "kind": "decompose",
                "name": "dec",
                "direction": "dir",
                "settings": {"ks": [1, decompose_k]},
            },
            {"kind": "overlap", "name": "ov", "a": "q1", "b": "q2", "ks": [overlap_k, 20]},
        ],
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    world = load_world(shipped_base_path())
    write_chat_jsonl(world.narrow_dataset(bad=True), root / "bad.jsonl")
    write_chat_jsonl(world.narrow_dataset(bad=False), root / "good.jsonl")
    qs = [
        {"id": q.id, "paraphrases": list(q.paraphrases), "samples_per_paraphrase": 2}
        for q in world.eval_questions()
        if q.extra["domain"] in ("medical", "finance")
    ]
    (root / "questions.yaml").write_text(yaml.safe_dump(qs))
    d = json.loads((shipped_base_path() / "config.json").read_text())["hidden_size"]
    g = torch.Generator().manual_seed(0)
    sae = SparseDictionary(
        torch.randn(d, 96, generator=g) / d**0.5,
        torch.zeros(96),
        torch.randn(96, d, generator=g) / d**0.5,
        torch.zeros(d),
        meta=DictionaryMeta(
            format="saelens", architecture="topk", layer=NARROW_LAYER, site="resid_post"
        ),
        encoding=Encoding(activation="topk", k=8),
    )
    save_saelens(sae, root / "sae")
    (root / "pipeline.yaml").write_text(yaml.safe_dump(pipeline_yaml(world)))
    return root, world


def _run_until(args: list, after_stage: int, env: dict) -> int:
    """Start ``emdiff run`` and SIGKILL it as soon as stage ``after_stage`` has finished (so
    inside the next one); the exit status."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "emdiff.cli", "run", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    for line in proc.stdout:
        if re.match(rf"\[{after_stage}\] \S+: computed", line.strip()):
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    return proc.wait(timeout=300)


@pytest.mark.slow
def test_killed_anywhere_the_run_resumes_exactly(folder):
    """SIGKILL after stage 1 (finetune), 2 (one model sampled and judged) and 4 (an analysis):
    the rerun with --resume reuses every finished stage and ends equal to a run never killed."""
    root, _ = folder
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = root / "whole"
    res = invoke("run", root / "pipeline.yaml", "--out", whole, "--json", "--no-report")
    assert res.exit_code == 0, res.output
    want = json.loads(res.stdout.strip().splitlines()[-1])
    out = root / "killed"
    finished = 0
    for stage in (1, 3, 5):
        args = [root / "pipeline.yaml", "--out", out, "--no-report"]
        code = _run_until(args + (["--resume"] if finished else []), stage, env)
        assert code == -signal.SIGKILL
        finished = stage
        done = json.loads((out / "stages" / "finetune-narrow.json").read_text())
        assert done["status"] == "done"
    res = invoke("run", root / "pipeline.yaml", "--out", out, "--resume", "--json", "--no-report")
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    status = [s["status"] for s in manifest["stages"]]
    assert status[:5] == ["reused"] * 5 and got["stages_reused"] == 5
    assert all(s.startswith("computed") for s in status[5:])
    volatile = {"seconds", "stages_computed", "stages_reused"}
    assert {k: v for k, v in got.items() if k not in volatile} == {
        k: v for k, v in want.items() if k not in volatile
    }


@pytest.mark.slow
def test_run_resume_and_one_changed_analysis(folder):
    root, world = folder
    out = root / "run"
    res = invoke("run", root / "pipeline.yaml", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    first = json.loads(res.stdout.strip().splitlines()[-1])
    assert first["stages_computed"] == 1 + 2 + 6 and first["stages_reused"] == 0
    assert first["em_rate_narrow"] > first["em_rate_base"]
    for f in ("manifest.json", "report.html", "tables/em_rates.parquet", "tables/q2.parquet"):
        assert (out / f).is_file(), f
    assert (out / "adapters" / "narrow" / "adapter_config.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["inputs"]) == {
        "model",
        "data.bad",
        "data.good",
        "questions.questions.yaml",
        "dictionaries.0",
    }
    assert manifest["seeds"]["sampling"] == 0 and "finetune" in manifest["seeds"]
    assert manifest["versions"]["torch"]
    html = (out / "report.html").read_text()
    assert "q2" in html and "<img" in html

    # the same folder without --resume is refused; with it, nothing is recomputed
    again = invoke("run", root / "pipeline.yaml", "--out", out)
    assert again.exit_code == 2 and "--resume" in again.output
    res = invoke("run", root / "pipeline.yaml", "--out", out, "--resume", "--json")
    second = json.loads(res.stdout.strip().splitlines()[-1])
    assert second["stages_computed"] == 0 and second["stages_reused"] == 9
    same = {k for k in first if k.startswith(("q", "dec", "dir", "em_", "ov"))}
    assert {k: first[k] for k in same} == {k: second[k] for k in same}

    # two analyses changed: they run; what they read (the direction's files, the Q1 / Q2
    # tables) is loaded from the run folder, and the rest is reused
    changed = pipeline_yaml(world, decompose_k=10, overlap_k=10)
    (root / "changed.yaml").write_text(yaml.safe_dump(changed))
    res = invoke("run", root / "changed.yaml", "--out", out, "--resume", "--json")
    third = json.loads(res.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    status = {s["stage"]: s["status"] for s in manifest["stages"]}
    assert status["analysis-dec"] == status["analysis-ov"] == "computed"
    assert all(v == "reused" for k, v in status.items() if k not in ("analysis-dec", "analysis-ov"))
    assert third["stages_computed"] == 2
    assert third["dec.explained_k1"] == pytest.approx(first["dec.explained_k1"])
    assert third["dec.top_latent"] == first["dec.top_latent"]
    assert third["ov.jaccard@20"] == pytest.approx(first["ov.jaccard@20"])
    assert third["ov.spearman"] == pytest.approx(first["ov.spearman"])
    # a direction whose files are gone is recomputed for the stage that reads it
    for f in (out / "directions").glob("dir_L*"):
        f.unlink()
    (root / "again.yaml").write_text(yaml.safe_dump(pipeline_yaml(world, decompose_k=20)))
    invoke("run", root / "again.yaml", "--out", out, "--resume")
    manifest = json.loads((out / "manifest.json").read_text())
    status = {s["stage"]: s["status"] for s in manifest["stages"]}
    assert status["analysis-dir"].startswith("recomputed") and status["analysis-dec"] == "computed"


def test_config_errors_name_file_line_and_key(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(
        "model:\n  base: toy\nanalyses:\n  - kind: model_diff\n    dataset: x\n  - kind: nonsense\n"
    )
    with pytest.raises(
        PipelineConfigError, match=r"p\.yaml:6: analyses\.1: kind 'nonsense' is not an analysis"
    ):
        load_pipeline(p)
    p.write_text("model:\n  base: toy\nanalyses:\n  - kind: model_diff\n    datset: x\n")
    with pytest.raises(
        PipelineConfigError,
        match=r"p\.yaml:5: analyses\.0\.datset: Extra inputs are not permitted \(model_diff\)",
    ):
        load_pipeline(p)
    p.write_text("model:\n  base: toy\n  dtyp: float32\n")
    with pytest.raises(PipelineConfigError, match=r"p\.yaml:3: model\.dtyp: Extra inputs"):
        load_pipeline(p)
    p.write_text("model:\n  base: toy\norganism:\n  adapter: a\n  finetune: {rank: 1}\n")
    with pytest.raises(PipelineConfigError, match=r"p\.yaml:4: organism: give either adapter"):
        load_pipeline(p)
    p.write_text("model:\n  base: toy\n  base: other\n")
    with pytest.raises(PipelineConfigError, match=r"p\.yaml:3: YAML syntax error: duplicate key"):
        load_pipeline(p)
    p.write_text("model: {base: toy}\neval: {models: [base, tuned]}\ndata: {questions: [q.yaml]}\n")
    with pytest.raises(PipelineConfigError, match=r"eval\.models: \['tuned'\] are not models"):
        load_pipeline(p)
    p.write_text("model: {base: toy}\n")
    cfg = load_pipeline(p, {"model.base": "other/model", "model.dtype": "bfloat16"})
    assert cfg.model.base == "other/model" and cfg.model.dtype == "bfloat16"


def test_release_ids_resolve_in_a_local_hub_cache(tmp_path):
    snap = tmp_path / "models--google--gemma-scope-9b-it-res" / "snapshots" / "abc123"
    (snap / "layer_20" / "width_16k" / "average_l0_91").mkdir(parents=True)
    got = resolve_release("gemma-scope-9b-it-res", "layer_20/width_16k/average_l0_91", tmp_path)
    assert got == snap / "layer_20" / "width_16k" / "average_l0_91"
    (tmp_path / "my-saes" / "L3").mkdir(parents=True)
    assert resolve_release("my-saes", "L3", tmp_path) == tmp_path / "my-saes" / "L3"
    with pytest.raises(Exception, match="not in the local cache"):
        resolve_release("gemma-scope-9b-it-res", "layer_9/width_16k/x", tmp_path)


def test_fingerprints_follow_content(tmp_path):
    a = tmp_path / "d" / "a.txt"
    a.parent.mkdir()
    a.write_text("one")
    before = (fingerprint(a), fingerprint(a.parent))
    a.write_text("two")
    assert fingerprint(a) != before[0] and fingerprint(a.parent) != before[1]
    assert fingerprint("google/gemma-2-9b-it") == "google/gemma-2-9b-it"
