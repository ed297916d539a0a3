"""Publishers' hook names -> ``(layer, site)``: SAELens / TransformerLens, sparsify,
dictionary_learning. One table here, so a new naming scheme is one more pattern."""

from __future__ import annotations

import re

from emdiff.models.sites import SITES, Site

# ---- publishers' hook names ------------------------------------------------------------------
_TL = re.compile(r"blocks\.(\d+)\.(.+)")  # TransformerLens / SAELens: blocks.L.hook_mlp_out
_DL = re.compile(rf"({'|'.join(SITES)})_layer_(\d+)")  # dictionary_learning: mlp_out_layer_3
_HF = re.compile(r"(?:.*\.)?(?:layers|h)\.(\d+)(?:\.(.+))?")  # sparsify: [model.]layers.L[.mlp]
_HF_SITES = {None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attention": "attn_out"}
_HF_SITES["attn"] = "attn_out"  # GPT-2's transformer.h.L.attn


def parse_hook(name: str | None) -> tuple[int | None, Site | None]:
    """``(layer, site)`` of a publisher's hook name; site None for a hook emdiff cannot read.

    TransformerLens / SAELens ``blocks.L.hook_<site>``; sparsify hookpoints (module paths)
    ``layers.L`` = resid_post, ``layers.L.mlp`` = mlp_out, ``layers.L.self_attn`` (or
    ``.attention``, GPT-2's ``h.L.attn``) = attn_out; dictionary_learning ``<site>_layer_L``; a bare
    ``<site>`` or ``hook_<site>``. Anything else on a layer (``blocks.L.attn.hook_z``,
    ``blocks.L.hook_mlp_in``, ``layers.L.mlp.act_fn``) gives ``(L, None)``; no layer, ``(None, None)``.
    """
    name = (name or "").strip()
    bare = name.removeprefix("hook_")
    if bare in SITES:
        return None, bare
    if m := _TL.fullmatch(name):
        site = m[2].removeprefix("hook_")
        return int(m[1]), site if m[2].startswith("hook_") and site in SITES else None
    if m := _DL.fullmatch(name):
        return int(m[2]), m[1]
    if m := _HF.fullmatch(name):
        return int(m[1]), _HF_SITES.get(m[2])
    return None, None


def module_path(name: str | None) -> tuple[int, str] | None:
    """``(layer, submodule)`` of a module-path hook (sparsify's ``layers.5.mlp`` gives
    ``(5, "mlp")``, ``layers.5`` gives ``(5, "")``); None for other hook names. Which site a
    module's output is depends on the architecture (:func:`emdiff.models.sites.module_site`)."""
    if name and not _TL.fullmatch(name) and (m := _HF.fullmatch(name.strip())):
        return int(m[1]), m[2] or ""
    return None


def site_hook(layer: int | None, site: Site | None) -> str | None:
    """The TransformerLens hook name emdiff records for its own dictionaries."""
    if site is None:
        return None
    return f"blocks.{layer}.hook_{site}" if layer is not None else f"hook_{site}"


def locate(
    hook: str | None,
    layer: object = None,
    site: object = None,
    *,
    where: object,
    error: type[Exception],
    key: str = "layer",
) -> dict:
    """``layer``, ``site`` and ``hook`` for :class:`~emdiff.dictionaries.base.DictionaryMeta` from what a file records: a raw
    hook name, and optionally a layer (``key`` names it) and a site. Disagreement raises ``error``
    naming ``where``; nothing the file does not say is filled in (but a recorded site without a
    hook gets emdiff's own hook name, :func:`site_hook`)."""
    h_layer, h_site = parse_hook(hook)
    if layer is not None:
        try:
            layer = int(layer)
        except (TypeError, ValueError):
            raise error(f"{where}: {key} = {layer!r} is not a layer number") from None
        if h_layer is not None and h_layer != layer:
            raise error(f"{where}: {key} = {layer} but hook {hook!r} is on layer {h_layer}")
    if site is not None:
        if site not in SITES:
            raise error(f"{where}: site {site!r} is not one of {', '.join(SITES)}")
        if h_site is not None and h_site != site:
            raise error(f"{where}: site = {site!r} but hook {hook!r} is {h_site}")
    layer = h_layer if layer is None else layer
    site = h_site if site is None else site
    return {"layer": layer, "site": site, "hook": hook or site_hook(layer, site)}
