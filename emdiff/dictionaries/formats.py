"""Read public dictionaries in their publishers' formats into :class:`SparseDictionary`.

- ``saelens``: folder with ``cfg.json`` + ``sae_weights.safetensors`` (SAELens 6 nested
  ``metadata``, or the pre-6.0 flat keys ``hook_point`` / ``hook_name``, ``activation_fn_str``,
  ``activation_fn_kwargs``). Architectures standard, jumprelu, topk, gated.
- ``gemma_scope``: ``params.npz`` (``W_enc [d, F]``, ``W_dec [F, d]``, ``b_enc``, ``b_dec``,
  ``threshold``): JumpReLU on raw activations, no ``b_dec`` subtracted.
- ``dictionary_learning``: ``ae.pt`` (a state dict, read with ``weights_only=True``) +
  ``config.json`` whose ``trainer.dict_class`` names the class.
- ``sparsify``: folder with ``cfg.json`` + ``sae.safetensors`` (``encoder.weight [F, d]``,
  ``encoder.bias``, ``W_dec [F, d]``, ``b_dec``): ReLU, then top-k, after subtracting ``b_dec``.

Nothing is unpickled: safetensors, ``numpy.load(allow_pickle=False)`` and
``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from emdiff.dictionaries.base import DictionaryMeta, SparseDictionary
from emdiff.errors import InputError

FORMATS = ("saelens", "gemma_scope", "dictionary_learning", "sparsify", "itda")


class DictionaryFormatError(InputError):
    """A dictionary folder is not in a known format or misses something; names the file."""


def detect_format(path: str | Path) -> str:
    """The format of a dictionary folder (or of a file inside one)."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if (folder / "sae_weights.safetensors").is_file():
        return "saelens"
    if (folder / "params.npz").is_file():
        return "gemma_scope"
    if (folder / "ae.pt").is_file():
        return "dictionary_learning"
    if (folder / "sae.safetensors").is_file() and (folder / "cfg.json").is_file():
        return "sparsify"
    if (folder / "itda.safetensors").is_file():
        return "itda"
    raise DictionaryFormatError(
        f"{path}: not a dictionary folder: expected sae_weights.safetensors (SAELens), params.npz "
        "(Gemma Scope), ae.pt (dictionary_learning), sae.safetensors + cfg.json (sparsify) or "
        "itda.safetensors (ITDA)"
    )


def load_dictionary(
    path: str | Path,
    format: str | None = None,
    *,
    scaling_factor: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SparseDictionary:
    """Load a dictionary; ``format`` is detected when not given.

    ``scaling_factor`` supplies SAELens' ``expected_average_only_in`` factor when the folder does
    not record one (SAELens keeps it in its release registry, not in the files).
    """
    p = Path(path)
    folder = p.parent if p.is_file() else p
    fmt = format or detect_format(p)
    loaders = {
        "saelens": lambda: _saelens(folder, scaling_factor),
        "gemma_scope": lambda: _gemma_scope(folder),
        "dictionary_learning": lambda: _dictionary_learning(folder),
        "sparsify": lambda: _sparsify(folder),
        "itda": lambda: _itda(folder),
    }
    if fmt not in loaders:
        raise DictionaryFormatError(f"unknown dictionary format {fmt!r}; use one of {FORMATS}")
    return loaders[fmt]().to(device=device, dtype=dtype)


# ---- helpers -------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DictionaryFormatError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise DictionaryFormatError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _need(tensors: dict, names: tuple[str, ...], where: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise DictionaryFormatError(f"{where}: missing tensor(s) {missing}; has {sorted(tensors)}")


def _layer_of(text: str | None) -> int | None:
    m = re.search(r"(?:blocks|layers?)[._](\d+)", text or "")
    return int(m.group(1)) if m else None


def _site_of(hook: str | None) -> str | None:
    for site in ("resid_pre", "resid_post", "resid_mid", "mlp_out", "attn_out", "hook_z"):
        if hook and site in hook:
            return site
    return hook


# ---- SAELens ---------------------------------------------------------------------------------
def _saelens(folder: Path, scaling_factor: float | None) -> SparseDictionary:
    cfg = _read_json(folder / "cfg.json")
    meta = cfg.get("metadata") or {}
    flat = {**cfg, **meta}
    hook = flat.get("hook_name") or flat.get("hook_point")
    layer = flat.get("hook_layer", flat.get("hook_point_layer"))
    layer = int(layer) if layer is not None else _layer_of(hook)
    act_fn = flat.get("activation_fn") or flat.get("activation_fn_str") or "relu"
    arch = cfg.get("architecture") or ("topk" if act_fn == "topk" else "standard")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    norm = cfg.get("normalize_activations", "none")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    wpath = folder / "sae_weights.safetensors"
    t = load_file(str(wpath))
    _need(t, ("W_enc", "W_dec", "b_dec"), wpath)
    kwargs: dict = {}
    if norm == "expected_average_only_in":
        factor = scaling_factor or flat.get("norm_scaling_factor")
        scaler = folder / "activation_scaler.json"
        if factor is None and scaler.is_file():
            factor = _read_json(scaler).get("scaling_factor")
        if factor is None:
            raise DictionaryFormatError(
                f"{folder / 'cfg.json'}: normalize_activations is expected_average_only_in but no "
                "scaling factor is recorded; pass scaling_factor= (SAELens' norm_scaling_factor)"
            )
        kwargs.update(input_norm="scale", input_scale=float(factor))
    elif norm in ("constant_norm_rescale", "layer_norm"):
        kwargs.update(input_norm=norm)
    elif norm != "none":
        raise DictionaryFormatError(
            f"{folder / 'cfg.json'}: unknown normalize_activations {norm!r}"
        )
    W_dec = t["W_dec"]
    if "scaling_factor" in t and not torch.all(t["scaling_factor"] == 1):
        W_dec = W_dec * t["scaling_factor"][:, None]  # pre-6 finetuning scaling, folded
    activation = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk", "gated": "gated"}
    if arch not in activation:
        raise DictionaryFormatError(f"{folder / 'cfg.json'}: unsupported architecture {arch!r}")
    if arch == "jumprelu":
        _need(t, ("threshold", "b_enc"), wpath)
        kwargs["threshold"] = t["threshold"]
    if arch == "gated":
        _need(t, ("b_gate", "b_mag", "r_mag"), wpath)
        kwargs.update(b_gate=t["b_gate"], b_mag=t["b_mag"], r_mag=t["r_mag"])
    if arch == "topk":
        kwargs.update(
            k=int(k or 100), rescale_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm"))
        )
    b_enc = t.get("b_enc", torch.zeros(t["W_enc"].shape[1]))
    return SparseDictionary(
        t["W_enc"],
        b_enc,
        W_dec,
        t["b_dec"],
        activation=activation[arch],
        subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
        meta=DictionaryMeta(
            format="saelens",
            architecture=arch,
            layer=layer,
            hook=_site_of(hook),
            model_name=flat.get("model_name"),
            path=str(folder),
        ),
        **kwargs,
    )


# ---- Gemma Scope ------------------------------------------------------------------------------
def _gemma_scope(folder: Path) -> SparseDictionary:
    path = folder / "params.npz"
    with np.load(path, allow_pickle=False) as npz:
        t = {
            (("W" + k[1:]) if k.startswith("w_") else k): torch.from_numpy(npz[k].copy())
            for k in npz.files
        }
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path)
    text = str(folder)
    hook = "mlp_out" if "-mlp" in text else "attn" if "-att" in text else "resid_post"
    model = re.search(r"gemma-scope-(\d+b)-(pt|it)", text)
    return SparseDictionary(
        t["W_enc"].float(),
        t["b_enc"].float(),
        t["W_dec"].float(),
        t["b_dec"].float(),
        activation="jumprelu",
        threshold=t["threshold"].float(),
        subtract_b_dec=False,
        meta=DictionaryMeta(
            format="gemma_scope",
            architecture="jumprelu",
            layer=_layer_of(text),
            hook=hook,
            path=str(folder),
            model_name=f"gemma-2-{model.group(1)}" if model else None,
        ),
    )


# ---- dictionary_learning -----------------------------------------------------------------------
def _dictionary_learning(folder: Path) -> SparseDictionary:
    trainer = _read_json(folder / "config.json").get("trainer", {})
    cls = trainer.get("dict_class")
    path = folder / "ae.pt"
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DictionaryFormatError(f"{path}: not a weights-only state dict ({e})") from None
    layer = trainer.get("layer")
    meta = DictionaryMeta(
        format="dictionary_learning",
        architecture=str(cls),
        path=str(folder),
        layer=int(layer) if layer is not None else None,
        hook=_site_of(trainer.get("submodule_name")) or "resid_post",
        model_name=trainer.get("lm_name"),
    )
    d_sae = trainer.get("dict_size")
    if cls == "AutoEncoder":
        _need(t, ("encoder.weight", "encoder.bias", "decoder.weight", "bias"), path)
        return SparseDictionary(
            t["encoder.weight"].T,
            t["encoder.bias"],
            t["decoder.weight"].T,
            t["bias"],
            activation="relu",
            subtract_b_dec=True,
            meta=meta,
        )
    if cls == "GatedAutoEncoder":
        _need(
            t,
            ("encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"),
            path,
        )
        W_enc = t["encoder.weight"].T
        return SparseDictionary(
            W_enc,
            torch.zeros(W_enc.shape[1]),
            t["decoder.weight"].T,
            t["decoder_bias"],
            activation="gated",
            b_gate=t["gate_bias"],
            b_mag=t["mag_bias"],
            r_mag=t["r_mag"],
            subtract_b_dec=True,
            meta=meta,
        )
    if cls == "JumpReluAutoEncoder":
        _need(t, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), path)
        return SparseDictionary(
            t["W_enc"],
            t["b_enc"],
            t["W_dec"],
            t["b_dec"],
            activation="jumprelu",
            threshold=t["threshold"],
            subtract_b_dec=False,
            meta=meta,
        )
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        _need(t, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k"), path)
        W_enc, b_enc, W_dec = t["encoder.weight"].T, t["encoder.bias"], t["decoder.weight"].T
    elif cls == "MatryoshkaBatchTopKSAE":
        _need(t, ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold"), path)
        W_enc, b_enc, W_dec = t["W_enc"], t["b_enc"], t["W_dec"]
    else:
        raise DictionaryFormatError(f"{folder / 'config.json'}: unsupported dict_class {cls!r}")
    if d_sae is not None and W_enc.shape[1] != d_sae:
        raise DictionaryFormatError(f"{path}: {W_enc.shape[1]} latents but config says {d_sae}")
    if cls == "AutoEncoderTopK":  # inference default: top-k of the ReLU'd pre-activations
        return SparseDictionary(
            W_enc,
            b_enc,
            W_dec,
            t["b_dec"],
            activation="topk",
            k=int(t["k"]),
            relu_after_topk=False,
            subtract_b_dec=True,
            meta=meta,
        )
    threshold = t["threshold"].float().expand(W_enc.shape[1]).clone()  # a scalar per dictionary
    return SparseDictionary(
        W_enc,
        b_enc,
        W_dec,
        t["b_dec"],
        activation="batchtopk",
        threshold=threshold,
        subtract_b_dec=True,
        meta=meta,
    )


def _itda(folder: Path) -> SparseDictionary:
    from emdiff.dictionaries.itda import load_itda

    return load_itda(folder)


# ---- sparsify ---------------------------------------------------------------------------------
def _sparsify(folder: Path) -> SparseDictionary:
    cfg = _read_json(folder / "cfg.json")
    path = folder / "sae.safetensors"
    t = load_file(str(path))
    _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
    if cfg.get("activation", "topk") != "topk":
        raise DictionaryFormatError(
            f"{folder / 'cfg.json'}: activation {cfg['activation']!r} is not supported"
        )
    if "W_skip" in t:
        raise DictionaryFormatError(f"{path}: skip connections (transcoders) are not supported")
    return SparseDictionary(
        t["encoder.weight"].T,
        t["encoder.bias"],
        t["W_dec"],
        t["b_dec"],
        activation="topk",
        k=int(cfg.get("k", 32)),
        relu_after_topk=False,
        subtract_b_dec=not cfg.get("transcode", False),
        meta=DictionaryMeta(
            format="sparsify",
            architecture="topk",
            layer=_layer_of(folder.name),
            hook="resid_post",
            path=str(folder),
        ),
    )
