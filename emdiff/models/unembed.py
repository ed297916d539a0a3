"""Logit lens of residual-stream directions: what a direction, written into the residual stream,
pushes the model to say next.

A direction ``v`` maps to logits ``(scale * v) @ W_U.T``, where ``W_U`` is the output embedding
and ``scale`` the elementwise gain of the final norm (RMSNorm: its weight; Gemma's
``1 + weight``, read off the module itself), as SAEDashboard computes its logit tables with the
norm's weight folded into ``W_U``. The normalisation by the residual's own norm is left out: it
scales every logit of a direction by the same positive number. Gemma 2's final logit softcap is
monotone and left out too.
"""

from __future__ import annotations

import torch
from torch import nn

from emdiff.errors import InputError
from emdiff.models.load import hidden_size, unwrap

_NORM_PATHS = (
    "model.norm",
    "model.language_model.norm",
    "language_model.model.norm",
    "model.final_layernorm",
    "transformer.ln_f",
    "gpt_neox.final_layer_norm",
)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied after the last decoder layer, or None when there is none to be found."""
    base = unwrap(model)
    for path in _NORM_PATHS:
        try:
            return base.get_submodule(path)
        except AttributeError:
            continue
    return None


@torch.no_grad()
def output_scale(model: nn.Module) -> tuple[torch.Tensor | None, str | None]:
    """The final norm's elementwise gain ``[d_model]`` (float32) and the norm's class name.

    For an RMSNorm the gain is the norm applied to a vector of ones (RMS 1, eps undone), which gives
    ``weight`` or ``1 + weight`` as the architecture defines it; for another norm with a weight
    (LayerNorm) the weight alone (its centring and bias are left out); None without a norm."""
    norm = final_norm(model)
    if norm is None:
        return None, None
    name = type(norm).__name__
    weight = getattr(norm, "weight", None)
    if "RMSNorm" in name and isinstance(weight, torch.Tensor):
        ones = torch.ones(hidden_size(model), dtype=weight.dtype, device=weight.device)
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 0.0)))
        return norm(ones).float() * (1.0 + eps) ** 0.5, name
    if isinstance(weight, torch.Tensor) and weight.ndim == 1:
        return weight.float(), name
    return None, name


@torch.no_grad()
def logit_lens(model: nn.Module, vectors: torch.Tensor, scale: bool = True) -> torch.Tensor:
    """``[n, vocab]`` logits of the directions ``vectors [n, d_model]`` (float32, CPU)."""
    head = unwrap(model).get_output_embeddings()
    w_u = getattr(head, "weight", None)
    if not isinstance(w_u, torch.Tensor) or w_u.ndim != 2:
        raise InputError(f"{type(unwrap(model)).__name__} has no output embedding to read")
    if vectors.shape[-1] != w_u.shape[1]:
        raise InputError(
            f"vectors of width {vectors.shape[-1]} do not fit the unembedding of width "
            f"{w_u.shape[1]}"
        )
    v = vectors.to(w_u.device, torch.float32)
    gain = output_scale(model)[0] if scale else None
    if gain is not None:
        v = v * gain.to(v.device)
    return (v @ w_u.float().T).cpu()
