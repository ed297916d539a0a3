"""The hot path: forward (cut at the last hook point) -> select tokens -> encode -> accumulate.

The hooks keep only the selected tokens of the batch at each layer; they are encoded and
accumulated as soon as the cut forward pass returns, so activations of a batch exist only while
that batch is processed; nothing grows with the number of tokens except the sparse per-sequence
means. What is read (layers, site, positions) is one :class:`ReadSpec`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from emdiff.dictionaries.base import SparseDictionary, check_fits
from emdiff.models.hooks import Site, residual_hooks, run_forward
from emdiff.models.read import ReadSpec, Row, gather, read_batches, require_tokens, selection
from emdiff.stats.features import FeatureStats, ResidualStats


class StatsConfig(BaseModel):
    """How the statistics pass runs (not what it reads: that is the :class:`ReadSpec`)."""

    batch_size: int = Field(8, ge=1)
    top_k: int = Field(16, ge=0)
    """Top activations kept per feature (with their sequence and position); 0: none."""
    sequence_means: bool = True
    """Keep each feature's mean over each sequence (the per-sequence tests of the diffs)."""
    shard_size: int = Field(256, ge=1)
    """Sequences per resumable shard (:func:`emdiff.stats.run.run_stats`)."""
    residual: bool = True
    """Also accumulate raw residual statistics (mean, variance) per layer."""
    progress: bool = False


def check_dictionaries(
    model: torch.nn.Module, dictionaries: Mapping[int, SparseDictionary], read: ReadSpec
) -> None:
    """Each of the spec's layers has a dictionary that fits the model's width, layer and site."""
    if sorted(dictionaries) != sorted(read.layers):
        raise ValueError(
            f"dictionaries for layers {sorted(dictionaries)} but the read spec names "
            f"{sorted(read.layers)}"
        )
    for layer, d in dictionaries.items():
        check_fits(d, model, layer, read.site)


@torch.no_grad()
def collect_stats(
    model: torch.nn.Module,
    rows: Sequence[Row],
    dictionaries: Mapping[int, SparseDictionary],
    read: ReadSpec,
    cfg: StatsConfig | None = None,
    seq_offset: int = 0,
) -> tuple[dict[int, FeatureStats], dict[int, ResidualStats]]:
    """Feature statistics per layer (and raw residual statistics) of ``rows`` read at ``read``.

    ``dictionaries`` maps each of ``read.layers`` to its dictionary; sequence ``i`` of ``rows``
    gets id ``seq_offset + i``. No rows, or no selected token in any row, raises an
    :class:`~emdiff.errors.InputError`; a NaN or infinity in the activations raises
    :class:`~emdiff.models.hooks.NonFiniteActivationError` naming layer, site and batch.
    """
    masks = selection(rows, read.positions, model)
    require_tokens(masks, read.positions, "collect_stats")
    return stats_pass(model, rows, masks, dictionaries, read, cfg, seq_offset)


def stats_pass(
    model: torch.nn.Module,
    rows: Sequence[Row],
    masks: Sequence[Sequence[bool]],
    dictionaries: Mapping[int, SparseDictionary],
    read: ReadSpec,
    cfg: StatsConfig | None = None,
    seq_offset: int = 0,
) -> tuple[dict[int, FeatureStats], dict[int, ResidualStats]]:
    """:func:`collect_stats` with the token selection given (a shard may select nothing)."""
    cfg = cfg or StatsConfig()
    check_dictionaries(model, dictionaries, read)
    device = next(model.parameters()).device
    d_model = model.config.get_text_config().hidden_size
    dictionaries = {layer: d.to(device) for layer, d in dictionaries.items()}
    feats = {
        layer: FeatureStats(d.d_sae, cfg.top_k, device, cfg.sequence_means)
        for layer, d in dictionaries.items()
    }
    resid = (
        {layer: ResidualStats(d_model, device) for layer in dictionaries} if cfg.residual else {}
    )
    state: dict = {}
    read_now: dict[int, tuple[torch.Tensor, ...]] = {}

    def on_hidden(layer: int, _site: Site, hidden: torch.Tensor) -> None:
        read_now[layer] = gather(hidden, state["batch"], read, layer)

    batches = read_batches(rows, masks, cfg.batch_size, seq_offset, device)
    n = -(-len(rows) // cfg.batch_size)
    with residual_hooks(model, read.points(model), on_hidden):
        for batch in tqdm(batches, total=n, desc="stats", unit="batch", disable=not cfg.progress):
            state["batch"] = batch
            run_forward(model, batch.ids, batch.att)
            # encode once the (cut) forward pass is done: the selected rows of this batch only,
            # and the dictionaries' weights do not push the model's out of the cache mid-pass
            for layer, (x, seq, pos) in read_now.items():
                x = x.to(device)  # a model split over GPUs (device_map) reads layers elsewhere
                if cfg.residual:
                    resid[layer].update(x)
                entries = dictionaries[layer].encode_entries(x)  # no dense codes
                feats[layer].update_entries(len(x), entries, seq, pos)
            read_now.clear()
    for f in feats.values():
        f.flush()
    return feats, resid
