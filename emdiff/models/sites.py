"""Where each hook site lives in a decoder layer, per architecture: one small table.

The five sites use the SAELens / TransformerLens names, in execution order within a layer::

    resid_pre -> attn_out -> resid_mid -> mlp_out -> resid_post
    resid_mid = resid_pre + attn_out        resid_post = resid_mid + mlp_out

``resid_pre`` / ``resid_post`` are the input / output of the decoder layer itself, so they work on
any model whose layers :func:`~emdiff.models.load.decoder_layers` finds. The three sublayer sites
need a :class:`Layout` for the model's ``config.model_type`` in :data:`LAYOUTS`; adding an
architecture is one entry there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import nn

from emdiff.errors import InputError
from emdiff.models.load import decoder_layers, unwrap

Site = Literal["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
SITES: tuple[Site, ...] = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
IO = Literal["input", "output"]


class Tap(NamedTuple):
    """A tensor in a decoder layer: the input (first argument) or the output (first element when
    it is a tuple) of the submodule named ``module``; ``""`` is the decoder layer itself."""

    module: str
    io: IO


@dataclass(frozen=True)
class Layout:
    """Where one architecture's decoder layer exposes the sublayer sites.

    ``attn_out`` and ``mlp_out`` must be exactly what the layer adds to the residual stream, and
    ``resid_mid`` that sum after the attention branch (edits at ``resid_mid`` rely on it).
    """

    attn_out: Tap
    resid_mid: Tap
    mlp_out: Tap


PRE_NORM = Layout(
    attn_out=Tap("self_attn", "output"),
    resid_mid=Tap("post_attention_layernorm", "input"),
    mlp_out=Tap("mlp", "output"),
)
"""Llama-style block: ``h = h + attn(norm(h)); h = h + mlp(norm(h))``."""

SANDWICH_NORM = Layout(
    attn_out=Tap("post_attention_layernorm", "output"),
    resid_mid=Tap("pre_feedforward_layernorm", "input"),
    mlp_out=Tap("post_feedforward_layernorm", "output"),
)
"""Gemma 2 / 3 block: each branch is normed again before it is added to the residual."""

LAYOUTS: dict[str, Layout] = {
    "llama": PRE_NORM,
    "mistral": PRE_NORM,
    "qwen2": PRE_NORM,
    "qwen3": PRE_NORM,
    "gemma2": SANDWICH_NORM,
    "gemma3_text": SANDWICH_NORM,
}
"""``config.model_type`` (of the text config) -> layout of its decoder layer."""


class UnknownSiteError(InputError):
    """A hook site name that is not one of :data:`SITES`."""


class LayoutError(InputError):
    """The model's architecture has no layout for a sublayer site, or its layout does not fit."""


def check_site(site: str) -> Site:
    """``site`` when it is one of :data:`SITES`, else :class:`UnknownSiteError`."""
    if site not in SITES:
        raise UnknownSiteError(f"unknown hook site {site!r}; use one of {', '.join(SITES)}")
    return site  # type: ignore[return-value]


def model_type(model: nn.Module) -> str:
    """``model_type`` of the (text) config, looking through PEFT wrappers."""
    base = unwrap(model)
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return str(getattr(config, "model_type", None) or type(base).__name__)


def site_tap(model: nn.Module, site: str) -> Tap:
    """Where ``site`` is read in ``model``'s decoder layers; :class:`LayoutError` for a sublayer
    site on an architecture missing from :data:`LAYOUTS`."""
    site = check_site(site)
    if site == "resid_pre":
        return Tap("", "input")
    if site == "resid_post":
        return Tap("", "output")
    kind = model_type(model)
    if kind not in LAYOUTS:
        raise LayoutError(
            f"site {site!r} is not mapped for model type {kind!r} (only resid_pre and resid_post "
            f"work on any model); add a layout for {kind!r} to LAYOUTS in emdiff/models/sites.py "
            "naming the attention, post-attention-norm and MLP modules of its decoder layer"
        )
    return getattr(LAYOUTS[kind], site)


def module_site(model: nn.Module, module: str) -> Site | None:
    """The site that is the output of decoder-layer submodule ``module`` (``""``: the layer
    itself, ``resid_post``) in ``model``'s architecture, or None when no site is (e.g. Gemma2's
    ``mlp``, whose output is normalised again before it is added)."""
    if module == "":
        return "resid_post"
    layout = LAYOUTS.get(model_type(model))
    for site in ("attn_out", "mlp_out"):
        if layout is not None and getattr(layout, site) == Tap(module, "output"):
            return site
    return None


def site_module(model: nn.Module, layer: int, site: str) -> tuple[nn.Module, IO]:
    """The module of decoder layer ``layer`` whose input or output is ``site``, and which."""
    tap = site_tap(model, site)
    block = decoder_layers(model)[layer]
    try:
        return block.get_submodule(tap.module), tap.io
    except AttributeError:
        kind = model_type(model)
        raise LayoutError(
            f"the layout for model type {kind!r} reads {site!r} at submodule {tap.module!r}, "
            f"which {type(block).__name__} (layer {layer}) does not have; fix its entry in "
            "LAYOUTS in emdiff/models/sites.py"
        ) from None
