"""Sparse codes for SAE training: only the active latents of each token take part in the step.

A TopK-style SAE keeps ``k`` of ``d_sae`` latents per token, yet the textbook step decodes a dense
``[B, d_sae]`` code matrix and backpropagates a dense gradient into the encoder: three of its
four large matrix products multiply mostly zeros. Here the dense pre-activations are computed once
without autograd, the active entries are selected (:func:`select_topk`, :func:`select_batchtopk`,
:func:`select_among`), and both the decoder (an ``embedding_bag`` over the active rows of
``W_dec``) and the encoder's gradient (a sparse product with the selected entries) touch only
those entries. The values and gradients equal the dense computation's up to summation order.

A :class:`Codes` holds the active entries in token order: ``rows`` (token), ``cols`` (latent),
``vals`` (activation, differentiable) and ``offsets`` (where each token's entries start).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Codes:
    rows: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor
    offsets: torch.Tensor
    n_tokens: int

    def dense(self, d_sae: int) -> torch.Tensor:
        """The ``[n_tokens, d_sae]`` code matrix (for tests and small inspections)."""
        out = self.vals.new_zeros(self.n_tokens, d_sae)
        return out.index_put((self.rows, self.cols), self.vals, accumulate=True)

    def l0(self) -> float:
        return float((self.vals > 0).sum()) / max(self.n_tokens, 1)

    def fired(self) -> torch.Tensor:
        """Latents with a positive activation on some token (indices, may repeat)."""
        return self.cols[self.vals > 0]


def _offsets(rows: torch.Tensor, n_tokens: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n_tokens)
    return torch.cumsum(counts, 0) - counts


@torch.no_grad()
def select_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k`` largest pre-activations: (rows, cols), token-major."""
    idx = pre.topk(k, dim=-1).indices
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return rows, idx.flatten()


@torch.no_grad()
def select_batchtopk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k x B`` largest pre-activations of the whole batch: (rows, cols), token-major."""
    flat = pre.flatten()
    idx = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False).indices.sort().values
    return idx // pre.shape[1], idx % pre.shape[1]


@torch.no_grad()
def select_among(
    pre: torch.Tensor, allowed: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``k`` largest pre-activations among the latents ``allowed`` (indices)."""
    sub = pre.index_select(1, allowed)
    rows, idx = select_topk(sub, min(k, len(allowed)))
    return rows, allowed[idx]


class _SelectedPre(torch.autograd.Function):
    """The pre-activations at the selected entries, with the gradient of
    ``xc @ W_enc_T.T + b_enc`` computed sparsely: only the selected entries carry a gradient."""

    @staticmethod
    def forward(ctx, xc, W_enc_T, b_enc, offsets, cols, values):  # type: ignore[override]
        ctx.save_for_backward(xc, W_enc_T, offsets, cols)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xc, W_enc_T, offsets, cols = ctx.saved_tensors
        d_sae = W_enc_T.shape[0]
        g_xc = g_W = g_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            g_xc, g_W = _encoder_grads(grad, offsets, cols, xc, W_enc_T, ctx.needs_input_grad)
        if ctx.needs_input_grad[2]:
            g_b = grad.new_zeros(d_sae).index_add_(0, cols, grad)
        return g_xc, g_W, g_b, None, None, None


def _encoder_grads(grad, offsets, cols, xc, W_enc_T, needs):
    """``G @ W_enc_T`` and ``G.T @ xc`` for the sparse ``[B, d_sae]`` gradient ``G``: CSR (twice
    as fast as COO on CPU), or COO where this build lacks a CSR product."""
    shape = (xc.shape[0], W_enc_T.shape[0])
    with warnings.catch_warnings():  # "CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        try:
            crow = torch.cat([offsets, offsets.new_tensor([len(cols)])])
            G = torch.sparse_csr_tensor(crow, cols, grad, shape, check_invariants=False)
            return (G @ W_enc_T if needs[0] else None), (G.t() @ xc if needs[1] else None)
        except NotImplementedError:
            rows = torch.repeat_interleave(
                torch.arange(shape[0], device=cols.device), torch.diff(crow)
            )
            G = torch.sparse_coo_tensor(
                torch.stack([rows, cols]), grad, shape, check_invariants=False
            ).coalesce()
            g_xc = torch.sparse.mm(G, W_enc_T) if needs[0] else None
            return g_xc, (torch.sparse.mm(G.t().coalesce(), xc) if needs[1] else None)


def gather_codes(
    pre: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    encoder: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> Codes:
    """ReLU'd codes at the selected entries of ``pre`` (computed without autograd from
    ``encoder = (xc, W_enc_T, b_enc)``), differentiable with respect to the encoder.
    ``rows`` must be non-decreasing (token-major), as the ``select_*`` functions give them."""
    offsets = _offsets(rows, pre.shape[0])
    values = pre[rows, cols]
    vals = torch.relu(_SelectedPre.apply(*encoder, offsets, cols, values))
    return Codes(rows, cols, vals, offsets, pre.shape[0])


def decode(codes: Codes, W_dec: torch.Tensor, span: tuple[int, int] | None = None) -> torch.Tensor:
    """``codes @ W_dec`` (no bias) over the active entries; ``span`` keeps latents in [a, b)."""
    weights = codes.vals
    if span is not None:
        keep = (codes.cols >= span[0]) & (codes.cols < span[1])
        weights = weights * keep
    return F.embedding_bag(codes.cols, W_dec, codes.offsets, mode="sum", per_sample_weights=weights)
