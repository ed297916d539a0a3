"""Where to read: one small spec (layers, site, token positions, dictionary) and its batches.

Every pass that reads a model (the statistics pass, activations for dictionary training, the
reconstruction splice) takes a :class:`ReadSpec` instead of separate keywords, and every result
records it, so a reader always knows what was read. :func:`read_batches` turns rows into padded
batches with the positions' static selection; :func:`selected` adds the run-time part (non-finite
check, attention sinks) inside the hook.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field

from emdiff.data.masks import EncodedChat, pad_batch
from emdiff.data.positions import Positions
from emdiff.errors import InputError
from emdiff.models.hooks import SINK_FACTOR, Site, check_activations, hook_points, sink_mask

Row = EncodedChat | Sequence[int]
"""A chat with token roles, or plain token ids (pretraining text: only ``positions="all"``)."""


class ReadSpec(BaseModel):
    """What a pass reads: decoder layer(s), hook site, token positions, and through which
    dictionary (its path or published id; None when raw activations are read)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: tuple[Annotated[int, Field(ge=0)], ...] = Field(min_length=1)
    """Decoder layer numbers, 0-based (count negative ones with ``check_layer`` first)."""
    site: Site = "resid_post"
    positions: Positions = Positions()
    dictionary: str | None = None

    @property
    def layer(self) -> int:
        """The one layer of a single-layer spec."""
        if len(self.layers) != 1:
            raise InputError(f"this pass reads one layer; the read spec names {self.layers}")
        return self.layers[0]

    def points(self, model: torch.nn.Module) -> list[tuple[int, Site]]:
        """The validated ``(layer, site)`` hook points in execution order."""
        return hook_points(model, list(self.layers), self.site)

    def at(self, layer: int) -> ReadSpec:
        """The same spec at one layer."""
        return self.model_copy(update={"layers": (layer,)})

    def describe(self) -> str:
        """``layer 3 mlp_out, positions answer, through ./sae``: for logs and titles."""
        layers = ", ".join(map(str, self.layers))
        via = f", through {self.dictionary}" if self.dictionary else ""
        return f"layer {layers} {self.site}, positions {self.positions}{via}"


@dataclass
class Batch:
    """Padded rows with the positions' static selection and each token's (sequence, position)."""

    ids: torch.Tensor
    att: torch.Tensor
    sel: torch.Tensor
    """``[B, T]`` bool: selected by the positions (before sinks are removed)."""
    seq: torch.Tensor
    pos: torch.Tensor
    label: str
    """``"3 (sequences 24..31)"``: names the batch in errors."""
    index: torch.Tensor
    """Flat indices (into ``B * T``) of the selected tokens, in row-major order."""


def _bos(model: torch.nn.Module) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    return getattr(config or model.config, "bos_token_id", None)


def selection(
    rows: Sequence[Row], positions: Positions, model: torch.nn.Module
) -> list[list[bool]]:
    """Per row, per token: selected by ``positions`` (BOS, by the model's ``bos_token_id``, out)."""
    bos = _bos(model)
    return [positions.mask(r, bos_token_id=bos) for r in rows]


def require_tokens(masks: Sequence[Sequence[bool]], positions: Positions, what: str) -> None:
    """Refuse a pass that would select no token at all (names ``what`` and the positions)."""
    if not masks:
        raise InputError(f"{what}: no rows given: nothing to compute")
    if not any(any(m) for m in masks):
        raise InputError(
            f"{what}: no {positions} token selected in any of {len(masks)} rows: nothing to "
            "compute (check the rows' roles, the chat template and the positions)"
        )


def read_batches(
    rows: Sequence[Row],
    masks: Sequence[Sequence[bool]],
    batch_size: int,
    seq_offset: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[Batch]:
    """Right-padded batches of ``rows`` (sequence ``i`` has id ``seq_offset + i``)."""
    for b, s in enumerate(range(0, len(rows), batch_size)):
        chunk = rows[s : s + batch_size]
        ids, att = pad_batch([_ids(r) for r in chunk], 0, side="right")
        sel, _ = pad_batch([[int(k) for k in m] for m in masks[s : s + batch_size]], 0, "right")
        seq = torch.arange(seq_offset + s, seq_offset + s + len(chunk))[:, None].expand_as(ids)
        pos = torch.arange(ids.shape[1])[None].expand_as(ids)
        last = seq_offset + s + len(chunk) - 1
        sel = sel.bool().to(device)
        yield Batch(
            ids.to(device),
            att.to(device),
            sel,
            seq.to(device),
            pos.to(device),
            f"{b} (sequences {seq_offset + s}..{last})",
            sel.flatten().nonzero().squeeze(1),
        )


def selected(hidden: torch.Tensor, batch: Batch, read: ReadSpec, layer: int | str) -> torch.Tensor:
    """The final ``[B, T]`` selection inside a hook: a NaN or infinity among the selected tokens
    stops the run (naming layer, site and batch); attention sinks go out unless kept."""
    sel = batch.sel
    check_activations(hidden[sel], layer, batch.label, read.site)
    if read.positions.exclude_sinks:
        sel = sel & ~sink_mask(hidden, sel, SINK_FACTOR)
    return sel


def gather(
    hidden: torch.Tensor, batch: Batch, read: ReadSpec, layer: int | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, seq, pos)`` of the selected tokens inside a hook: one gather of the selected rows,
    a NaN or infinity among them stops the run (naming layer, site and batch), and attention
    sinks (norm above 10x the median of the selected tokens) go out unless kept. The same
    selection as :func:`selected`, cheaper when the whole tensor is not needed."""
    x = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.index)
    check_activations(x, layer, batch.label, read.site)
    seq = batch.seq.reshape(-1).index_select(0, batch.index)
    pos = batch.pos.reshape(-1).index_select(0, batch.index)
    if read.positions.exclude_sinks and len(x):
        norms = x.float().norm(dim=-1)
        keep = norms <= SINK_FACTOR * norms.median()
        x, seq, pos = x[keep], seq[keep], pos[keep]
    return x, seq, pos


def _ids(row: Row) -> list[int]:
    return row.input_ids if isinstance(row, EncodedChat) else list(row)
