"""One dictionary type for every format: encoder, activation, decoder and input normalisation.

Every supported publisher format (SAELens, Gemma Scope, dictionary_learning, sparsify) is a special
case of the same computation, so the loaders only map tensors and flags onto
:class:`SparseDictionary`:

    x' = normalise(x)                      # none | scale | constant_norm_rescale | layer_norm
    x'' = x' - b_dec   if subtract_b_dec else x'
    pre = x'' @ W_enc + b_enc              # gated: gate = x'' @ W_enc + b_gate
    f = activation(pre)                    # relu | jumprelu | topk | batchtopk | gated
    x_hat' = f @ W_dec + b_dec
    x_hat = denormalise(x_hat')            # only for constant_norm_rescale and layer_norm

Shapes: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]`` (decoder rows are feature directions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import BaseModel, model_validator
from torch import nn

from emdiff.dictionaries.hooknames import module_path, parse_hook, site_hook
from emdiff.errors import InputError
from emdiff.models.load import hidden_size
from emdiff.models.sites import SITES, Site, model_type, module_site

Activation = Literal["relu", "jumprelu", "topk", "batchtopk", "gated"]
InputNorm = Literal["none", "scale", "constant_norm_rescale", "layer_norm"]


class DictionaryMeta(BaseModel):
    """Where a dictionary comes from and what it reads.

    ``hook`` is the publisher's raw hook name (``blocks.20.hook_resid_post``,
    ``blocks.3.attn.hook_z``, ``layers.5.mlp``); ``site`` the hook site emdiff reads it at, None
    when the metadata names none or one emdiff cannot read. Left out, ``layer`` and ``site`` are
    read from ``hook`` (:func:`parse_hook`); given, they must agree with it. A site given without
    a hook gets emdiff's own hook name (:func:`site_hook`).
    """

    format: str
    architecture: str
    layer: int | None = None
    site: Site | None = None
    hook: str | None = None
    model_name: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _from_hook(self) -> DictionaryMeta:
        h_layer, h_site = parse_hook(self.hook)
        if self.site is not None and h_site is not None and self.site != h_site:
            raise ValueError(f"site {self.site!r} disagrees with hook {self.hook!r}")
        if self.layer is not None and h_layer is not None and self.layer != h_layer:
            raise ValueError(f"layer {self.layer} disagrees with hook {self.hook!r}")
        if "site" not in self.model_fields_set:
            self.site = h_site
        if self.layer is None:
            self.layer = h_layer
        if self.hook is None:
            self.hook = site_hook(self.layer, self.site)
        return self


class DictionaryShapeError(InputError):
    """A dictionary does not fit the model or the layer it is applied to."""


class Encoding(BaseModel, frozen=True):
    """How a :class:`SparseDictionary` turns inputs into codes: every setting but the tensors.

    ``k`` is the number of latents kept by ``topk``; ``relu_after_topk`` picks top-k of the raw
    pre-activations then ReLU (SAELens) rather than top-k of the ReLU'd ones (sparsify,
    dictionary_learning); ``input_scale`` is the factor of ``input_norm="scale"`` and
    ``layer_norm_eps`` the eps of ``input_norm="layer_norm"``.
    """

    activation: Activation = "relu"
    k: int | None = None
    subtract_b_dec: bool = False
    rescale_by_decoder_norm: bool = False
    relu_after_topk: bool = True
    input_norm: InputNorm = "none"
    input_scale: float = 1.0
    layer_norm_eps: float = 1e-5


OPTIONAL_TENSORS = ("threshold", "b_gate", "b_mag", "r_mag")
"""Tensors some activations need: ``threshold`` (jumprelu, batchtopk), the rest (gated)."""


class SparseDictionary(nn.Module):
    """A sparse dictionary (SAE / transcoder-free crosscoder slice / ITDA-like) in one layout.

    ``encoding`` holds the settings (each also readable as an attribute: ``d.activation``,
    ``d.k``, ...); ``tensors`` the optional tensors by name (:data:`OPTIONAL_TENSORS`), each an
    attribute too (``d.threshold``, None when absent).
    """

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        *,
        meta: DictionaryMeta,
        encoding: Encoding | None = None,
        tensors: Mapping[str, torch.Tensor | None] | None = None,
    ):
        super().__init__()
        enc, extra = encoding or Encoding(), dict(tensors or {})
        d_in, d_sae = W_enc.shape if W_enc.ndim == 2 else (-1, -1)
        if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
            raise DictionaryShapeError(
                f"{meta.path or meta.format}: inconsistent shapes: W_enc {tuple(W_enc.shape)}, "
                f"b_enc {tuple(b_enc.shape)}, W_dec {tuple(W_dec.shape)}, b_dec "
                f"{tuple(b_dec.shape)}; the weight file is damaged or not a dictionary"
            )
        if unknown := sorted(set(extra) - set(OPTIONAL_TENSORS)):
            raise ValueError(f"unknown tensor(s) {unknown}; use {', '.join(OPTIONAL_TENSORS)}")
        act = enc.activation
        if act in ("jumprelu", "batchtopk") and extra.get("threshold") is None:
            raise ValueError(f"a {act} dictionary needs a threshold")
        if act == "topk" and not enc.k:
            raise ValueError("a topk dictionary needs k")
        if act == "gated" and any(extra.get(n) is None for n in ("b_gate", "b_mag", "r_mag")):
            raise ValueError("a gated dictionary needs b_gate, b_mag and r_mag")
        self.W_enc, self.b_enc = nn.Parameter(W_enc), nn.Parameter(b_enc)
        self.W_dec, self.b_dec = nn.Parameter(W_dec), nn.Parameter(b_dec)
        for name in OPTIONAL_TENSORS:
            t = extra.get(name)
            self.register_parameter(name, None if t is None else nn.Parameter(t))
        self.requires_grad_(False)
        self.encoding, self.meta = enc, meta

    # ---- shape --------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    @property
    def decoder_rows(self) -> torch.Tensor:
        """``[d_sae, d_in]``: the direction each feature writes."""
        return self.W_dec

    def __repr__(self) -> str:
        m = self.meta
        return (
            f"SparseDictionary({m.format}/{self.activation}, d_in={self.d_in}, d_sae={self.d_sae}, "
            f"layer={m.layer}, site={m.site}, hook={m.hook!r})"
        )

    # ---- normalisation ------------------------------------------------------------------------
    def normalise(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
        """Input normalisation and what :meth:`denormalise` needs to undo it (SAELens rules:
        ``scale`` multiplies by a fixed factor and divides the output by it, as SAELens 6 folds
        ``expected_average_only_in``; ``layer_norm`` uses the unbiased std plus eps on input)."""
        if self.input_norm == "none":
            return x, None
        if self.input_norm == "scale":
            return x * self.input_scale, None
        if self.input_norm == "constant_norm_rescale":
            scale = (self.d_in**0.5) / x.norm(dim=-1, keepdim=True)
            return x * scale, (scale,)
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        std = xc.std(dim=-1, keepdim=True)
        return xc / (std + self.layer_norm_eps), (mu, std)

    def denormalise(self, x_hat: torch.Tensor, state: tuple | None) -> torch.Tensor:
        if self.input_norm == "scale":
            return x_hat / self.input_scale
        if self.input_norm == "constant_norm_rescale":
            return x_hat / state[0]
        if self.input_norm == "layer_norm":
            return x_hat * state[1] + state[0]
        return x_hat

    # ---- encode / decode ----------------------------------------------------------------------
    def _encode_normalised(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.subtract_b_dec:
            x = x - self.b_dec
        if self.activation == "gated":
            gate = x @ self.W_enc + self.b_gate
            mag = torch.relu(x @ (self.W_enc * torch.exp(self.r_mag)) + self.b_mag)
            return (gate > 0).to(mag.dtype) * mag
        pre = x @ self.W_enc + self.b_enc
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        if self.activation == "batchtopk":  # inference rule: a per-feature threshold
            post = torch.relu(pre)
            return post * (post > self.threshold)
        return self._topk_codes(pre)

    def _topk_codes(self, pre: torch.Tensor) -> torch.Tensor:
        top = self._topk(pre)
        return torch.zeros_like(pre).scatter_(-1, top[1], top[0])

    def _topk(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A TopK dictionary's kept values (ReLU'd) and their latents."""
        if self.rescale_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        if self.relu_after_topk:
            top = pre.topk(self.k, dim=-1)
            return torch.relu(top.values), top.indices
        top = torch.relu(pre).topk(self.k, dim=-1)
        return top.values, top.indices

    def _threshold_entries(self, mm: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Entries of a threshold rule from ``mm = x @ W_enc``. ``relu(pre) * (pre > t)`` (and
        the BatchTopK rule) is nonzero where ``pre > max(t, 0)``, ``pre = mm + b_enc``. The bias
        is not added to the whole matrix: candidates pass a test on ``mm`` with a margin far
        wider than rounding, then the exact test runs on the few candidates' ``pre``."""
        b = self.b_enc
        floor = torch.zeros_like(b) if self.activation == "relu" else self.threshold.clamp_min(0)
        margin = 16 * torch.finfo(mm.dtype).eps  # relative; rounding is below one eps
        loose = (floor - b) - margin * (floor.abs() + b.abs()) - torch.finfo(mm.dtype).tiny
        d_sae = mm.shape[1]
        flat = _sparse_nonzero((mm > loose).view(-1))
        cols = flat % d_sae
        vals = mm.view(-1).index_select(0, flat) + b.index_select(0, cols)
        keep = (vals > floor.index_select(0, cols)).nonzero().squeeze(1)
        flat = flat.index_select(0, keep)
        return flat // d_sae, cols.index_select(0, keep), vals.index_select(0, keep)

    def encode_entries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The nonzero activations of :meth:`encode` for ``x [N, d_in]`` as ``(token, latent,
        value)``, token-major, equal to ``encode(x)`` then ``nonzero`` but without building and
        scanning the dense ``[N, d_sae]`` codes where the activation allows (threshold and TopK
        rules): what streaming statistics need."""
        if x.dim() != 2 or self.activation == "gated":
            f = self.encode(x.reshape(-1, x.shape[-1]))
            rows, cols = f.nonzero(as_tuple=True)
            return rows, cols, f[rows, cols]
        if x.shape[-1] != self.d_in:
            self.encode(x)  # raises the shape error
        xn = self.normalise(x)[0].to(self.W_enc.dtype)
        if self.subtract_b_dec:
            xn = xn - self.b_dec
        if self.activation in ("jumprelu", "batchtopk", "relu"):
            return self._threshold_entries(xn @ self.W_enc)
        pre = xn @ self.W_enc + self.b_enc
        vals, idx = self._topk(pre)
        idx, order = idx.sort(dim=-1)  # latent order within a token, as nonzero gives it
        vals = vals.gather(1, order)
        keep = (vals > 0).view(-1).nonzero().squeeze(1)
        rows = torch.arange(len(x), device=x.device).repeat_interleave(self.k)
        return rows[keep], idx.reshape(-1)[keep], vals.reshape(-1)[keep]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., d_sae]`` for residual vectors ``[..., d_in]``."""
        if x.shape[-1] != self.d_in:
            raise DictionaryShapeError(
                f"{self!r} reads vectors of width {self.d_in}, got width {x.shape[-1]}"
            )
        return self._encode_normalised(self.normalise(x)[0])

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """``f @ W_dec + b_dec`` in the dictionary's (normalised) input space."""
        if self.rescale_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` in the model's space (normalisation undone)."""
        xn, state = self.normalise(x)
        return self.denormalise(self.decode(self._encode_normalised(xn)), state)


def _sparse_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """``mask.nonzero()`` of a mostly-false 1-D bool mask, about 3x faster on CPU: the mask is
    read as 64-bit words, and only the words with a set byte are expanded."""
    pad = (-mask.numel()) % 8
    if pad:
        mask = torch.cat([mask, mask.new_zeros(pad)])
    hot = (mask.view(torch.int64) != 0).nonzero().squeeze(1)
    rows, cols = mask.view(-1, 8).index_select(0, hot).nonzero(as_tuple=True)
    return hot.index_select(0, rows) * 8 + cols


def _encoding_setting(name: str) -> property:
    return property(lambda self: getattr(self.encoding, name), doc=f"``encoding.{name}``")


for _name in Encoding.model_fields:  # d.activation, d.k, ...: read-only views of d.encoding
    setattr(SparseDictionary, _name, _encoding_setting(_name))


def _point(layer: int | None, site: str | None) -> str:
    parts = ([f"layer {layer}"] if layer is not None else []) + ([site] if site else [])
    return " ".join(parts)


def same_tensor(l1: int | None, s1: str | None, l2: int | None, s2: str | None) -> bool:
    """``resid_post`` of layer L is ``resid_pre`` of layer L + 1: the same tensor."""
    points = {(l1, s1), (l2, s2)}
    return any(
        (layer, "resid_post") in points and (layer + 1, "resid_pre") in points
        for layer, _ in points
        if layer is not None
    )


def check_fits(
    dictionary: SparseDictionary,
    model: nn.Module | int,
    layer: int | None = None,
    site: Site | None = None,
    *,
    ignore_layer: bool = False,
) -> None:
    """Raise :class:`DictionaryShapeError` when the dictionary cannot read ``model`` (or a model
    of width ``model``) at ``(layer, site)``: another width, another layer or site than its own,
    or a hook emdiff cannot read. Given the model, a module-path hook (sparsify's
    ``layers.L.mlp``) is resolved in its architecture (on Gemma2 ``mlp`` is no site: its output
    is normalised again). ``ignore_layer=True`` checks the width only. What the dictionary does
    not record (layer, or both site and hook) is not checked."""
    m = dictionary.meta
    where = m.path or m.format
    d_model = model if isinstance(model, int) else hidden_size(model)
    if dictionary.d_in != d_model:
        raise DictionaryShapeError(
            f"{where}: dictionary width d_in={dictionary.d_in} but the model's d_model={d_model}"
        )
    if ignore_layer:
        return
    asked = _point(layer, site) or "any point"
    own = m.site
    path = module_path(m.hook)
    if path is not None and not isinstance(model, int):
        own = module_site(model, path[1])
        if own is None:
            raise DictionaryShapeError(
                f"{where} reads the output of module {path[1]!r} ({m.hook!r}), which on "
                f"{model_type(model)} is none of the sites emdiff reads ({', '.join(SITES)}), so "
                f"it cannot be applied at {asked}"
            )
    if own is None and m.hook is not None:
        raise DictionaryShapeError(
            f"{where} was trained on hook {m.hook!r}, which is none of the sites emdiff reads "
            f"({', '.join(SITES)}), so it cannot be applied at {asked}; if that hook is in fact "
            "one of them, set the dictionary's meta.site"
        )
    if same_tensor(m.layer, own, layer, site):
        return
    layer_clash = layer is not None and m.layer is not None and m.layer != layer
    if layer_clash or (site is not None and own is not None and own != site):
        hook = f" (hook {m.hook!r})" if m.hook and m.hook != own else ""
        raise DictionaryShapeError(
            f"{where} was trained on {_point(m.layer, own)}{hook}, not {asked}; to apply it "
            "elsewhere on purpose, set its meta.layer / meta.site to the point you mean"
        )
