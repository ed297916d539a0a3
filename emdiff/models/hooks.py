"""Residual-stream capture on HF decoder layers, with early stop and token selection.

A hook point is ``(layer, site)``: ``resid_pre`` is the input of decoder layer ``L`` (the hidden
state the block reads), ``resid_post`` its output (what layer ``L + 1`` reads). These are taken on
``model.model.layers[L]`` itself, never from ``hidden_states[-1]``, which has the final norm
applied. The forward pass stops right after the last hook point it needs, so nothing above it is
computed.

Callbacks receive the ``(batch, seq, d_model)`` tensor inside the hook, so a caller can reduce it
on the spot (encode, accumulate) and never keep it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Literal

import torch
from torch import nn

from emdiff.errors import NonFiniteError
from emdiff.models.load import check_layer, decoder_layers

Site = Literal["resid_pre", "resid_post"]
SITES: tuple[Site, ...] = ("resid_pre", "resid_post")
HookFn = Callable[[int, Site, torch.Tensor], None]


class NonFiniteActivationError(NonFiniteError):
    """Activations contain NaN or Inf (names the layer, the site and the batch)."""


def check_activations(
    x: torch.Tensor, layer: int | str | None, batch: int | str, site: str | None = None
) -> None:
    """Raise :class:`NonFiniteActivationError` when ``x`` (activations read at a hook) holds a NaN
    or an infinity. One ``isfinite().all()`` per call; the counts only when something is wrong."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan, n_inf = int(torch.isnan(x).sum()), int(torch.isinf(x).sum())
        at = f"layer {layer}" + (f", site {site}" if site else "") + f", batch {batch}"
        raise NonFiniteActivationError(
            f"non-finite activations at {at}: {n_nan} NaN and {n_inf} Inf values among "
            f"{x.numel()}; check the model's weights, its dtype (fp16 overflow) and the input rows"
        )


class _StopForward(Exception):
    """Raised inside the last needed hook to skip the rest of the forward pass."""


def _order(point: tuple[int, Site]) -> tuple[int, int]:
    return point[0], SITES.index(point[1])


def hook_points(
    model: nn.Module, layers: int | Sequence[int], sites: Site | Sequence[Site] = "resid_post"
) -> list[tuple[int, Site]]:
    """Validated ``(layer, site)`` pairs in execution order."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    sites = [sites] if isinstance(sites, str) else list(sites)
    for s in sites:
        if s not in SITES:
            raise ValueError(f"unknown hook site {s!r}; use one of {SITES}")
    return sorted({(check_layer(model, layer), s) for layer in layers for s in sites}, key=_order)


@contextmanager
def residual_hooks(
    model: nn.Module,
    points: Sequence[tuple[int, Site]],
    fn: HookFn,
    *,
    stop_early: bool = True,
) -> Iterator[None]:
    """Call ``fn(layer, site, hidden)`` at each hook point during forward passes in this block.

    With ``stop_early`` the pass is cut after the last point; run it through
    :func:`run_forward`, which swallows the stop.
    """
    blocks = decoder_layers(model)
    points = sorted(points, key=_order)
    last = points[-1] if points else None
    handles = []

    def make(layer: int, site: Site):
        def call(hidden: torch.Tensor) -> None:
            fn(layer, site, hidden)
            if stop_early and (layer, site) == last:
                raise _StopForward

        if site == "resid_pre":

            def pre_hook(module, args, kwargs):
                call(args[0] if args else kwargs["hidden_states"])

            return blocks[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)

        def post_hook(module, args, output):
            call(output[0] if isinstance(output, tuple) else output)

        return blocks[layer].register_forward_hook(post_hook)

    try:
        handles = [make(layer, site) for layer, site in points]
        yield
    finally:
        for h in handles:
            h.remove()


def run_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> None:
    """One forward pass without a KV cache, ended early when a hook asks for it."""
    with suppress(_StopForward):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)


@torch.no_grad()
def capture_residuals(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    layers: int | Sequence[int] = (0,),
    sites: Site | Sequence[Site] = "resid_post",
    stop_early: bool = True,
) -> dict[tuple[int, Site], torch.Tensor]:
    """The residual stream at each ``(layer, site)`` as ``(batch, seq, d_model)`` tensors."""
    out: dict[tuple[int, Site], torch.Tensor] = {}
    points = hook_points(model, layers, sites)

    real = None if attention_mask is None else attention_mask.bool()

    def keep(layer: int, site: Site, hidden: torch.Tensor) -> None:
        check_activations(
            hidden if real is None else hidden[real.to(hidden.device)], layer, 0, site
        )
        out[(layer, site)] = hidden.detach().clone()

    device = next(model.parameters()).device
    with residual_hooks(model, points, keep, stop_early=stop_early):
        run_forward(
            model,
            input_ids.to(device),
            None if attention_mask is None else attention_mask.to(device),
        )
    return out


def sink_mask(hidden: torch.Tensor, keep: torch.Tensor, factor: float = 10.0) -> torch.Tensor:
    """True at attention-sink positions: residual norm above ``factor`` x the median norm of the
    ``keep`` positions in this batch (BOS-like tokens in Gemma/Qwen reach 10-100x)."""
    norms = hidden.float().norm(dim=-1)
    if not keep.any():
        return torch.zeros_like(keep)
    return norms > factor * norms[keep].median()


EditFn = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def residual_edit(model: nn.Module, layer: int, site: Site, fn: EditFn) -> Iterator[None]:
    """Replace the residual stream at ``(layer, site)`` by ``fn(hidden)`` in every forward pass.

    ``fn`` gets and returns a ``(batch, seq, d_model)`` tensor (splice a reconstruction, add a
    steering vector, ablate a direction). The hook is removed when the block ends.
    """
    check_layer(model, layer)
    if site not in SITES:
        raise ValueError(f"unknown hook site {site!r}; use one of {SITES}")
    block = decoder_layers(model)[layer]
    if site == "resid_pre":

        def pre_hook(module, args, kwargs):
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def post_hook(module, args, output):
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            return fn(output)

        handle = block.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()
