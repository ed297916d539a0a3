"""The toy scorecard: every target checked against a summary, missing keys never passed."""

from __future__ import annotations

import math

from emdiff.toy.scorecard import TARGETS, score, score_table


def passing() -> dict:
    """A summary that meets every target exactly at its bound (or just past a strict one)."""
    out = {}
    for t in TARGETS:
        step = {"<": -1e-6, ">": 1e-6}.get(t.op, 0.0)
        out[t.key] = t.value + step
    return out


def test_every_target_passes_at_its_bound_and_fails_past_it():
    summary = passing()
    assert score(summary) == {"pass": len(TARGETS), "fail": 0, "missing": 0}
    for t in TARGETS:
        worse = {"<=": 1e-3, ">=": -1e-3, "<": 1e-3, ">": -1e-3, "==": 1.0}[t.op]
        assert t.check({**summary, t.key: t.value + worse}) is False, t.key


def test_missing_or_non_numeric_keys_are_missing_not_passed():
    summary = passing()
    del summary["q3_direction_cosine"]
    summary["q1_persona_rank"] = math.nan
    summary["q2_persona_rank"] = "1"
    assert score(summary) == {"pass": len(TARGETS) - 3, "fail": 0, "missing": 3}
    table = score_table(summary)
    assert "q3_direction_cosine" in table and "missing" in table
    assert table.splitlines()[-1] == f"{len(TARGETS) - 3} pass, 0 fail, 3 missing"


def test_the_published_targets_are_all_there():
    keys = {t.key for t in TARGETS}
    for k in ("gt_ablation_cut", "sae_fvu", "q2_control_persona_rank", "q3_persona_rank"):
        assert k in keys
    assert len(keys) == len(TARGETS)
