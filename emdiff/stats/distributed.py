"""Statistics over a dataset split across processes (``torchrun``), merged with
``torch.distributed``.

Under an initialised process group (``torchrun --nproc-per-node N script.py`` and
``torch.distributed.init_process_group``; gloo on CPU, nccl on GPUs), :func:`collect_stats_sharded`
gives each rank a contiguous run of whole batches (the batches a single process would form, so
per-batch choices such as attention-sink thresholds are the same), then every rank ends with the
statistics of the whole dataset: sums, squares, firing counts and token counts all-reduced (SUM),
maxima all-reduced (MAX), and the sparse parts (top-k contexts, per-sequence means) all-gathered
and merged in rank order. Counts and maxima equal a single process's exactly; sums agree to the
last bits of float64. Without a process group it is :func:`~emdiff.stats.collect.collect_stats`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from emdiff.dictionaries.base import SparseDictionary
from emdiff.models.read import ReadSpec, Row, require_tokens, selection
from emdiff.stats.collect import StatsConfig, collect_stats, stats_pass
from emdiff.stats.features import FeatureStats, ResidualStats


def rank_world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_shard(n_rows: int, batch_size: int, rank: int, world: int) -> slice:
    """The rows of ``rank``: a contiguous run of whole batches of ``batch_size``."""
    n_batches = -(-n_rows // batch_size)
    lo, hi = rank * n_batches // world, (rank + 1) * n_batches // world
    return slice(min(lo * batch_size, n_rows), min(hi * batch_size, n_rows))


def _reduce(t: torch.Tensor, op) -> torch.Tensor:
    """``t`` all-reduced on the process group's device (nccl needs CUDA tensors)."""
    device = torch.device("cuda", torch.cuda.current_device()) if _nccl() else t.device
    x = t.to(device).clone()
    dist.all_reduce(x, op=op)
    return x.to(t.device)


def _nccl() -> bool:
    return dist.get_backend() == "nccl"


def all_reduce_features(f: FeatureStats) -> FeatureStats:
    """Every rank's shard of one layer's statistics merged into the whole (on every rank)."""
    parts: list = [None] * dist.get_world_size()
    sparse = {k: v.cpu() for k, v in f.state().items() if k.startswith(("top_", "seq_"))}
    dist.all_gather_object(parts, sparse)
    shape = (f.d_sae, f.top_k)
    out = FeatureStats(*shape, device=f.sum.device, sequences=f.sequences)
    empty = FeatureStats(*shape, sequences=f.sequences).state()
    for part in parts:  # rank order, as a single process would have met the sequences
        shard = FeatureStats.from_state({**empty, **part}, *shape, sequences=f.sequences)
        out.merge(shard)
    out.n_tokens = int(_reduce(torch.tensor([f.n_tokens]), dist.ReduceOp.SUM))
    out.sum, out.sumsq = _reduce(f.sum, dist.ReduceOp.SUM), _reduce(f.sumsq, dist.ReduceOp.SUM)
    out.fire = _reduce(f.fire, dist.ReduceOp.SUM)
    out.max = _reduce(f.max, dist.ReduceOp.MAX)
    return out


def all_reduce_residual(r: ResidualStats) -> ResidualStats:
    """Every rank's raw residual statistics of one layer summed (on every rank)."""
    out = ResidualStats(r.d_model, device=r.sum.device)
    out.n_tokens = int(_reduce(torch.tensor([r.n_tokens]), dist.ReduceOp.SUM))
    out.sum, out.sumsq = _reduce(r.sum, dist.ReduceOp.SUM), _reduce(r.sumsq, dist.ReduceOp.SUM)
    out.norm_hist = _reduce(r.norm_hist, dist.ReduceOp.SUM)
    return out


def collect_stats_sharded(
    model: torch.nn.Module,
    rows: Sequence[Row],
    dictionaries: Mapping[int, SparseDictionary],
    read: ReadSpec,
    cfg: StatsConfig | None = None,
) -> tuple[dict[int, FeatureStats], dict[int, ResidualStats]]:
    """:func:`~emdiff.stats.collect.collect_stats` with the rows split across the ranks of the
    process group (see the module docstring); every rank returns the whole statistics."""
    rank, world = rank_world()
    if world == 1:
        return collect_stats(model, rows, dictionaries, read, cfg)
    cfg = cfg or StatsConfig()
    masks = selection(rows, read.positions, model)
    require_tokens(masks, read.positions, "collect_stats")  # every rank sees the same rows
    s = batch_shard(len(rows), cfg.batch_size, rank, world)
    feats, resid = stats_pass(
        model, rows[s], masks[s], dictionaries, read, cfg, seq_offset=s.start or 0
    )
    feats = {layer: all_reduce_features(feats[layer]) for layer in sorted(feats)}
    resid = {layer: all_reduce_residual(resid[layer]) for layer in sorted(resid)}
    return feats, resid
