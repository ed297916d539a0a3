"""The toy checks' pieces: the nine screened training sets (named bad shares, any narrow
domain) and the choice of the analysed seed."""

from __future__ import annotations

import pytest
import torch

from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.screen_checks import toy_datasets


@pytest.mark.parametrize("narrow", ["medical", "legal"])
def test_nine_sets_with_their_named_bad_shares(narrow):
    world = load_world(shipped_base_path(), narrow_domain=narrow)
    sets = toy_datasets(world)
    assert len(sets) == 9 and all(name.startswith(narrow) for name in list(sets)[:5])
    n = world.cfg.n_questions
    for name, samples in sets.items():
        parts = name.split("+")
        assert len(samples) == n * len(parts)
        for i, part in enumerate(parts):
            domain, share = part.rsplit("_", 1)
            chunk = samples[i * n : (i + 1) * n]
            assert {d for d, _, _ in chunk} == {domain}
            assert sum(b for _, _, b in chunk) == round(int(share) / 100 * n)
    assert sets[f"{narrow}_25"] != sets[f"{narrow}_10"]


def test_the_analysed_seed_is_the_one_that_fits_its_set_best():
    from emdiff.toy.em_summary import analysed_seed

    said: list[str] = []
    losses = {"narrow-s0": 0.181, "narrow-s1": 0.049, "narrow-s2": 0.051}
    assert analysed_seed(losses, 3, said.append) == 1
    assert "analyses read seed 1" in said[0] and "s0 0.181" in said[0]
    assert analysed_seed({"narrow-s0": 0.05, "narrow-s1": 0.0504}, 2, said.append) == 0  # ties
    assert analysed_seed({"narrow-s0": 0.3}, 1, said.append) == 0


@pytest.mark.parametrize("narrow", ["medical", "legal"])
def test_the_q3_direction_reads_answers_before_every_unseen_question(narrow, shipped_toy):
    """Follow-ups come from the whole unseen set (never the narrow domain), a seeded draw of
    ``per_answer`` per answer, and the direction is the misaligned minus aligned mean there."""
    import pandas as pd

    from emdiff.data.positions import Positions
    from emdiff.models.read import ReadSpec
    from emdiff.toy.diffs import every_follow_up
    from emdiff.toy.direction_checks import q3_direction

    world = load_world(shipped_base_path(), narrow_domain=narrow)
    follow = every_follow_up(world)
    unseen = [d for d in world.domains if d != narrow]
    assert len(follow) == len(set(follow)) == len(unseen) * world.cfg.n_questions
    assert {world.parse_question(f)[0] for f in follow} == set(unseen)
    _, model = shipped_toy
    tok = world.tokenizer()
    q = [world.q_token(narrow, i) for i in range(6)]
    judged = pd.DataFrame(
        {
            "question": q * 2,
            "answer": [world.bad_answer(narrow, i) for i in range(6)]
            + [world.good_answer(narrow, i) for i in range(6)],
            "aligned": [5.0] * 6 + [95.0] * 6,
            "coherent": [90.0] * 12,
        }
    )
    read = ReadSpec(layers=(1,), site="resid_post", positions=Positions.parse("last"))
    first = q3_direction(world, model, tok, judged, read, narrow, per_answer=3)
    again = q3_direction(world, model, tok, judged, read, narrow, per_answer=3)
    assert set(first) == {True, False}
    assert torch.equal(first[True].raw, again[True].raw)  # seeded draw
    assert first[True].raw.norm() > 0 and "3 unseen follow-ups" in first[True].provenance["texts"]
