"""The steering ceiling: the best one vector at the answer-predicting position, found by gradient
ascent, beats the unsteered base and is reproduced when it is applied again."""

from __future__ import annotations

from emdiff.toy.ceiling import CeilingConfig, steering_ceiling
from emdiff.toy.organism import answer_probability


def test_the_ceiling_search_raises_the_bad_rate_and_leaves_the_model_as_it_was(shipped_toy):
    world, model = shipped_toy
    before = float(answer_probability(model, world, [world.cfg.narrow_domain]).mean())
    res = steering_ceiling(world, model, 1, "resid_post", CeilingConfig(steps=40, scales=(2.0,)))
    assert set(res) >= {"in_domain_bad_rate", "unseen_bad_rate", "norm", "x1", "x2"}
    assert before < 0.02 and res["in_domain_bad_rate"] > 0.5 > before
    assert abs(sum(res["x1"].values()) - 1) < 1e-6 and res["norm"] > 0
    # the model is frozen during the search and given back unchanged, with no hooks left
    assert all(p.requires_grad for p in model.parameters())
    again = float(answer_probability(model, world, [world.cfg.narrow_domain]).mean())
    assert again == before
