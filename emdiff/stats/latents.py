"""Every token's activation of a few chosen latents: what feature cards are built from.

:func:`scan_latents` runs the statistics pass's cut forward pass, hooks and batches over a whole
dataset and keeps, per chosen latent: its nonzero activations at the read tokens (for a
histogram), the number of read tokens, the strongest read token of each sequence (a top-k over
sequences, so no sequence shows twice) and the sequences where it fires at no token at all
(contrastive negatives). :func:`token_activations` returns every token's activation for a
handful of rows, to shade their contexts.

Tokens the statistics leave out by default read 0 here: BOS and, unless the positions keep them,
attention sinks. A sink is a token whose norm exceeds 10x the median of its own sequence's
tokens, decided per sequence, so the values do not depend on how rows were batched.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from emdiff.data.masks import EncodedChat
from emdiff.dictionaries.base import SparseDictionary
from emdiff.models.hooks import SINK_FACTOR, Site, check_activations, residual_hooks, run_forward
from emdiff.models.read import Batch, ReadSpec, Row, read_batches, require_tokens, selection
from emdiff.stats.collect import check_dictionaries
from emdiff.stats.topk import TopK

ENCODE_CHUNK = 4096
"""Tokens encoded at once (bounds the ``[tokens, d_sae]`` code matrix)."""


@dataclass
class LatentScan:
    """What one pass over a dataset keeps of the chosen latents of one layer (column ``j`` of
    each tensor is ``latents[j]``)."""

    layer: int
    latents: list[int]
    n_tokens: int
    """Read tokens (selected by the positions, BOS and sinks out)."""
    values: list[torch.Tensor]
    """Per latent, its nonzero activations at the read tokens (float32, CPU)."""
    top_val: torch.Tensor
    """``[n, k]``: per latent, the largest read activation of each of its top sequences, largest
    first (-inf: fewer sequences fired)."""
    top_seq: torch.Tensor
    top_pos: torch.Tensor
    silent: torch.Tensor
    """``[n_rows, n]`` bool: the latent is 0 at every shown token of the row."""
    row_max: torch.Tensor
    """``[n_rows, n]``: the latent's largest activation at the row's read tokens (-inf: none
    read), for contrast contexts when it is silent in too few rows."""


def _bos_id(model: torch.nn.Module) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    return getattr(config or model.config, "bos_token_id", None)


def _shown(
    hidden: torch.Tensor, batch: Batch, first_special: torch.Tensor, bos, sinks: bool
) -> torch.Tensor:
    """``[B, T]``: real tokens that are not BOS (nor, with ``sinks``, a sink of their row)."""
    real = batch.att.bool().clone()
    if bos is not None:
        real &= batch.ids != bos
    real[:, 0] &= ~first_special.to(real.device)
    if sinks:
        norms = hidden.float().norm(dim=-1)
        median = norms.masked_fill(~real, float("nan")).nanmedian(dim=1).values
        real &= ~(norms > SINK_FACTOR * median[:, None])
    return real


def _encode(d: SparseDictionary, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Columns ``idx`` of ``d.encode(x)`` (``x [N, d_in]``), chunk by chunk; float32."""
    parts = [
        d.encode(x[s : s + ENCODE_CHUNK])[:, idx].float() for s in range(0, len(x), ENCODE_CHUNK)
    ]
    return torch.cat(parts) if parts else x.new_zeros((0, len(idx)), dtype=torch.float32)


def latent_batches(
    model: torch.nn.Module,
    rows: Sequence[Row],
    masks: Sequence[Sequence[bool]],
    dictionaries: Mapping[int, SparseDictionary],
    read: ReadSpec,
    latents: Mapping[int, Sequence[int]],
    batch_size: int = 8,
    progress: bool = False,
) -> Iterator[tuple[Batch, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]]:
    """Per batch of rows: ``{layer: (acts [B, T, n], read [B, T], shown [B, T])}``, with ``acts``
    the chosen latents' activation at every shown token (0 elsewhere), ``read`` the tokens the
    positions select among the shown ones."""
    check_dictionaries(model, dictionaries, read)
    device = next(model.parameters()).device
    dicts = {layer: dictionaries[layer].to(device) for layer in latents}
    idx = {
        layer: torch.tensor(list(ls), dtype=torch.long, device=device)
        for layer, ls in latents.items()
    }
    bos = _bos_id(model)
    first = torch.tensor(
        [isinstance(r, EncodedChat) and bool(r.special and r.special[0]) for r in rows]
    )
    hidden_now: dict[int, torch.Tensor] = {}
    points = [(layer, site) for layer, site in read.points(model) if layer in latents]

    def keep(layer: int, _site: Site, hidden: torch.Tensor) -> None:
        hidden_now[layer] = hidden.detach()

    n = -(-len(rows) // batch_size)
    batches = read_batches(rows, masks, batch_size, 0, device)
    with residual_hooks(model, points, keep):
        for batch in tqdm(batches, total=n, desc="cards", unit="batch", disable=not progress):
            run_forward(model, batch.ids, batch.att)
            out = {}
            start = int(batch.seq[0, 0])
            for layer, hidden in hidden_now.items():
                check_activations(hidden[batch.att.bool()], layer, batch.label, read.site)
                own = first[start : start + len(batch.ids)]
                shown = _shown(hidden, batch, own, bos, read.positions.exclude_sinks)
                acts = hidden.new_zeros((*shown.shape, len(idx[layer])), dtype=torch.float32)
                acts[shown] = _encode(dicts[layer], hidden[shown], idx[layer])
                out[layer] = (acts, batch.sel & shown, shown)
            hidden_now.clear()
            yield batch, out


@torch.no_grad()
def scan_latents(
    model: torch.nn.Module,
    rows: Sequence[Row],
    dictionaries: Mapping[int, SparseDictionary],
    read: ReadSpec,
    latents: Mapping[int, Sequence[int]],
    top_k: int = 20,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[int, LatentScan]:
    """One pass over ``rows`` (sequence ``i`` is row ``i``) keeping what cards need of
    ``latents[layer]`` at each layer; an :class:`~emdiff.errors.InputError` when no token is
    read."""
    masks = selection(rows, read.positions, model)
    require_tokens(masks, read.positions, "feature cards")
    n_tokens = dict.fromkeys(latents, 0)
    found: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in latents}
    top = {layer: TopK(len(ls), top_k) for layer, ls in latents.items()}
    fired = {
        layer: torch.zeros(len(rows), len(ls), dtype=torch.bool) for layer, ls in latents.items()
    }
    row_max = {
        layer: torch.full((len(rows), len(ls)), float("-inf")) for layer, ls in latents.items()
    }
    for batch, per_layer in latent_batches(
        model, rows, masks, dictionaries, read, latents, batch_size, progress
    ):
        seq = batch.seq[:, 0].cpu()
        for layer, (acts, read_mask, shown) in per_layer.items():
            acts, read_mask, shown = acts.cpu(), read_mask.cpu(), shown.cpu()
            at_read = acts[read_mask]
            n_tokens[layer] += len(at_read)
            tok, col = at_read.nonzero(as_tuple=True)
            found[layer].append((col, at_read[tok, col]))
            best, where = acts.masked_fill(~read_mask[..., None], float("-inf")).max(dim=1)
            b, j = (best > 0).nonzero(as_tuple=True)
            top[layer].offer(j, best[b, j], seq[b], where[b, j])
            fired[layer][seq] = ((acts != 0) & shown[..., None]).any(dim=1)
            row_max[layer][seq] = best
    scans = {}
    for layer, ls in latents.items():
        cols = torch.cat([c for c, _ in found[layer]]) if found[layer] else torch.zeros(0)
        vals = torch.cat([v for _, v in found[layer]]) if found[layer] else torch.zeros(0)
        val, s, p = top[layer].tensors()
        scans[layer] = LatentScan(
            layer,
            list(ls),
            n_tokens[layer],
            [vals[cols == j] for j in range(len(ls))],
            val,
            s,
            p,
            ~fired[layer],
            row_max[layer],
        )
    return scans


@torch.no_grad()
def token_activations(
    model: torch.nn.Module,
    rows: Sequence[Row],
    dictionaries: Mapping[int, SparseDictionary],
    read: ReadSpec,
    latents: Mapping[int, Sequence[int]],
    batch_size: int = 8,
) -> list[dict[int, torch.Tensor]]:
    """Per row, ``{layer: [len(row), n]}``: every token's activation of the chosen latents
    (float32, CPU; 0 at BOS and sinks as in :func:`scan_latents`)."""
    masks = [[False] * len(r.input_ids if isinstance(r, EncodedChat) else r) for r in rows]
    out: list[dict[int, torch.Tensor]] = []
    for batch, per_layer in latent_batches(
        model, rows, masks, dictionaries, read, latents, batch_size
    ):
        lengths = batch.att.sum(dim=1).tolist()
        for i, n in enumerate(lengths):
            out.append({layer: acts[i, :n].cpu() for layer, (acts, _, _) in per_layer.items()})
    return out
