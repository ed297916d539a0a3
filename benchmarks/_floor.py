"""What the stats-pass benchmarks share: device timing and the three paths a ratio is built from.

    (a) the forward pass cut at the last hook point (same hooks, doing nothing)
    (e) the bare dictionary encode of the selected activations (captured once, outside the timing)
    (b) emdiff's stats pass (``collect_stats``)

``stats_over_floor = b / (a + e)``: how much the stats pass costs beyond reading the activations
and encoding them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from emdiff.data.masks import EncodedChat
from emdiff.models.hooks import capture_residuals, hook_points, residual_hooks, run_forward
from emdiff.models.read import ReadSpec
from emdiff.stats.collect import StatsConfig, collect_stats


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call, with the device synchronised on both sides."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def fastest(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Fastest of ``repeats`` calls after one warm-up, in seconds."""
    fn()
    return min(timed(fn, device) for _ in range(repeats))


def floor_paths(
    model: torch.nn.Module,
    rows: list[EncodedChat],
    dicts: dict,
    read: ReadSpec,
    cfg: StatsConfig,
    out: dict,
) -> dict[str, Callable[[], None]]:
    """The (a), (e) and (b) paths over ``rows`` at ``read``'s layers and site; (b) leaves its
    statistics in ``out["b"]``. Batches are ``cfg.batch_size`` rows, as the stats pass reads."""
    layers, site = list(read.layers), read.site
    dev = str(next(model.parameters()).device)
    points = hook_points(model, layers, site)
    batches = [rows[s : s + cfg.batch_size] for s in range(0, len(rows), cfg.batch_size)]
    ids = [torch.tensor([r.input_ids for r in b], device=dev) for b in batches]
    masks = [torch.tensor([r.mask() for r in b], device=dev) for b in batches]
    selected = []
    for i, m in zip(ids, masks, strict=True):
        cap = capture_residuals(model, i, layers=layers, sites=site)
        selected.append({L: cap[(L, site)][m] for L in layers})

    def a() -> None:
        with torch.no_grad(), residual_hooks(model, points, lambda *_: None):
            for i in ids:
                run_forward(model, i)

    def e() -> None:
        with torch.no_grad():
            for sel in selected:
                for L, d in dicts.items():
                    d.encode(sel[L])

    def b() -> None:
        out["b"] = collect_stats(model, rows, dicts, read, cfg)[0]

    return {"a": a, "e": e, "b": b}


def selected_tokens(rows: list[EncodedChat]) -> int:
    """How many tokens the stats pass reads (the rows' masks)."""
    return int(sum(sum(r.mask()) for r in rows))
