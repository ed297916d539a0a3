"""Streaming, mergeable statistics of dictionary features and of the raw residual stream.

Everything here is a sum (or a max, or a bounded top-k), so shards merge exactly by :meth:`merge`,
which is what makes runs resumable shard by shard and splittable across processes. Updates work on
the nonzero entries of the (sparse) feature activations only: one dense pass finds them, the rest
costs O(nonzeros), which keeps the statistics close to the cost of the encode itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from emdiff.readers import load_safetensors, read_json
from emdiff.stats.topk import NEG, TopK

DENSE_SEQUENCE_SUMS = 1 << 22
"""Per-sequence sums go through a dense ``[sequences in batch, d_sae]`` table up to this size."""


class FeatureStats:
    """Per-feature statistics for one (model variant, dataset, layer, dictionary).

    Token level: ``n_tokens``, ``sum``, ``sumsq``, ``fire`` (count of nonzero activations, so the
    signed codes of ITDA count too), ``max``.
    Sequence level: each feature's mean over the selected tokens of each sequence, stored sparsely
    (sequence id, feature, mean) for features active in that sequence; ``seq_tokens`` holds each
    sequence's token count. Top-k: the ``top_k`` largest activations of each feature with their
    sequence id and position.

    Each :meth:`update` must contain every selected token of the sequences it mentions (one batch
    of whole sequences), and sequence ids must be unique across the run.
    """

    def __init__(
        self,
        d_sae: int,
        top_k: int = 16,
        device: str | torch.device = "cpu",
        sequences: bool = True,
    ):
        self.d_sae, self.top_k, self.sequences = d_sae, top_k, sequences
        self.n_tokens = 0
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.fire = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.max = torch.zeros(d_sae, dtype=torch.float32, device=device)
        self._top = TopK(d_sae, top_k, device)
        self._seq_chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._seq_tokens: dict[int, int] = {}

    # ---- update -------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, acts: torch.Tensor, seq_ids: torch.Tensor, positions: torch.Tensor) -> None:
        """Add ``acts [N, d_sae]`` of N selected tokens with their sequence ids and positions."""
        if acts.shape[-1] != self.d_sae:
            raise ValueError(f"expected {self.d_sae} features, got {acts.shape[-1]}")
        rows, feats = acts.nonzero(as_tuple=True)
        self.update_entries(acts.shape[0], (rows, feats, acts[rows, feats]), seq_ids, positions)

    @torch.no_grad()
    def update_entries(
        self,
        n: int,
        entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        seq_ids: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Add N tokens given by their nonzero activations ``(token, feature, value)`` (as
        :meth:`~emdiff.dictionaries.base.SparseDictionary.encode_entries` gives them)."""
        if n == 0:
            return
        rows, feats, vals = entries
        seq_ids = seq_ids.to(vals.device)
        positions = positions.to(vals.device)
        vals = vals.float()
        self.n_tokens += n
        v64 = vals.double()
        self.sum.index_add_(0, feats, v64)
        self.sumsq.index_add_(0, feats, v64.square())
        self.fire += torch.bincount(feats, minlength=self.d_sae)
        self.max.scatter_reduce_(0, feats, vals, reduce="amax")
        self._update_sequences(seq_ids, rows, feats, v64)
        if self.top_k:
            self._top.offer(
                feats, vals, seq_ids.index_select(0, rows), positions.index_select(0, rows)
            )

    def _update_sequences(self, seq_ids, rows, feats, vals) -> None:
        uniq, inv_all = torch.unique(seq_ids, return_inverse=True)
        counts = torch.bincount(inv_all, minlength=len(uniq))
        for s, c in zip(uniq.tolist(), counts.tolist(), strict=True):
            if s in self._seq_tokens:
                raise ValueError(f"sequence id {s} was already added: ids must be unique")
            self._seq_tokens[s] = c
        if len(rows) == 0 or not self.sequences:
            return
        key = inv_all.index_select(0, rows) * self.d_sae + feats
        if len(uniq) * self.d_sae <= DENSE_SEQUENCE_SUMS:  # a small dense table: no sort
            sums = torch.zeros(len(uniq) * self.d_sae, dtype=torch.float64, device=vals.device)
            sums.index_add_(0, key, vals)
            ukey = (sums != 0).nonzero().squeeze(1)
            sums = sums.index_select(0, ukey)
            local, feat = ukey // self.d_sae, ukey % self.d_sae
        else:
            ukey, kinv = torch.unique(key, return_inverse=True)
            sums = torch.zeros(len(ukey), dtype=torch.float64, device=vals.device)
            sums.index_add_(0, kinv, vals)
            local, feat = ukey // self.d_sae, ukey % self.d_sae
        means = (sums / counts.index_select(0, local).double()).float()
        self._seq_chunks.append((uniq[local].cpu(), feat.cpu(), means.cpu()))

    def flush(self) -> None:
        """Merge buffered top-k candidates now (reading ``top_*`` does it too)."""
        self._top.flush()

    # ---- derived ------------------------------------------------------------------------------
    @property
    def top_val(self) -> torch.Tensor:
        """``[d_sae, top_k]``: each feature's largest activations, largest first (-inf: none)."""
        return self._top.tensors()[0]

    @property
    def top_seq(self) -> torch.Tensor:
        """``[d_sae, top_k]``: the sequence id of each top activation (-1: none)."""
        return self._top.tensors()[1]

    @property
    def top_pos(self) -> torch.Tensor:
        """``[d_sae, top_k]``: the token position of each top activation (-1: none)."""
        return self._top.tensors()[2]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n_tokens, 1)

    @property
    def var(self) -> torch.Tensor:
        n = max(self.n_tokens, 1)
        return (self.sumsq / n - self.mean.square()).clamp_min(0)

    @property
    def fire_rate(self) -> torch.Tensor:
        return self.fire.double() / max(self.n_tokens, 1)

    def sequence_means(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(seq_id, feature, mean)`` for every (sequence, feature) with a nonzero mean."""
        if not self.sequences:
            raise ValueError(
                "these statistics were collected without per-sequence means "
                "(StatsConfig.sequence_means=False); collect them again with it on"
            )
        if not self._seq_chunks:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty, torch.zeros(0)
        return tuple(torch.cat(parts) for parts in zip(*self._seq_chunks, strict=True))

    @property
    def seq_tokens(self) -> dict[int, int]:
        return dict(self._seq_tokens)

    # ---- merge / save -------------------------------------------------------------------------
    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another shard's statistics into this one (sequence ids must not overlap)."""
        if (other.d_sae, other.top_k, other.sequences) != (self.d_sae, self.top_k, self.sequences):
            raise ValueError("cannot merge statistics of different shapes or options")
        overlap = set(self._seq_tokens) & set(other._seq_tokens)
        if overlap:
            raise ValueError(f"shards share sequence ids, e.g. {sorted(overlap)[:3]}")
        self.n_tokens += other.n_tokens
        self.sum += other.sum.to(self.sum.device)
        self.sumsq += other.sumsq.to(self.sum.device)
        self.fire += other.fire.to(self.sum.device)
        self.max = torch.maximum(self.max, other.max.to(self.sum.device))
        self._seq_tokens.update(other._seq_tokens)
        self._seq_chunks.extend(other._seq_chunks)
        have = other.top_val > NEG
        f = torch.arange(self.d_sae, device=have.device)[:, None].expand_as(have)[have]
        self._top.offer(
            f.to(self.sum.device),
            other.top_val[have].to(self.sum.device),
            other.top_seq[have].to(self.sum.device),
            other.top_pos[have].to(self.sum.device),
        )
        return self

    def state(self) -> dict[str, torch.Tensor]:
        seq, feat, mean = (
            self.sequence_means()
            if self.sequences
            else (
                torch.zeros(0, dtype=torch.int64),
                torch.zeros(0, dtype=torch.int64),
                torch.zeros(0),
            )
        )
        ids = torch.tensor(sorted(self._seq_tokens), dtype=torch.int64)
        return {
            "sum": self.sum,
            "sumsq": self.sumsq,
            "fire": self.fire,
            "max": self.max,
            "top_val": self.top_val,
            "top_seq": self.top_seq,
            "top_pos": self.top_pos,
            "seq_id": seq,
            "seq_feature": feat,
            "seq_mean": mean,
            "seq_token_id": ids,
            "seq_token_count": torch.tensor(
                [self._seq_tokens[i] for i in ids.tolist()], dtype=torch.int64
            ),
            "n_tokens": torch.tensor([self.n_tokens], dtype=torch.int64),
        }

    def save(self, path: str | Path, meta: dict | None = None) -> Path:
        """safetensors file plus ``<path>.json`` with the shape and ``meta``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state().items()}
        save_file(tensors, str(path))
        info = {
            "d_sae": self.d_sae,
            "top_k": self.top_k,
            "sequences": self.sequences,
            "n_tokens": self.n_tokens,
            **(meta or {}),
        }
        path.with_name(path.name + ".json").write_text(json.dumps(info, indent=2))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> FeatureStats:
        path = Path(path)
        info = read_json(path.with_name(path.name + ".json"))
        t = load_safetensors(path, device=str(device), finite=False)  # top_val holds -inf
        return cls.from_state(t, info["d_sae"], info["top_k"], device, info.get("sequences", True))

    @classmethod
    def from_state(
        cls,
        t: dict[str, torch.Tensor],
        d_sae: int,
        top_k: int,
        device: str | torch.device = "cpu",
        sequences: bool = True,
    ) -> FeatureStats:
        """The statistics back from :meth:`state` (a saved file, another process's shard)."""
        t = {k: v.to(device) for k, v in t.items()}
        out = cls(d_sae, top_k, device=device, sequences=sequences)
        out.n_tokens = int(t["n_tokens"][0])
        for name in ("sum", "sumsq", "fire", "max"):
            setattr(out, name, t[name])
        out._top.set(t["top_val"], t["top_seq"], t["top_pos"])
        if len(t["seq_id"]):
            out._seq_chunks = [(t["seq_id"].cpu(), t["seq_feature"].cpu(), t["seq_mean"].cpu())]
        out._seq_tokens = dict(
            zip(t["seq_token_id"].tolist(), t["seq_token_count"].tolist(), strict=True)
        )
        return out


class ResidualStats:
    """Raw residual-stream statistics without a dictionary: mean vector and norm distribution."""

    BINS = torch.logspace(-3, 5, 161, dtype=torch.float64)  # norm histogram edges

    def __init__(self, d_model: int, device: str | torch.device = "cpu"):
        self.d_model, self.n_tokens = d_model, 0
        self.sum = torch.zeros(d_model, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(d_model, dtype=torch.float64, device=device)
        self.norm_hist = torch.zeros(len(self.BINS) + 1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add residual vectors ``x [N, d_model]``."""
        x = x.double()
        self.n_tokens += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += x.square().sum(0)
        idx = torch.bucketize(x.norm(dim=-1), self.BINS.to(x.device))
        self.norm_hist += torch.bincount(idx, minlength=len(self.norm_hist))

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.n_tokens, 1)

    def merge(self, other: ResidualStats) -> ResidualStats:
        self.n_tokens += other.n_tokens
        self.sum += other.sum.to(self.sum.device)
        self.sumsq += other.sumsq.to(self.sum.device)
        self.norm_hist += other.norm_hist.to(self.sum.device)
        return self

    def norm_quantile(self, q: float) -> float:
        """Approximate quantile of the token norms from the log-spaced histogram (bin upper edge)."""
        cdf = self.norm_hist.cumsum(0).double() / max(self.n_tokens, 1)
        i = int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64, device=cdf.device)))
        return float(self.BINS[min(i, len(self.BINS) - 1)])

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "sum": self.sum,
            "sumsq": self.sumsq,
            "norm_hist": self.norm_hist,
            "n_tokens": torch.tensor([self.n_tokens]),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state().items()}, str(path))
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ResidualStats:
        t = load_safetensors(path, device=str(device))
        out = cls(t["sum"].shape[0], device=device)
        out.sum, out.sumsq, out.norm_hist = t["sum"], t["sumsq"], t["norm_hist"]
        out.n_tokens = int(t["n_tokens"][0])
        return out
