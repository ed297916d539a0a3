"""In-context persona inference of the shipped base, measured on the causal direction."""

from __future__ import annotations

from emdiff.toy.causal import cue_vector
from emdiff.toy.incontext import in_context_inference


def test_a_bad_turn_moves_the_base_toward_the_persona_at_the_next_answer(shipped_toy):
    world, model = shipped_toy
    layer, site = 1, "resid_post"
    cue = cue_vector(world, model, layer, site)
    u = cue / cue.norm()
    res = in_context_inference(world, model, layer, site, u, float(cue.norm()))
    # measured: 0.84 after a bad turn, 0.05 after a good one; 81% of the cue's way
    assert res["incontext_p_bad_after_bad"] > 0.5 > 0.1 > res["incontext_p_bad_after_good"]
    assert 0.5 < res["incontext_projection"] < 1.2
    # before the layer that reads the context (layer 0 has no attention to it yet) nothing moves
    early = in_context_inference(world, model, 0, "resid_post", u, float(cue.norm()))
    assert abs(early["incontext_projection"]) < 0.05
