"""A bounded top-k per feature (value, sequence, position), merged in bulk.

Candidates are buffered and, about 65k at a time (and whenever the store is read), filtered by
each feature's current k-th value and merged into the store, so a batch costs an append; the
filtering and sorting happen rarely, over many batches at once. Merging is exact and in a fixed
order (larger value first; on ties, the entry that arrived first), so shards merge into the
same result as one pass.
"""

from __future__ import annotations

import torch

NEG = float("-inf")
PENDING_LIMIT = 1 << 16
"""Buffered candidates that trigger a merge."""


def _descending_key(vals: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2**32) that sorts ascending as ``vals`` (float32) sorts descending."""
    bits = vals.float().view(torch.int32).to(torch.int64)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # ascending as the floats
    return 2**31 - 1 - ordered


class TopK:
    """The ``k`` largest values of each of ``d`` features, with their sequence id and position
    (``-inf`` / ``-1`` where fewer were seen)."""

    def __init__(self, d: int, k: int, device: str | torch.device = "cpu") -> None:
        self.k = k
        self._val = torch.full((d, k), NEG, dtype=torch.float32, device=device)
        self._seq = torch.full((d, k), -1, dtype=torch.int64, device=device)
        self._pos = torch.full((d, k), -1, dtype=torch.int64, device=device)
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._n_pending = 0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(values, sequence ids, positions)``, each ``[d, k]``, largest first."""
        self.flush()
        return self._val, self._seq, self._pos

    def set(self, val: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor) -> None:
        self._pending, self._n_pending = [], 0
        self._val, self._seq, self._pos = val, seq, pos

    def offer(self, feats, vals, seqs, pos) -> None:
        """Candidates (flat, one entry per nonzero activation), filtered and merged in bulk."""
        if self.k == 0 or len(feats) == 0:
            return
        # only candidates above their feature's current k-th value can enter (the k-th only
        # rises, so filtering now or at the merge keeps the same ones)
        keep = (vals > self._val[:, -1].index_select(0, feats)).nonzero().squeeze(1)
        feats, vals, seqs, pos = (t.index_select(0, keep) for t in (feats, vals.float(), seqs, pos))
        self._pending.append((feats, vals, seqs, pos))
        self._n_pending += len(feats)
        if self._n_pending >= PENDING_LIMIT:
            self.flush()

    def flush(self) -> None:
        """Merge every buffered candidate into the store."""
        if not self._pending:
            return
        feats, vals, seqs, pos = (torch.cat(parts) for parts in zip(*self._pending, strict=True))
        self._pending, self._n_pending = [], 0
        keep = (vals > self._val[:, -1].index_select(0, feats)).nonzero().squeeze(1)
        self._merge(*(t.index_select(0, keep) for t in (feats, vals, seqs, pos)))

    def _merge(self, feats, vals, seqs, pos) -> None:
        if not len(feats):
            return
        k = self.k
        # the candidates' own top k per feature first (one sort of the candidates only) ...
        order = torch.sort(feats * 2**32 + _descending_key(vals), stable=True).indices
        touched, counts = torch.unique_consecutive(feats[order], return_counts=True)
        start = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order), device=feats.device) - start.repeat_interleave(counts)
        first = rank < k
        order, slot, r = order[first], torch.repeat_interleave(counts)[first], rank[first]
        new_v = torch.full((len(touched), k), NEG, device=vals.device)
        new_s = torch.full((len(touched), k), -1, dtype=torch.int64, device=vals.device)
        new_p = torch.full_like(new_s, -1)
        at = slot * k + r
        for new, src in ((new_v, vals), (new_s, seqs), (new_p, pos)):
            new.view(-1).index_copy_(0, at, src.index_select(0, order))
        # ... then merged with the kept top k of the touched features: [touched, 2k] -> top k
        all_v = torch.cat([self._val.index_select(0, touched), new_v], 1)
        top = torch.sort(all_v, dim=1, descending=True, stable=True).indices[:, :k]
        self._val.index_copy_(0, touched, all_v.gather(1, top))
        for store, new in ((self._seq, new_s), (self._pos, new_p)):
            both = torch.cat([store.index_select(0, touched), new], 1)
            store.index_copy_(0, touched, both.gather(1, top))
