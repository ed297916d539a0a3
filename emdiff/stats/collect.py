"""The hot path: forward (cut at the last hooked layer) -> select tokens -> encode -> accumulate.

The dictionary encode and the statistics run inside the layer hook, so activations of a batch
exist only while that batch is processed; nothing grows with the number of tokens except the
sparse per-sequence means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from emdiff.data.masks import EncodedChat, TokenRole, pad_batch, role_names
from emdiff.dictionaries.base import SparseDictionary, check_fits
from emdiff.errors import InputError
from emdiff.models.hooks import (
    Site,
    check_activations,
    hook_points,
    residual_hooks,
    run_forward,
    sink_mask,
)
from emdiff.stats.features import FeatureStats, ResidualStats


def selection_mask(
    rows: Sequence[EncodedChat],
    roles: Sequence[TokenRole] = (TokenRole.ASSISTANT,),
    bos_token_id: int | None = None,
) -> list[list[bool]]:
    """Per token: selected for statistics (a wanted role, and not BOS)."""
    out = []
    for r in rows:
        m = r.mask(*roles)
        out.append([keep and t != bos_token_id for keep, t in zip(m, r.input_ids, strict=True)])
    return out


@torch.no_grad()
def collect_stats(
    model: torch.nn.Module,
    rows: Sequence[EncodedChat],
    dictionaries: Mapping[int, SparseDictionary],
    *,
    site: Site = "resid_post",
    roles: Sequence[TokenRole] = (TokenRole.ASSISTANT,),
    bos_token_id: int | None = None,
    pad_token_id: int = 0,
    batch_size: int = 8,
    top_k: int = 16,
    exclude_sinks: bool = True,
    sink_factor: float = 10.0,
    residual: bool = True,
    seq_offset: int = 0,
    ignore_layer: bool = False,
    progress: bool = False,
    require_tokens: bool = True,
) -> tuple[dict[int, FeatureStats], dict[int, ResidualStats]]:
    """Feature statistics per layer (and raw residual statistics) over ``rows``.

    ``dictionaries`` maps layer -> dictionary; sequence ``i`` of ``rows`` gets id
    ``seq_offset + i``. Returns ``({layer: FeatureStats}, {layer: ResidualStats})``.
    No rows, or (with ``require_tokens``) no selected token in any row, raises an
    :class:`~emdiff.errors.InputError`; a NaN or infinity in the activations read at a layer
    raises :class:`~emdiff.models.hooks.NonFiniteActivationError` naming layer, site and batch.
    """
    masks = selection_mask(rows, roles, bos_token_id)
    if not rows:
        raise InputError("collect_stats: no rows given: nothing to compute")
    if require_tokens and not any(any(m) for m in masks):
        raise InputError(
            f"collect_stats: no {role_names(roles)} token selected in any of {len(rows)} rows: "
            "nothing to compute (check the rows' roles and the chat template)"
        )
    device = next(model.parameters()).device
    d_model = model.config.get_text_config().hidden_size
    for layer, d in dictionaries.items():
        check_fits(d, d_model, layer, site, ignore_layer=ignore_layer)
    dictionaries = {layer: d.to(device) for layer, d in dictionaries.items()}
    points = hook_points(model, list(dictionaries), site)
    feats = {layer: FeatureStats(d.d_sae, top_k, device) for layer, d in dictionaries.items()}
    resid = {layer: ResidualStats(d_model, device) for layer in dictionaries} if residual else {}
    state: dict = {}

    def on_hidden(layer: int, _site: Site, hidden: torch.Tensor) -> None:
        sel = state["mask"]
        check_activations(hidden[sel], layer, state["batch"], _site)  # NaN stops here, named
        if exclude_sinks:
            sel = sel & ~sink_mask(hidden, sel, sink_factor)
        x = hidden[sel]
        if residual:
            resid[layer].update(x)
        acts = dictionaries[layer].encode(x)
        feats[layer].update(acts, state["seq"][sel], state["pos"][sel])

    starts = range(0, len(rows), batch_size)
    with residual_hooks(model, points, on_hidden):
        for s in tqdm(starts, desc="stats", unit="batch", disable=not progress):
            chunk = rows[s : s + batch_size]
            ids, att = pad_batch([r.input_ids for r in chunk], pad_token_id, side="right")
            mask, _ = pad_batch(
                [[int(b) for b in m] for m in masks[s : s + batch_size]], 0, "right"
            )
            seq = torch.arange(seq_offset + s, seq_offset + s + len(chunk))[:, None].expand_as(ids)
            pos = torch.arange(ids.shape[1])[None].expand_as(ids)
            state.update(mask=mask.bool().to(device), seq=seq.to(device), pos=pos.to(device))
            last = seq_offset + s + len(chunk) - 1
            state["batch"] = f"{s // batch_size} (sequences {seq_offset + s}..{last})"
            run_forward(model, ids.to(device), att.to(device))
    return feats, resid
