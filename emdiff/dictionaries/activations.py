"""Activations for dictionary training, read through the capture hooks.

Two ways to feed a trainer, one interface (:class:`ActivationSource`: numbered chunks of
``[n, ...]`` activations, cut into shuffled batches by :func:`iter_batches`):

- :class:`TensorSource` holds activations already in memory (a few million tokens of a small
  model, or a cache) as a single chunk.
- :class:`ModelSource` runs the model on a fixed, seeded order of rows, ``chunk_rows`` sequences
  per chunk, and keeps only the selected tokens of the current chunk. Its chunks are a pure
  function of the chunk number, so a resumed training run recomputes exactly the chunk it was in.

Paired activations (a base and a fine-tuned model at the same tokens, for crosscoders) come out as
``[n, 2, d]``: pass ``paired=True`` with a PEFT model (adapter off = base, on = fine-tune) or a
second model as ``other``. Non-finite activations stop the run with the layer and batch named.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from emdiff.data.masks import EncodedChat, TokenRole, pad_batch, role_names
from emdiff.errors import InputError
from emdiff.models.hooks import (  # NonFiniteActivationError is re-exported
    NonFiniteActivationError,  # noqa: F401
    Site,
    check_activations,
    hook_points,
    residual_hooks,
    run_forward,
    sink_mask,
)
from emdiff.models.load import adapter_state

Row = EncodedChat | Sequence[int]


def check_finite(
    x: torch.Tensor, layer: int | str | None, batch: int | str, site: str | None = None
) -> None:
    """Raise :class:`NonFiniteActivationError` when ``x`` holds NaN or Inf (names layer, batch)."""
    check_activations(x, layer, batch, site)


def _width(model: torch.nn.Module) -> int:
    return model.config.get_text_config().hidden_size


def _token_mask(row: Row, roles: Sequence[TokenRole], bos: int | None) -> list[bool]:
    if isinstance(row, EncodedChat):
        keep = row.mask(*roles)
        ids = row.input_ids
    else:
        ids, keep = list(row), [True] * len(row)
    return [k and t != bos for k, t in zip(keep, ids, strict=True)]


def _ids(row: Row) -> list[int]:
    return row.input_ids if isinstance(row, EncodedChat) else list(row)


@torch.no_grad()
def collect_activations(
    model: torch.nn.Module,
    rows: Sequence[Row],
    layer: int,
    *,
    site: Site = "resid_post",
    roles: Sequence[TokenRole] = (TokenRole.ASSISTANT,),
    bos_token_id: int | None = None,
    pad_token_id: int = 0,
    batch_size: int = 32,
    exclude_sinks: bool = True,
    paired: bool = False,
    other: torch.nn.Module | None = None,
    seq_offset: int = 0,
    progress: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual activations of the selected tokens of ``rows`` at ``(layer, site)``.

    Tokens are selected by ``roles`` for :class:`EncodedChat` rows (every token of a plain id
    list), minus BOS and attention sinks. Returns ``(acts, keys)``: ``acts`` is ``[n, d]``, or
    ``[n, 2, d]`` with ``paired`` / ``other`` (index 0: ``model`` with its adapter off, or
    ``model``; index 1: adapter on, or ``other``); ``keys`` is ``[n, 2]`` (sequence id, position).
    """
    models: list[tuple[torch.nn.Module, bool | None]] = [(model, False if paired else None)]
    if other is not None:
        if _width(other) != _width(model):
            raise ValueError(
                f"paired activations need models of the same width: {_width(model)} vs "
                f"{_width(other)}"
            )
        models = [(model, None), (other, None)]
    elif paired:
        models.append((model, True))
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    keys: list[torch.Tensor] = []
    starts = range(0, len(rows), batch_size)
    for b, s in enumerate(tqdm(starts, desc=f"activations L{layer}", disable=not progress)):
        chunk = rows[s : s + batch_size]
        ids, att = pad_batch([_ids(r) for r in chunk], pad_token_id, side="right")
        sel, _ = pad_batch(
            [[int(k) for k in _token_mask(r, roles, bos_token_id)] for r in chunk], 0, "right"
        )
        sel = sel.bool().to(device)
        per_model = []
        for m, adapter in models:
            hidden = _hidden(m, ids.to(device), att.to(device), layer, site, adapter)
            check_finite(hidden[sel], layer, b, site)
            per_model.append(hidden)
        if exclude_sinks:
            sel = sel & ~sink_mask(per_model[0], sel)
        acts = [h[sel].to(dtype) for h in per_model]
        out.append(acts[0] if len(acts) == 1 else torch.stack(acts, dim=1))
        seq = torch.arange(seq_offset + s, seq_offset + s + len(chunk), device=device)
        pos = torch.arange(ids.shape[1], device=device)
        keys.append(
            torch.stack([seq[:, None].expand_as(sel)[sel], pos[None].expand_as(sel)[sel]], 1)
        )
    if not out:
        raise InputError("collect_activations: no rows given: nothing to read")
    acts = torch.cat(out).cpu()
    if not len(acts):
        raise InputError(
            f"collect_activations: no {role_names(roles)} token selected in any of {len(rows)} "
            "rows (BOS and sinks excluded): nothing to read"
        )
    return acts, torch.cat(keys).cpu()


def _hidden(
    model: torch.nn.Module,
    ids: torch.Tensor,
    att: torch.Tensor,
    layer: int,
    site: Site,
    adapter: bool | None,
) -> torch.Tensor:
    got: dict[str, torch.Tensor] = {}

    def keep(_layer: int, _site: Site, hidden: torch.Tensor) -> None:
        got["h"] = hidden

    points = hook_points(model, [layer], site)
    with residual_hooks(model, points, keep):
        if adapter is None:
            run_forward(model, ids, att)
        else:
            with adapter_state(model, adapter):
                run_forward(model, ids, att)
    return got["h"]


# ---- sources and batches --------------------------------------------------------------------
class ActivationSource:
    """Numbered chunks of activations; chunk ``c`` must always be the same tensor."""

    n_chunks: int
    width: int

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

    def __init__(self, acts: torch.Tensor, name: str = "tensor") -> None:
        check_finite(acts, name, "all")
        self.acts, self.n_chunks, self.width = acts, 1, acts.shape[-1]

    def chunk(self, index: int) -> torch.Tensor:
        return self.acts


class ModelSource(ActivationSource):
    """Activations computed on the fly, ``chunk_rows`` rows at a time in a seeded order."""

    def __init__(
        self,
        model: torch.nn.Module,
        rows: Sequence[Row],
        layer: int,
        *,
        chunk_rows: int = 256,
        seed: int = 0,
        **collect_kwargs,
    ) -> None:
        self.model, self.rows, self.layer, self.kwargs = model, rows, layer, collect_kwargs
        self.order = np.random.default_rng(seed).permutation(len(rows))
        self.chunk_rows = chunk_rows
        self.n_chunks = max(1, -(-len(rows) // chunk_rows))
        self.width = _width(model)

    def chunk(self, index: int) -> torch.Tensor:
        idx = self.order[index * self.chunk_rows : (index + 1) * self.chunk_rows]
        rows = [self.rows[int(i)] for i in idx]
        return collect_activations(self.model, rows, self.layer, **self.kwargs)[0]


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
