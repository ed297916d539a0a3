"""Similarity of two ITDA dictionaries (layers, models), as the ITDA paper compares them: the
Jaccard index of the *identities* of the activations that became atoms, ``atom_keys = (sequence
id, token position)``. Meaningful only when both were built from the same token stream keyed the
same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emdiff.dictionaries.itda import ITDADictionary


def _key_set(d: ITDADictionary) -> set[tuple[int, int]]:
    return {(int(a), int(b)) for a, b in d.atom_keys.tolist()}


def _jaccard(a: set, b: set) -> float:
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def itda_jaccard(a: ITDADictionary, b: ITDADictionary) -> float:
    """``|A & B| / |A | B|`` over the atoms' (sequence, position) keys; 1.0 for two empty dicts."""
    return _jaccard(_key_set(a), _key_set(b))


def itda_jaccard_matrix(dicts: Sequence[ITDADictionary]) -> np.ndarray:
    """Symmetric ``[n, n]`` float64 matrix of pairwise :func:`itda_jaccard` values."""
    sets = [_key_set(d) for d in dicts]
    out = np.ones((len(sets), len(sets)))
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            out[i, j] = out[j, i] = _jaccard(sets[i], sets[j])
    return out
