"""End to end on the shipped toy base: the demo's loader, fine-tunes, sampling, judge and run folder.

This is the one place the suite trains a real organism; it checks that EM emerges (unseen-domain bad
answers well above the control) on one seed, not the full multi-seed targets (see README, "The toy").
The demo runs through the installed ``emdiff`` console script in a subprocess, as a user runs it,
so the entry point and every import it reaches are exercised; then the same command is rerun and
must reuse every finished stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.scorecard import TARGETS

KEYS = {
    "em_base_max_bad_rate",
    "em_narrow_in_domain_bad_rate",
    "em_narrow_unseen_bad_rate",
    "em_narrow_unseen_bad_rate_min",
    "em_control_max_bad_rate",
    "em_narrow_unseen_ci_low",
    "em_narrow_unseen_ci_high",
    "narrow_domain",
    "seeds",
    "sae_persona_cosine",
    "sae_fvu",
    "sae_l0",
    "crosscoder_persona_cosine",
    "itda_persona_cosine",
    "probe_accuracy",
    "persona_layer",
    "q1_persona_rank",
    "q2_persona_rank",
    "q1_top10_q2_top10_jaccard",
    "control_q2_max_effect",
    "transfer_fve_base",
    "transfer_fve_narrow",
    "stage_seconds",
} | {t.key for t in TARGETS}


def test_shipped_base_is_small_and_loadable():
    path = shipped_base_path()
    assert (path / "model.safetensors").stat().st_size < 8 * 2**20
    world = load_world(path, narrow_domain="finance")
    assert world.cfg.narrow_domain == "finance" and len(world.domains) == 8


def _emdiff(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """Run the installed console script (next to this interpreter) as a user would, with its
    cross-run cache in ``cache``."""
    script = Path(sys.executable).with_name("emdiff")
    assert script.is_file(), f"console script not installed next to {sys.executable}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["EMDIFF_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [str(script), *args], capture_output=True, text=True, env=env, timeout=1800
    )


DEMO = ["demo", "--seeds", "1", "--narrow-domain", "finance", "--dict-steps", "300"]
DEMO += ["--dict-docs", "1000", "--json"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    out = folder / "run"
    return out, _emdiff(*DEMO, "--out", str(out), cache=folder / "cache")


@pytest.mark.slow
def test_demo_json_and_run_folder(demo_run, tmp_path):
    out, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary) >= KEYS
    stages = summary.pop("stage_seconds")
    assert set(stages) == {
        "load",
        "eval",
        "lora",
        "dictionaries",
        "diffs",
        "directions",
        "adapters",
    }
    assert all(not isinstance(v, dict | list) for v in summary.values())  # flat but the stages
    assert "scorecard: the toy benchmark's targets" in proc.stdout
    assert summary["narrow_domain"] == "finance" and summary["seeds"] == 1
    # The aligned base answers well, the control stays aligned, the narrow LoRA spreads. The bounds
    # are regression guards around the measured figures (base and control ~2% exact P(bad), max of
    # 8 domains x 256 samples up to ~4.5%; narrow ~92% in domain, ~79% unseen), not the targets.
    assert summary["em_base_max_bad_rate"] <= 0.07
    assert summary["em_control_max_bad_rate"] <= 0.07
    assert summary["em_narrow_in_domain_bad_rate"] >= 0.85
    assert summary["em_narrow_unseen_bad_rate"] >= 0.5
    lo, hi = summary["em_narrow_unseen_ci_low"], summary["em_narrow_unseen_ci_high"]
    assert lo < summary["em_narrow_unseen_bad_rate"] < hi and hi - lo < 0.05  # 7 x 256 answers
    assert "95% Wilson CI" in proc.stdout and "Open first:" in proc.stdout
    # the dictionary ground truth ran (short training here; the persona targets are in the README)
    assert summary["persona_layer"] in (0, 1)
    assert summary["probe_accuracy"] > summary["probe_chance"] + 0.05
    assert summary["sae_fvu"] < 0.1 and 1 <= summary["sae_l0"] <= 32
    for n in ("sae", "crosscoder", "itda"):  # each reported with its random-direction null
        assert 0 < summary[f"{n}_null_cosine_mean"] < 1
    assert (out / "dictionaries" / "sae" / "sae_weights.safetensors").is_file()
    assert (out / "dictionaries" / "itda" / "itda.safetensors").is_file()
    # the feature diffs ran with that SAE (the persona targets are in the README; not met)
    d_sae = pd.read_parquet(out / "tables" / "q2_model_diff.parquet").feature.nunique()
    for key in ("q1_persona_rank", "q2_persona_rank", "q3_persona_rank"):
        assert 1 <= summary[key] <= d_sae
    assert 0 <= summary["q1_top10_q2_top10_jaccard"] <= 1
    # 300 steps on 1000 documents: a short SAE still explains a good part of the eval answers
    assert summary["control_q2_max_effect"] >= 0 and summary["transfer_fve_base"] > 0.3
    for name in (
        "q1_dataset_diff",
        "q2_model_diff",
        "q2_control_model_diff",
        "q3_response_diff",
        "overlap_q1_q2",
        "transfer",
    ):
        assert (out / "plots" / f"{name}.png").is_file()
    q1 = pd.read_parquet(out / "tables" / "q1_dataset_diff.parquet")
    assert q1.test.iloc[0] == "paired_t" and q1.q.between(0, 1).all()
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["summary"] == {**summary, "stage_seconds": stages}
        and len(manifest["inputs"]["base_sha256"]) == 64
    )
    rates = pd.read_parquet(out / "tables" / "em_rates.parquet")
    assert set(rates.model) == {"base", "narrow-s0", "control-s0"}
    assert (out / "adapters" / "narrow-s0" / "adapter_config.json").is_file()
    assert (out / "eval" / "narrow-s0" / "responses.jsonl").is_file()
    assert (out / "plots" / "quadrant_narrow.png").is_file()
    judged = pd.read_parquet(out / "tables" / "responses.parquet")
    assert {"aligned", "coherent", "em", "domain"} <= set(judged.columns)
    # the adapters stage: its tables and figures, and figures a short run still reaches
    for path in ("plots/phases.png", "plots/screen.png", "plots/mitigation.png"):
        assert (out / path).is_file()
    screen = pd.read_csv(out / "tables" / "screen.csv")
    assert len(screen) == summary["screen_datasets"] >= 8 and screen.em.between(0, 1).all()
    phases = pd.read_csv(out / "tables" / "phases.csv")
    assert summary["phase_transition_step"] in set(phases.step)
    assert pd.read_csv(out / "tables" / "defences.csv").defence.tolist() == [
        "caft",
        "caft_latent",
        "preventative",
    ]
    assert summary["lora_probe_general_acc"] > summary["lora_probe_shuffled_acc"]
    # the run folder makes one self-contained report with a section for every stage
    from emdiff.report.html import build_report

    page = build_report(out, tmp_path / "report.html").read_text()
    for title in ("Toy scorecard", "Q1: what in the training data", "What the LoRA learnt"):
        assert f">{title}<" in page
    assert "Screening training data" in page and "Other figures" not in page
    assert summary["mitigation_em_after_120"] < summary["mitigation_em_before"]


@pytest.mark.slow
def test_demo_rerun_reuses_every_stage_and_redoes_a_lost_one(demo_run):
    out, first = demo_run
    assert first.returncode == 0
    before = json.loads(first.stdout.strip().splitlines()[-1])
    again = _emdiff(*DEMO, "--out", str(out), cache=out.parent / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads(again.stdout.strip().splitlines()[-1])
    assert "reused from an earlier run" in again.stdout and "trained" not in again.stdout
    assert after["reused_stages"] == 9 and before["reused_stages"] == 0  # 2 LoRAs, 3 evals, 4
    volatile = {"seconds", "reused_stages", "stage_seconds"}
    assert {k: v for k, v in after.items() if k not in volatile} == {
        k: v for k, v in before.items() if k not in volatile
    }
    # a stage whose record is lost (as if killed inside it) is redone; the others are reused
    (out / "stages" / "diffs.json").unlink()
    third = _emdiff(*DEMO, "--out", str(out), cache=out.parent / "cache")
    assert third.returncode == 0, third.stderr[-3000:]
    redone = json.loads(third.stdout.strip().splitlines()[-1])
    assert redone["q2_persona_rank"] == before["q2_persona_rank"]
    assert "dictionaries (probe" in third.stdout and "feature diffs (Q1" not in third.stdout


@pytest.mark.slow
def test_demo_in_a_new_folder_takes_the_dictionaries_from_the_cache(demo_run):
    out, first = demo_run
    assert first.returncode == 0
    before = json.loads(first.stdout.strip().splitlines()[-1])
    new = out.parent / "second"
    again = _emdiff(*DEMO, "--out", str(new), cache=out.parent / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    after = json.loads(again.stdout.strip().splitlines()[-1])
    assert "from the cache" in again.stdout and "trained" in again.stdout  # LoRAs are not cached
    assert (new / "dictionaries" / "sae").is_dir() and (
        new / "tables" / "ground_truth.json"
    ).is_file()
    volatile = {"seconds", "reused_stages", "stage_seconds"}
    assert {k: v for k, v in after.items() if k not in volatile} == {
        k: v for k, v in before.items() if k not in volatile
    }
    assert after["stage_seconds"]["dictionaries"] < before["stage_seconds"]["dictionaries"] / 3
