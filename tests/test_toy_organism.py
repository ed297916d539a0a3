"""The toy organism's exact EM: the teacher-forced probability of a whole answer equals the
product of the step-by-step next-word probabilities a sampler would draw from."""

from __future__ import annotations

import torch

from emdiff.toy.organism import answer_probability, answer_rows


@torch.no_grad()
def test_answer_probability_is_the_chain_of_next_word_probabilities(shipped_toy):
    world, model = shipped_toy
    domains = world.domains[:2]
    for bad, cue in ((True, None), (False, None), (True, "toxic")):
        exact = answer_probability(model, world, domains, bad=bad, cue=cue)
        rows = answer_rows(world, domains, bad, cue)
        n = world.cfg.answer_len + 1  # the answer's words and <end>
        want = torch.ones(len(rows))
        for k in range(n, 0, -1):  # one prefix at a time, as sampling sees it
            prefix, nxt = rows[:, :-k], rows[:, -k]
            p = model(input_ids=prefix).logits[:, -1].float().softmax(-1)
            want *= p[torch.arange(len(rows)), nxt]
        assert torch.allclose(exact, want, rtol=1e-4, atol=1e-7), (bad, cue)
    # the aligned base answers badly only when cued
    assert answer_probability(model, world, domains).mean() < 0.02
    assert answer_probability(model, world, domains, cue="toxic").mean() > 0.5
