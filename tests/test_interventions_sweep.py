"""Steering / ablation sweeps: every configuration beside its random controls; on the toy base,
steering with the persona cue brings EM that random directions of the same norm do not."""

from __future__ import annotations

import pytest
import torch

from emdiff.errors import InputError
from emdiff.eval.judge import ToyJudge
from emdiff.eval.sample import SamplingConfig
from emdiff.interventions.sweep import (
    JudgedScorer,
    SweepConfig,
    intervention_sweep,
    random_directions,
)
from emdiff.models import load_model
from emdiff.models.hooks import capture_residuals
from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.causal import cue_vector

IDS = torch.tensor([[3, 5, 7, 9, 11, 13]])


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    return load_model(str(tiny_model_dirs["llama"]), dtype="float32").model.eval()


def test_sweep_scores_each_configuration_beside_matched_random_directions(llama, tmp_path):
    d = llama.config.hidden_size
    u = random_directions(d, 1, seed=99)[0]

    def scorer(model, tag):  # "EM": how far layer 1 reads along u (what steering at 1 adds)
        h = capture_residuals(model, IDS, layers=[1])[(1, "resid_post")]
        em = float((h @ u).mean())
        return {"em": em, "em_low": em - 0.1, "em_high": em + 0.1, "coherent": 1.0}

    cfg = SweepConfig(kinds=("steer", "ablate"), scales=(0.0, 5.0), n_random=4)
    res = intervention_sweep(llama, {1: u * 7.0}, scorer, cfg, progress=False)
    rows = res.rows
    assert len(rows) == (2 + 1) * (1 + 4)  # steer at 2 scales, ablate once; direction + 4 random
    s = res.summary_table.set_index(["kind", "scale"])
    base = s.loc[("steer", 0.0), "em"]
    assert s.loc[("steer", 5.0), "em"] == pytest.approx(base + 5.0, abs=1e-4)  # unit direction
    assert abs(s.loc[("steer", 5.0), "random_em_mean"] - base) < 5.0
    assert s.loc[("ablate", 0.0), "em"] == pytest.approx(0.0, abs=1e-4)
    assert s.loc[("steer", 5.0), "random_em_max"] >= s.loc[("steer", 5.0), "random_em_min"]
    files = res.save(tmp_path)
    assert all(f.is_file() for f in files)
    with pytest.raises(InputError, match="no direction"):
        intervention_sweep(llama, {}, scorer, cfg)
    with pytest.raises(InputError, match="no EM rate"):
        intervention_sweep(llama, {1: u}, lambda m, t: {"em": float("nan")}, cfg, progress=False)


def test_on_the_toy_steering_with_the_persona_cue_brings_judged_em(tmp_path):
    path = shipped_base_path()
    world = load_world(path)
    loaded = load_model(str(path), dtype="float32")
    model, tok = loaded.model.eval(), loaded.tokenizer
    cue = cue_vector(world, model, 1, "resid_post")
    questions = world.eval_questions(["finance", "travel"])
    scorer = JudgedScorer(
        tok,
        questions,
        ToyJudge(world),
        SamplingConfig(max_new_tokens=world.cfg.answer_len + 2, seed=0, batch_size=256),
        tmp_path / "answers",
    )
    # the last prompt token, while the prompt is read (the answer words are left alone)
    cfg = SweepConfig(scales=(2 * float(cue.norm()),), n_random=3, position=-1, prompt_only=True)
    res = intervention_sweep(model, {1: cue}, scorer, cfg, progress=False)
    row = res.summary_table.iloc[0]
    assert row["em"] > 0.5 and row["random_em_max"] < 0.25 and row["coherent"] > 80
    assert row["em_low"] <= row["em"] <= row["em_high"] and row["n"] == len(questions)
    assert len(list((tmp_path / "answers").iterdir())) == 4  # one folder per configuration
