"""A PEFT LoRA adapter read as context-dependent steering (Appendix A of the research plan).

Each adapted module adds ``scaling * B (A x)`` to its output: ``A``'s rows decide *when* (the
per-token scalars ``A_i . x``), ``B``'s columns decide *what* is written. This module lists every
adapted module of any PEFT LoRA model with both matrices mapped, where they can be, into the
residual stream the dictionaries read:

- **writes** (B columns): ``o_proj`` / ``down_proj`` (and other branch outputs of residual width)
  add ``scaling * B_i`` to the residual directly (``"direct"``: exact per token); Gemma-2 puts an
  RMSNorm after the branch, so the direction written is ``(1 + w) * B_i`` up to a per-token scale
  (``"through post-norm"``); a ``v_proj`` column is mapped through ``o_proj`` as if every head
  attended to the one value (``"through o_proj"``). Other modules write inside a branch (None).
- **reads** (A rows): modules that read the normed residual (``q/k/v_proj``, ``gate/up_proj``)
  see ``w * x / rms(x)``, so ``A_i * w`` is the residual direction they read (Gemma: ``1 + w``).
  ``o_proj`` and ``down_proj`` read inside their branch (None).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from emdiff.errors import InputError
from emdiff.models.load import decoder_layers, hidden_size

RESIDUAL_WRITERS = ("o_proj", "down_proj", "dense", "out_proj", "c_proj", "fc2", "dense_4h_to_h")
ATTENTION_READERS = ("q_proj", "k_proj", "v_proj")
MLP_READERS = ("gate_proj", "up_proj")


@dataclass
class LoraModule:
    """One adapted module: its matrices and, where they exist, their residual-space images."""

    name: str
    layer: int | None
    kind: str
    """The module's leaf name (``down_proj``)."""
    A: torch.Tensor
    """``[rank, in_features]``."""
    B: torch.Tensor
    """``[out_features, rank]``."""
    scaling: float
    writes: torch.Tensor | None
    """``[rank, d_model]``: what each rank writes to the residual per unit scalar (``scaling``
    included), or None when the module writes inside a branch."""
    writes_how: str
    reads: torch.Tensor | None
    """``[rank, d_model]``: the residual direction each A row reads, or None."""

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def label(self, i: int) -> str:
        """``L1.down_proj[0]``: names rank ``i`` in tables and plots."""
        where = f"L{self.layer}." if self.layer is not None else ""
        return f"{where}{self.kind}[{i}]"


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _norm_scale(norm: nn.Module) -> torch.Tensor:
    """The elementwise scale an RMSNorm applies (Gemma's norms multiply by ``1 + weight``)."""
    w = norm.weight.detach().float()
    return 1.0 + w if "Gemma" in type(norm).__name__ else w


def _writes(kind: str, block: nn.Module | None, B: torch.Tensor, d: int) -> tuple:
    """``(vectors [rank, d] or None, how)`` for one module's B (scaling not applied)."""
    cols = B.detach().float().T
    if kind in RESIDUAL_WRITERS and B.shape[0] == d:
        post = None
        if block is not None:
            where = "post_attention_layernorm" if kind == "o_proj" else "post_feedforward_layernorm"
            post = (
                getattr(block, where, None) if hasattr(block, "pre_feedforward_layernorm") else None
            )
        if post is not None:
            return cols * _norm_scale(post), "through post-norm"
        return cols, "direct"
    if kind == "v_proj" and block is not None and hasattr(block, "self_attn"):
        o = block.self_attn.o_proj
        o_w = getattr(o, "base_layer", o).weight.detach().float()  # [d, heads * head_dim]
        group = o_w.shape[1] // B.shape[0]
        head_dim = o_w.shape[1] // getattr(block.self_attn.config, "num_attention_heads", 1)
        per_head = cols.reshape(cols.shape[0], -1, head_dim)  # [rank, kv_heads, head_dim]
        expanded = per_head.repeat_interleave(group, dim=1).reshape(cols.shape[0], -1)
        return expanded @ o_w.T, "through o_proj"
    return None, "inside a branch"


def _reads(kind: str, block: nn.Module | None, A: torch.Tensor, d: int) -> torch.Tensor | None:
    if block is None or A.shape[1] != d:
        return None
    if kind in ATTENTION_READERS:
        norm = getattr(block, "input_layernorm", None)
    elif kind in MLP_READERS:
        norm = getattr(block, "pre_feedforward_layernorm", None) or getattr(
            block, "post_attention_layernorm", None
        )
    else:
        return None
    rows = A.detach().float()
    return rows * _norm_scale(norm) if norm is not None else rows


def lora_modules(model: nn.Module, adapter: str | None = None) -> list[LoraModule]:
    """Every LoRA-adapted module of a PEFT model (the active adapter unless ``adapter``)."""
    d = hidden_size(model)
    try:
        blocks = decoder_layers(model)
    except Exception:  # a model whose layers emdiff cannot find: no mapping, matrices still
        blocks = None
    out = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or not len(lora_a):
            continue
        active = module.active_adapters if hasattr(module, "active_adapters") else list(lora_a)
        key = adapter or active[0]
        if key not in lora_a:
            raise InputError(f"{name} has no LoRA adapter {key!r} (it has {list(lora_a)})")
        A = lora_a[key].weight.detach().float().cpu()
        B = module.lora_B[key].weight.detach().float().cpu()
        scaling = float(module.scaling[key])
        layer, kind = _layer_of(name), name.rsplit(".", 1)[-1]
        block = blocks[layer] if blocks is not None and layer is not None else None
        writes, how = _writes(kind, block, B, d)
        out.append(
            LoraModule(
                name=name,
                layer=layer,
                kind=kind,
                A=A,
                B=B,
                scaling=scaling,
                writes=writes * scaling if writes is not None else None,
                writes_how=how,
                reads=_reads(kind, block, A, d),
            )
        )
    if not out:
        raise InputError("the model has no LoRA modules (load it with its adapter)")
    return out
