"""The read spec, its batches and token gathering, and the bulk-merged top-k store."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from emdiff.data.masks import EncodedChat
from emdiff.data.positions import Positions
from emdiff.errors import InputError
from emdiff.models.read import ReadSpec, gather, read_batches, selected
from emdiff.stats import topk as topk_mod
from emdiff.stats.topk import TopK


def test_read_spec_is_small_exact_and_recorded():
    read = ReadSpec(layers=(3,), site="mlp_out", positions=Positions.parse("answer_first:4"))
    assert read.layer == 3 and read.at(5).layers == (5,)
    assert read.describe() == "layer 3 mlp_out, positions answer_first:4"
    assert ReadSpec.model_validate(read.model_dump(mode="json")) == read  # round-trips as JSON
    with pytest.raises(InputError, match="reads one layer"):
        _ = ReadSpec(layers=(1, 2)).layer
    bad_specs = (
        {"layers": ()},
        {"layers": (-1,)},
        {"layers": (1,), "site": "hook_z"},
        {"layers": (1,), "x": 1},
    )
    for bad in bad_specs:
        with pytest.raises(ValidationError):
            ReadSpec(**bad)


def _batch(read: ReadSpec):
    roles = [2, 2, 3, 3, 3, 3, 0]
    rows = [EncodedChat(list(range(7)), roles), EncodedChat(list(range(5)), roles[:5])]
    masks = [read.positions.mask(r) for r in rows]
    return next(read_batches(rows, masks, batch_size=2))


@pytest.mark.parametrize("positions", ["answer", "answer,sinks", "answer_after:1"])
def test_gather_selects_what_selected_selects(positions):
    """The stats pass gathers rows by index; the splice uses a mask: same tokens, same order."""
    read = ReadSpec(layers=(0,), positions=Positions.parse(positions))
    batch = _batch(read)
    hidden = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0))
    hidden[0, 3] *= 1000  # an attention sink among the answer tokens
    x, seq, pos = gather(hidden, batch, read, 0)
    sel = selected(hidden, batch, read, 0)
    assert torch.equal(x, hidden[sel]) and torch.equal(seq, batch.seq[sel])
    assert torch.equal(pos, batch.pos[sel])
    assert (3 in pos[seq == 0].tolist()) == (not read.positions.exclude_sinks)
    hidden[1, 4, 0] = float("nan")
    with pytest.raises(InputError, match=r"layer 0, site resid_post, batch 0 \(sequences 0..1\)"):
        gather(hidden, batch, read, 0)


def _reference(entries, k):
    """Per feature: the k largest values, ties in arrival order (a plain stable sort)."""
    out = {}
    for f, v, s, p in entries:
        out.setdefault(f, []).append((v, s, p))
    return {f: sorted(e, key=lambda t: -t[0])[:k] for f, e in out.items()}


@pytest.mark.parametrize("limit", [1, 50, 1 << 18])
def test_top_k_merged_in_bulk_equals_a_plain_sort(monkeypatch, limit):
    monkeypatch.setattr(topk_mod, "PENDING_LIMIT", limit)
    g = torch.Generator().manual_seed(1)
    store, entries = TopK(d=6, k=4), []
    for batch in range(12):
        n = 30
        feats = torch.randint(0, 6, (n,), generator=g)
        vals = torch.randint(1, 8, (n,), generator=g).float()  # many ties
        seqs, pos = torch.full((n,), batch), torch.arange(n)
        store.offer(feats, vals, seqs, pos)
        entries += list(
            zip(feats.tolist(), vals.tolist(), seqs.tolist(), pos.tolist(), strict=True)
        )
    val, seq, pos = store.tensors()
    for f, top in _reference(entries, 4).items():
        assert [(float(v), int(s), int(p)) for v, s, p in zip(val[f], seq[f], pos[f], strict=True)][
            : len(top)
        ] == top
