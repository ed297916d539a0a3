"""Activations for dictionary training, read through the capture hooks.

Two ways to feed a trainer, one interface (:class:`ActivationSource`: numbered chunks of
``[n, ...]`` activations, cut into shuffled batches by :func:`iter_batches`):

- :class:`TensorSource` holds activations already in memory (a few million tokens of a small
  model, or a cache) as a single chunk.
- :class:`ModelSource` runs the model on a fixed, seeded order of rows, ``chunk_rows`` sequences
  per chunk, and keeps only the selected tokens of the current chunk. Its chunks are a pure
  function of the chunk number, so a resumed training run recomputes exactly the chunk it was in.

Paired activations (a base and a fine-tuned model at the same tokens, for crosscoders) come out as
``[n, 2, d]``: pass ``other="adapter"`` with a PEFT model (adapter off = base, on = fine-tune) or
a second model as ``other``. What is read (layer, site, positions) is one :class:`ReadSpec`. Non-finite activations stop the run with the layer and batch named.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from emdiff.errors import InputError
from emdiff.models.hooks import (  # NonFiniteActivationError is re-exported
    NonFiniteActivationError,  # noqa: F401
    Site,
    check_activations,
    residual_hooks,
    run_forward,
)
from emdiff.models.load import adapter_state
from emdiff.models.read import ReadSpec, Row, read_batches, require_tokens, selected, selection

Other = torch.nn.Module | Literal["adapter"] | None
"""The second side of paired activations: another model, or ``"adapter"`` (the same PEFT model
with its adapter off = side 0 and on = side 1)."""


def check_finite(
    x: torch.Tensor, layer: int | str | None, batch: int | str, site: str | None = None
) -> None:
    """Raise :class:`NonFiniteActivationError` when ``x`` holds NaN or Inf (names layer, batch)."""
    check_activations(x, layer, batch, site)


def _width(model: torch.nn.Module) -> int:
    return model.config.get_text_config().hidden_size


def _sides(model: torch.nn.Module, other: Other) -> list[tuple[torch.nn.Module, bool | None]]:
    if other is None:
        return [(model, None)]
    if isinstance(other, str):
        if other != "adapter":
            raise ValueError(f"other must be a model or 'adapter', got {other!r}")
        return [(model, False), (model, True)]
    if _width(other) != _width(model):
        raise ValueError(
            f"paired activations need models of the same width: {_width(model)} vs {_width(other)}"
        )
    return [(model, None), (other, None)]


@torch.no_grad()
def collect_activations(
    model: torch.nn.Module,
    rows: Sequence[Row],
    read: ReadSpec,
    *,
    other: Other = None,
    batch_size: int = 32,
    seq_offset: int = 0,
    progress: bool = False,
    require: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 activations of the selected tokens of ``rows`` at ``read`` (one layer).

    Tokens are selected by ``read.positions`` (plain id rows: every token but BOS), minus
    attention sinks unless the positions keep them. Returns ``(acts, keys)``: ``acts`` is
    ``[n, d]``, or ``[n, 2, d]`` with ``other`` (index 0: ``model``, or its adapter off;
    index 1: ``other``, or its adapter on); ``keys`` is ``[n, 2]`` (sequence id, position).
    """
    layer = read.layer
    masks = selection(rows, read.positions, model)
    if require:
        require_tokens(masks, read.positions, "collect_activations")
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    keys: list[torch.Tensor] = []
    n = -(-len(rows) // batch_size)
    batches = read_batches(rows, masks, batch_size, seq_offset, device)
    for batch in tqdm(batches, total=n, desc=f"activations L{layer}", disable=not progress):
        per_side = [_hidden(m, batch, read, adapter) for m, adapter in _sides(model, other)]
        sel = selected(per_side[0], batch, read, layer)
        for h in per_side[1:]:
            check_finite(h[batch.sel], layer, batch.label, read.site)
        acts = [h[sel].float() for h in per_side]
        out.append(acts[0] if len(acts) == 1 else torch.stack(acts, dim=1))
        keys.append(torch.stack([batch.seq[sel], batch.pos[sel]], 1))
    acts = torch.cat(out).cpu()
    if not len(acts) and require:
        raise InputError(
            f"collect_activations: no {read.positions} token left in any of {len(rows)} rows "
            "once attention sinks are excluded: nothing to read"
        )
    return acts, torch.cat(keys).cpu()


def _hidden(model: torch.nn.Module, batch, read: ReadSpec, adapter: bool | None) -> torch.Tensor:
    got: dict[str, torch.Tensor] = {}

    def keep(_layer: int, _site: Site, hidden: torch.Tensor) -> None:
        got["h"] = hidden

    with residual_hooks(model, read.points(model), keep):
        if adapter is None:
            run_forward(model, batch.ids, batch.att)
        else:
            with adapter_state(model, adapter):
                run_forward(model, batch.ids, batch.att)
    return got["h"]


# ---- sources and batches --------------------------------------------------------------------
class ActivationSource:
    """Numbered chunks of activations; chunk ``c`` must always be the same tensor. ``read`` says
    where they were read (None when unknown); trainers record it in the dictionary."""

    n_chunks: int
    width: int
    read: ReadSpec | None = None

    def chunk(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, n: int) -> torch.Tensor:
        """About ``n`` activations from the first chunks (for initialisation)."""
        parts, total = [], 0
        for c in range(self.n_chunks):
            parts.append(self.chunk(c))
            total += len(parts[-1])
            if total >= n:
                break
        return torch.cat(parts)[:n]


class TensorSource(ActivationSource):
    """Activations already in memory: ``[n, d]`` or paired ``[n, 2, d]``."""

    def __init__(
        self, acts: torch.Tensor, name: str = "tensor", read: ReadSpec | None = None
    ) -> None:
        check_finite(acts, name, "all")
        self.acts, self.n_chunks, self.width, self.read = acts, 1, acts.shape[-1], read

    def chunk(self, index: int) -> torch.Tensor:
        return self.acts


class ModelSource(ActivationSource):
    """Activations computed on the fly, ``chunk_rows`` rows at a time in a seeded order."""

    def __init__(
        self,
        model: torch.nn.Module,
        rows: Sequence[Row],
        read: ReadSpec,
        *,
        chunk_rows: int = 256,
        seed: int = 0,
        other: Other = None,
    ) -> None:
        self.model, self.rows, self.read, self.other = model, rows, read, other
        self.order = np.random.default_rng(seed).permutation(len(rows))
        self.chunk_rows = chunk_rows
        self.n_chunks = max(1, -(-len(rows) // chunk_rows))
        self.width = _width(model)
        # checked once over all rows; a chunk may then select nothing (iter_batches says so)
        require_tokens(selection(rows, read.positions, model), read.positions, "ModelSource")

    def chunk(self, index: int) -> torch.Tensor:
        idx = self.order[index * self.chunk_rows : (index + 1) * self.chunk_rows]
        rows = [self.rows[int(i)] for i in idx]
        return collect_activations(self.model, rows, self.read, other=self.other, require=False)[0]


def source_point(
    source: ActivationSource, layer: int | None, site: Site | None, who: str
) -> tuple[int | None, Site | None]:
    """The layer and site a dictionary trained on ``source`` records: the source's read spec,
    or what the caller names; a caller naming another point than the source's is refused."""
    read = source.read
    if read is None:
        return layer, site
    if layer is not None and layer != read.layer:
        raise InputError(
            f"{who}: layer={layer}, but the activations were read at {read.describe()}"
        )
    if site is not None and site != read.site:
        raise InputError(
            f"{who}: site={site!r}, but the activations were read at {read.describe()}"
        )
    return read.layer, read.site


@dataclass
class BatchState:
    """Where :func:`iter_batches` is: pass number, chunk within the pass, batch within the chunk."""

    epoch: int = 0
    chunk: int = 0
    batch: int = 0


def iter_batches(
    source: ActivationSource, batch_size: int, seed: int = 0, state: BatchState | None = None
) -> Iterator[tuple[torch.Tensor, BatchState]]:
    """Endless shuffled batches; each comes with the state that resumes *after* it.

    The shuffle of a chunk depends only on ``(seed, epoch, chunk)``, so resuming from a saved
    state yields exactly the batches an uninterrupted run would have seen. A chunk's last partial
    batch is dropped.
    """
    st = BatchState(**vars(state)) if state else BatchState()
    while True:
        acts = source.chunk(st.chunk)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + st.epoch * 7919 + st.chunk)
        perm = torch.randperm(len(acts), generator=gen)
        n_batches = len(acts) // batch_size
        if n_batches == 0:
            raise ValueError(
                f"chunk {st.chunk} has {len(acts)} activations, fewer than one batch of "
                f"{batch_size}; lower batch_size or raise chunk_rows"
            )
        while st.batch < n_batches:
            idx = perm[st.batch * batch_size : (st.batch + 1) * batch_size]
            st.batch += 1
            yield acts[idx], BatchState(**vars(st))
        st.batch, st.chunk = 0, st.chunk + 1
        if st.chunk >= source.n_chunks:
            st.chunk, st.epoch = 0, st.epoch + 1
