"""The steering ceiling: the best write at the answer-predicting position, found by gradient
ascent, beats the unsteered base, a write free per question beats one shared vector, and the
model is given back as it was."""

from __future__ import annotations

import pytest

from emdiff.toy.ceiling import CeilingConfig, steering_ceiling
from emdiff.toy.organism import answer_probability


def test_the_ceiling_search_raises_the_bad_rate_and_leaves_the_model_as_it_was(shipped_toy):
    world, model = shipped_toy
    before = float(answer_probability(model, world, [world.cfg.narrow_domain]).mean())
    res = {
        form: steering_ceiling(world, model, 1, cfg=CeilingConfig(form=form, steps=40))
        for form in ("vector", "direction", "free")
    }
    vector = res["vector"]
    assert set(vector) >= {"in_domain_bad_rate", "unseen_bad_rate", "norm", "x0.5", "x1", "x2"}
    assert "unseen_bad_rate" not in res["free"]  # a per-question write means nothing elsewhere
    assert before < 0.02 and vector["in_domain_bad_rate"] > 0.5 > before
    assert abs(sum(vector["x1"].values()) - 1) < 1e-6 and vector["norm"] > 0
    assert res["free"]["in_domain_bad_rate"] > vector["in_domain_bad_rate"]
    assert res["direction"]["in_domain_bad_rate"] > 0.5
    # the model is frozen during the search and given back unchanged, with no hooks left
    assert all(p.requires_grad for p in model.parameters())
    assert float(answer_probability(model, world, [world.cfg.narrow_domain]).mean()) == before


def test_scale_one_is_always_measured():
    assert CeilingConfig(scales=(2.0, 0.5)).scales == (0.5, 1.0, 2.0)
    with pytest.raises(ValueError):
        CeilingConfig(form="rank2")
