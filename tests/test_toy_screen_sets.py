"""The toy's screened training sets: nine, of the narrow domain and the next two, with the bad
shares they are named by, for any narrow domain."""

from __future__ import annotations

import pytest

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
