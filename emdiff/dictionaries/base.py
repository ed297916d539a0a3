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

from typing import Literal

import torch
from pydantic import BaseModel
from torch import nn

from emdiff.errors import InputError

Activation = Literal["relu", "jumprelu", "topk", "batchtopk", "gated"]
InputNorm = Literal["none", "scale", "constant_norm_rescale", "layer_norm"]


class DictionaryMeta(BaseModel):
    """Where a dictionary comes from and what it reads."""

    format: str
    architecture: str
    layer: int | None = None
    hook: str | None = None
    model_name: str | None = None
    path: str | None = None


class DictionaryShapeError(InputError):
    """A dictionary does not fit the model or the layer it is applied to."""


class SparseDictionary(nn.Module):
    """A sparse dictionary (SAE / transcoder-free crosscoder slice / ITDA-like) in one layout."""

    def __init__(
        self,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        *,
        activation: Activation = "relu",
        meta: DictionaryMeta,
        threshold: torch.Tensor | None = None,
        k: int | None = None,
        b_gate: torch.Tensor | None = None,
        b_mag: torch.Tensor | None = None,
        r_mag: torch.Tensor | None = None,
        subtract_b_dec: bool = False,
        rescale_by_decoder_norm: bool = False,
        relu_after_topk: bool = True,
        input_norm: InputNorm = "none",
        input_scale: float = 1.0,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        d_in, d_sae = W_enc.shape if W_enc.ndim == 2 else (-1, -1)
        if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
            raise DictionaryShapeError(
                f"{meta.path or meta.format}: inconsistent shapes: W_enc {tuple(W_enc.shape)}, "
                f"b_enc {tuple(b_enc.shape)}, W_dec {tuple(W_dec.shape)}, b_dec "
                f"{tuple(b_dec.shape)}; the weight file is damaged or not a dictionary"
            )
        if activation in ("jumprelu", "batchtopk") and threshold is None:
            raise ValueError(f"a {activation} dictionary needs a threshold")
        if activation == "topk" and not k:
            raise ValueError("a topk dictionary needs k")
        if activation == "gated" and (b_gate is None or b_mag is None or r_mag is None):
            raise ValueError("a gated dictionary needs b_gate, b_mag and r_mag")
        self.W_enc, self.b_enc = nn.Parameter(W_enc), nn.Parameter(b_enc)
        self.W_dec, self.b_dec = nn.Parameter(W_dec), nn.Parameter(b_dec)
        for name, t in (
            ("threshold", threshold),
            ("b_gate", b_gate),
            ("b_mag", b_mag),
            ("r_mag", r_mag),
        ):
            self.register_parameter(name, None if t is None else nn.Parameter(t))
        self.requires_grad_(False)
        self.activation, self.k, self.meta = activation, k, meta
        self.subtract_b_dec, self.rescale_by_decoder_norm = subtract_b_dec, rescale_by_decoder_norm
        self.relu_after_topk = relu_after_topk
        self.input_norm, self.input_scale, self.layer_norm_eps = (
            input_norm,
            input_scale,
            layer_norm_eps,
        )

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
            f"layer={m.layer}, hook={m.hook!r})"
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
        if self.rescale_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        if self.relu_after_topk:
            top = pre.topk(self.k, dim=-1)
            vals = torch.relu(top.values)
        else:
            top = torch.relu(pre).topk(self.k, dim=-1)
            vals = top.values
        return torch.zeros_like(pre).scatter_(-1, top.indices, vals)

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


def check_fits(
    dictionary: SparseDictionary,
    d_model: int,
    layer: int | None = None,
    hook: str | None = None,
    *,
    ignore_layer: bool = False,
) -> None:
    """Raise :class:`DictionaryShapeError` when the dictionary cannot read this model and point."""
    m = dictionary.meta
    where = m.path or m.format
    if dictionary.d_in != d_model:
        raise DictionaryShapeError(
            f"{where}: dictionary width d_in={dictionary.d_in} but the model's d_model={d_model}"
        )
    if ignore_layer:
        return
    if layer is not None and m.layer is not None and m.layer != layer:
        raise DictionaryShapeError(
            f"{where} was trained on layer {m.layer} ({m.hook}), not layer {layer}; pass "
            "ignore_layer=True to apply it anyway"
        )
    if hook is not None and m.hook is not None and hook not in m.hook and m.hook not in hook:
        raise DictionaryShapeError(
            f"{where} was trained on hook {m.hook!r}, not {hook!r}; pass ignore_layer=True to "
            "apply it anyway"
        )
