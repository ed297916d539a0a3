"""Hook sites on HF decoder layers: capture with early stop, and edits that reach the residual.

A hook point is ``(layer, site)`` with the five SAELens / TransformerLens sites, in execution order
``resid_pre`` (input of decoder layer ``L``), ``attn_out``, ``resid_mid = resid_pre + attn_out``,
``mlp_out`` and ``resid_post = resid_mid + mlp_out`` (output of layer ``L``, what layer ``L + 1``
reads). Where each site lives in each architecture is the table in :mod:`emdiff.models.sites`.
All are taken on the decoder layer and its submodules, never from ``hidden_states[-1]``, which has
the final norm applied. The forward pass stops right after the last hook point it needs, so nothing
above it is computed.

Callbacks receive the ``(batch, seq, d_model)`` tensor inside the hook, so a caller can reduce it
on the spot (encode, accumulate) and never keep it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from emdiff.errors import NonFiniteError
from emdiff.models.load import check_layer
from emdiff.models.sites import IO, SITES, Site, check_site, site_module

__all__ = [
    "SITES",
    "EditFn",
    "HookFn",
    "NonFiniteActivationError",
    "Site",
    "capture_residuals",
    "check_activations",
    "hook_points",
    "residual_edit",
    "residual_hooks",
    "run_forward",
    "sink_mask",
]

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


def _tap(
    module: nn.Module, io: IO, call: Callable[[torch.Tensor], torch.Tensor | None]
) -> RemovableHandle:
    """Hook ``call`` on the first input / output of ``module``; a tensor it returns replaces it."""
    if io == "input":

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
            if args:
                new = call(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            new = call(kwargs[key])
            return None if new is None else (args, {**kwargs, key: new})

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        new = call(output[0] if isinstance(output, tuple) else output)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return module.register_forward_hook(hook)


def hook_points(
    model: nn.Module, layers: int | Sequence[int], sites: Site | Sequence[Site] = "resid_post"
) -> list[tuple[int, Site]]:
    """Validated ``(layer, site)`` pairs in execution order (layer, then site order).

    Raises :class:`~emdiff.models.sites.UnknownSiteError` for a bad site name and
    :class:`~emdiff.models.sites.LayoutError` for a sublayer site the architecture has no layout for.
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    sites = [check_site(s) for s in ([sites] if isinstance(sites, str) else sites)]
    points = sorted({(check_layer(model, layer), s) for layer in layers for s in sites}, key=_order)
    for layer, site in points:
        site_module(model, layer, site)
    return points


@contextmanager
def residual_hooks(
    model: nn.Module,
    points: Sequence[tuple[int, Site]],
    fn: HookFn,
    *,
    stop_early: bool = True,
) -> Iterator[None]:
    """Call ``fn(layer, site, hidden)`` at each hook point during forward passes in this block.

    With ``stop_early`` the pass is cut right after the last point (nothing after it runs); run it
    through :func:`run_forward`, which swallows the stop. Hooks are removed on exit.
    """
    points = sorted(points, key=_order)
    last = points[-1] if points else None
    handles: list[RemovableHandle] = []

    def make(layer: int, site: Site) -> RemovableHandle:
        module, io = site_module(model, layer, site)

        def call(hidden: torch.Tensor) -> None:
            fn(layer, site, hidden)
            if stop_early and (layer, site) == last:
                raise _StopForward

        return _tap(module, io, call)

    try:
        for layer, site in points:
            handles.append(make(layer, site))
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
    """The tensor at each ``(layer, site)`` (residual stream or branch output) as a
    ``(batch, seq, d_model)`` tensor; checked for NaN / Inf at the real tokens."""
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


SINK_FACTOR = 10.0
"""A token whose residual norm exceeds this times the median of the selected tokens is a sink."""


def sink_mask(
    hidden: torch.Tensor, keep: torch.Tensor, factor: float = SINK_FACTOR
) -> torch.Tensor:
    """True at attention-sink positions: residual norm above ``factor`` x the median norm of the
    ``keep`` positions in this batch (BOS-like tokens in Gemma/Qwen reach 10-100x)."""
    norms = hidden.float().norm(dim=-1)
    if not keep.any():
        return torch.zeros_like(keep)
    return norms > factor * norms[keep].median()


EditFn = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def residual_edit(model: nn.Module, layer: int, site: Site, fn: EditFn) -> Iterator[None]:
    """Replace the tensor at ``(layer, site)`` by ``fn(hidden)`` in every forward pass.

    ``fn`` gets and returns a ``(batch, seq, d_model)`` tensor (splice a reconstruction, add a
    steering vector, ablate a direction); the change reaches the residual stream downstream. At
    ``attn_out`` / ``mlp_out`` the branch output is replaced. ``resid_mid`` has no module that
    outputs it (the layer keeps its residual before the norm that reads it), so the attention
    branch is made to add ``fn(resid_pre + attn_out) - resid_pre`` instead: exact up to float
    rounding. Hooks are removed when the block ends.
    """
    layer, site = check_layer(model, layer), check_site(site)
    handles: list[RemovableHandle] = []
    try:
        if site == "resid_mid":
            block, _ = site_module(model, layer, "resid_pre")
            attn, io = site_module(model, layer, "attn_out")
            seen: dict[str, torch.Tensor] = {}

            def keep_pre(hidden: torch.Tensor) -> None:
                seen["pre"] = hidden

            def add_mid(attn_out: torch.Tensor) -> torch.Tensor:
                pre = seen.pop("pre")
                return fn(pre + attn_out) - pre

            handles.append(_tap(block, "input", keep_pre))
            handles.append(_tap(attn, io, add_mid))
        else:
            module, io = site_module(model, layer, site)
            handles.append(_tap(module, io, fn))
        yield
    finally:
        for h in handles:
            h.remove()
