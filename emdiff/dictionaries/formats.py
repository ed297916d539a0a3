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
``torch.load(weights_only=True)`` only. Every file is checked as it is read: a truncated or corrupt
file, a NaN or infinite weight, or a missing required config key raises an
:class:`~emdiff.errors.InputError` naming the file (and the tensor or key). Only keys for which the
publisher documents a default fall back to it; each such default is commented where it is used.

Each loader fills ``meta.layer``, ``meta.site`` and the raw ``meta.hook`` from what the files say
(never a guessed site); a recorded layer that contradicts the hook name is refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.dictionaries.hooknames import locate, parse_hook
from emdiff.errors import InputError
from emdiff.readers import load_npz, load_safetensors, load_state_dict, read_json, require

FORMATS = ("saelens", "gemma_scope", "dictionary_learning", "sparsify", "itda")
DICTIONARY_FILES = (
    *("sae_weights.safetensors", "params.npz", "ae.pt", "sae.safetensors", "itda.safetensors"),
    *("cfg.json", "config.json"),
)


class DictionaryFormatError(InputError):
    """A dictionary folder is not in a known format or misses something; names the file."""


def detect_format(path: str | Path) -> str:
    """The format of a dictionary folder (or of a file inside one)."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    if p.is_file() and p.name not in DICTIONARY_FILES:
        raise DictionaryFormatError(
            f"{path}: not a dictionary file (expected one of {', '.join(DICTIONARY_FILES)}); "
            "pass the dictionary folder"
        )
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
    return read_json(path, DictionaryFormatError)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path, DictionaryFormatError)


def _need(tensors: dict, names: tuple[str, ...], where: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise DictionaryFormatError(f"{where}: missing tensor(s) {missing}; has {sorted(tensors)}")


def _locate(hook, layer, where: Path, key: str) -> dict:
    return locate(hook, layer, where=where, error=DictionaryFormatError, key=key)


# ---- SAELens ---------------------------------------------------------------------------------
def _saelens(folder: Path, scaling_factor: float | None) -> SparseDictionary:
    cpath = folder / "cfg.json"
    cfg = _read_json(cpath)
    meta = cfg.get("metadata") or {}
    flat = {**cfg, **meta}
    hook = flat.get("hook_name") or flat.get("hook_point")
    key = "hook_layer" if flat.get("hook_layer") is not None else "hook_point_layer"
    loc = _locate(hook, flat.get(key), cpath, key)
    # pre-6 SAELens: activation_fn_str defaults to "relu" and architecture to "standard", and a
    # TopK SAE is architecture "standard" with activation_fn_str "topk"
    act_fn = flat.get("activation_fn") or flat.get("activation_fn_str") or "relu"
    arch = cfg.get("architecture") or "standard"
    if arch == "standard" and act_fn == "topk":
        arch = "topk"
    elif arch == "standard" and act_fn != "relu":
        raise DictionaryFormatError(f"{cpath}: unsupported activation function {act_fn!r}")
    # SAELens default: normalize_activations absent means "none"
    norm = cfg.get("normalize_activations", "none")
    norm = {True: "expected_average_only_in", False: "none", None: "none"}.get(norm, norm)
    wpath = folder / "sae_weights.safetensors"
    t = _tensors(wpath)
    _need(t, ("W_enc", "W_dec", "b_dec") + (() if arch == "gated" else ("b_enc",)), wpath)
    for key, size in (("d_in", t["W_enc"].shape[0]), ("d_sae", t["W_enc"].shape[1])):
        if cfg.get(key) is not None and int(cfg[key]) != size:
            raise DictionaryFormatError(
                f"{cpath}: {key} = {cfg[key]} but W_enc in {wpath} has shape "
                f"{tuple(t['W_enc'].shape)}"
            )
    enc: dict = {}
    extra: dict = {}
    if norm == "expected_average_only_in":
        factor = scaling_factor or flat.get("norm_scaling_factor")
        scaler = folder / "activation_scaler.json"
        if factor is None and scaler.is_file():
            factor = require(
                _read_json(scaler),
                "scaling_factor",
                scaler,
                "activation scaler",
                DictionaryFormatError,
            )
        if factor is None:
            raise DictionaryFormatError(
                f"{cpath}: normalize_activations is expected_average_only_in but no "
                "scaling factor is recorded; pass scaling_factor= (SAELens' norm_scaling_factor)"
            )
        enc.update(input_norm="scale", input_scale=float(factor))
    elif norm in ("constant_norm_rescale", "layer_norm"):
        enc.update(input_norm=norm)
    elif norm != "none":
        raise DictionaryFormatError(f"{cpath}: unknown normalize_activations {norm!r}")
    W_dec = t["W_dec"]
    if "scaling_factor" in t and not torch.all(t["scaling_factor"] == 1):
        W_dec = W_dec * t["scaling_factor"][:, None]  # pre-6 finetuning scaling, folded
    activation = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk", "gated": "gated"}
    if arch not in activation:
        raise DictionaryFormatError(f"{cpath}: unsupported architecture {arch!r}")
    if arch == "jumprelu":
        _need(t, ("threshold",), wpath)
        extra["threshold"] = t["threshold"]
    if arch == "gated":
        _need(t, ("b_gate", "b_mag", "r_mag"), wpath)
        extra.update(b_gate=t["b_gate"], b_mag=t["b_mag"], r_mag=t["r_mag"])
    if arch == "topk":
        k = cfg.get("k") or (flat.get("activation_fn_kwargs") or {}).get("k")
        if not k:
            raise DictionaryFormatError(f"{cpath}: missing required key 'k' (topk architecture)")
        # SAELens default: rescale_acts_by_decoder_norm is False unless recorded
        enc.update(k=int(k), rescale_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm")))
    # a gated SAE has no b_enc (b_gate and b_mag instead); the zeros are never read
    b_enc = t["b_enc"] if "b_enc" in t else torch.zeros(t["W_enc"].shape[1])
    return SparseDictionary(
        t["W_enc"],
        b_enc,
        W_dec,
        t["b_dec"],
        # SAELens default: apply_b_dec_to_input is True unless recorded
        encoding=Encoding(
            activation=activation[arch],
            subtract_b_dec=bool(cfg.get("apply_b_dec_to_input", True)),
            **enc,
        ),
        tensors=extra,
        meta=DictionaryMeta(
            format="saelens",
            architecture=arch,
            **loc,
            model_name=flat.get("model_name"),
            path=str(folder),
        ),
    )


# ---- Gemma Scope ------------------------------------------------------------------------------
_GEMMA_SCOPE_HOOKS = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
_GEMMA_SCOPE_HOOKS["transcoders"] = "ln2.hook_normalized"


def _gemma_scope(folder: Path) -> SparseDictionary:
    path = folder / "params.npz"
    t = {
        (("W" + k[1:]) if k.startswith("w_") else k): torch.from_numpy(a)
        for k, a in load_npz(path, DictionaryFormatError).items()
    }
    _need(t, ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"), path)
    text = folder.as_posix()
    # the repository names the hook: -res resid_post, -mlp mlp_out, -att the concatenated head
    # outputs before o_proj (attn.hook_z, not attn_out), -transcoders the MLP's normalised input
    repo = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)(?![\w-])", text)
    # the layer folder under the repository, not any parent folder that happens to be layer_N
    layer = re.search(r"(?:^|/)layer_(\d+)(?:/|$)", text[repo.end() :] if repo else text)
    hook = None
    if repo:
        suffix = _GEMMA_SCOPE_HOOKS[repo[3]]
        hook = f"blocks.{layer[1]}.{suffix}" if layer else suffix
        if "/embedding/" in f"/{text}/":
            hook = "hook_embed"
    return SparseDictionary(
        t["W_enc"].float(),
        t["b_enc"].float(),
        t["W_dec"].float(),
        t["b_dec"].float(),
        encoding=Encoding(activation="jumprelu", subtract_b_dec=False),
        tensors={"threshold": t["threshold"].float()},
        meta=DictionaryMeta(
            format="gemma_scope",
            architecture="jumprelu",
            **_locate(hook, None, path, "layer"),
            path=str(folder),
            model_name=f"gemma-2-{repo[1]}" + ("-it" if repo[2] == "it" else "") if repo else None,
        ),
    )


# ---- dictionary_learning -----------------------------------------------------------------------
def _dictionary_learning(folder: Path) -> SparseDictionary:
    cpath = folder / "config.json"
    trainer = require(
        _read_json(cpath), "trainer", cpath, "dictionary_learning config", DictionaryFormatError
    )
    if not isinstance(trainer, dict):
        raise DictionaryFormatError(f"{cpath}: 'trainer' must be an object")
    cls = require(
        trainer,
        "dict_class",
        cpath,
        "trainer.dict_class names the architecture",
        DictionaryFormatError,
    )
    path = folder / "ae.pt"
    t = load_state_dict(path, DictionaryFormatError)
    meta = DictionaryMeta(
        format="dictionary_learning",
        architecture=str(cls),
        path=str(folder),
        # no recorded submodule: the site is unknown (None skips the site check, never guesses)
        **_locate(trainer.get("submodule_name"), trainer.get("layer"), cpath, "trainer.layer"),
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
            encoding=Encoding(activation="relu", subtract_b_dec=True),
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
            encoding=Encoding(activation="gated", subtract_b_dec=True),
            tensors={"b_gate": t["gate_bias"], "b_mag": t["mag_bias"], "r_mag": t["r_mag"]},
            meta=meta,
        )
    if cls == "JumpReluAutoEncoder":
        _need(t, ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"), path)
        return SparseDictionary(
            t["W_enc"],
            t["b_enc"],
            t["W_dec"],
            t["b_dec"],
            encoding=Encoding(activation="jumprelu", subtract_b_dec=False),
            tensors={"threshold": t["threshold"]},
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
            encoding=Encoding(
                activation="topk", k=int(t["k"]), relu_after_topk=False, subtract_b_dec=True
            ),
            meta=meta,
        )
    threshold = t["threshold"].float().expand(W_enc.shape[1]).clone()  # a scalar per dictionary
    return SparseDictionary(
        W_enc,
        b_enc,
        W_dec,
        t["b_dec"],
        encoding=Encoding(activation="batchtopk", subtract_b_dec=True),
        tensors={"threshold": threshold},
        meta=meta,
    )


def _itda(folder: Path) -> SparseDictionary:
    from emdiff.dictionaries.itda import load_itda

    return load_itda(folder)


# ---- sparsify ---------------------------------------------------------------------------------
def _sparsify(folder: Path) -> SparseDictionary:
    cpath = folder / "cfg.json"
    cfg = _read_json(cpath)
    path = folder / "sae.safetensors"
    t = _tensors(path)
    _need(t, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
    # sparsify before groupmax had no "activation" key: every SAE was topk
    if cfg.get("activation", "topk") != "topk":
        raise DictionaryFormatError(f"{cpath}: activation {cfg['activation']!r} is not supported")
    k = require(cfg, "k", cpath, "topk architecture", DictionaryFormatError)
    if "W_skip" in t:
        raise DictionaryFormatError(f"{path}: skip connections (transcoders) are not supported")
    # the hookpoint is the folder's name (sparsify saves one folder per hookpoint)
    hook = cfg.get("hookpoint") or (folder.name if parse_hook(folder.name)[0] is not None else None)
    loc = _locate(hook, None, cpath, "layer")
    if cfg.get("transcode"):  # a transcoder reads the hookpoint module's input, no site of ours
        loc["site"] = None
    return SparseDictionary(
        t["encoder.weight"].T,
        t["encoder.bias"],
        t["W_dec"],
        t["b_dec"],
        encoding=Encoding(
            activation="topk",
            k=int(k),
            relu_after_topk=False,
            # sparsify before transcoders had no "transcode" key: an SAE reads and writes one point
            subtract_b_dec=not cfg.get("transcode", False),
        ),
        meta=DictionaryMeta(
            format="sparsify",
            architecture="topk",
            **loc,
            path=str(folder),
        ),
    )
