"""Per-token LoRA scalars ``A_i . x``: when each rank of each adapted module fires.

Read with forward hooks on the adapter's ``lora_A`` layers (the value the adapter multiplies B
by, before ``scaling``), at the positions of a read spec, for any rows the read machinery takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from emdiff.data.positions import Positions
from emdiff.errors import InputError
from emdiff.lora.adapters import LoraModule, lora_modules
from emdiff.models.hooks import run_forward
from emdiff.models.read import Row, read_batches, require_tokens, selection


def _a_layers(model: nn.Module, modules: Sequence[LoraModule]) -> list[nn.Module]:
    by_name = dict(model.named_modules())
    out = []
    for m in modules:
        lora_a = by_name[m.name].lora_A
        active = getattr(by_name[m.name], "active_adapters", list(lora_a))
        out.append(lora_a[active[0]])
    return out


@torch.no_grad()
def lora_scalars(
    model: nn.Module,
    rows: Sequence[Row],
    positions: Positions,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[pd.DataFrame, list[str]]:
    """One row per selected token: ``seq``, ``pos`` and one column per (module, rank), named by
    :meth:`LoraModule.label` (``L1.down_proj[0]``); returns the frame and the scalar columns."""
    modules = lora_modules(model)
    layers = _a_layers(model, modules)
    cols = [m.label(i) for m in modules for i in range(m.rank)]
    masks = selection(rows, positions, model)
    require_tokens(masks, positions, "lora_scalars")
    device = next(model.parameters()).device
    seen: list[torch.Tensor | None] = [None] * len(layers)
    parts, seqs, poss = [], [], []

    def keep(i: int):
        def hook(_module, _inputs, output):
            seen[i] = output.detach()

        return hook

    with ExitStack() as stack:
        for i, layer in enumerate(layers):
            stack.callback(layer.register_forward_hook(keep(i)).remove)
        for batch in tqdm(
            read_batches(rows, masks, batch_size, 0, device),
            total=-(-len(rows) // batch_size),
            desc="LoRA scalars",
            disable=not progress,
        ):
            run_forward(model, batch.ids, batch.att)
            flat = [s.reshape(-1, s.shape[-1]).index_select(0, batch.index) for s in seen]
            parts.append(torch.cat(flat, dim=1).float().cpu())
            seqs.append(batch.seq.reshape(-1).index_select(0, batch.index).cpu())
            poss.append(batch.pos.reshape(-1).index_select(0, batch.index).cpu())
    values = torch.cat(parts).numpy()
    frame = pd.DataFrame(values, columns=cols)
    frame.insert(0, "pos", torch.cat(poss).numpy())
    frame.insert(0, "seq", torch.cat(seqs).numpy())
    return frame, cols


def per_row(frame: pd.DataFrame, cols: Sequence[str], n_rows: int) -> np.ndarray:
    """``[n_rows, len(cols)]``: each row's mean scalar over its selected tokens (NaN-free: a row
    with no selected token stops with its index)."""
    means = frame.groupby("seq")[list(cols)].mean()
    missing = sorted(set(range(n_rows)) - set(means.index))
    if missing:
        raise InputError(f"lora scalars: rows {missing[:5]} have no selected token")
    return means.reindex(range(n_rows)).to_numpy()
