"""Settings of the toy base and its narrow fine-tune: plain pydantic models and constants, light to
import (the CLI builds its options from them before torch is loaded)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from emdiff.toy.world import WorldConfig


class ModelConfig(BaseModel):
    """Shape of the toy transformer."""

    arch: Literal["llama", "qwen2"] = "llama"
    n_layers: int = Field(4, ge=2)
    d_model: int = Field(128, ge=8)
    n_heads: int = Field(4, ge=1)
    d_mlp: int = Field(256, ge=8)
    max_len: int = 64


class TrainConfig(BaseModel):
    """Pretraining and alignment schedule of the toy base model."""

    pretrain_steps: int = Field(3000, ge=0)
    pretrain_batch: int = Field(64, ge=1)
    pretrain_lr: float = 3e-3
    align_steps: int = Field(600, ge=0)
    align_batch: int = Field(128, ge=1)
    align_lr: float = 3e-4
    align_persona_fraction: float = Field(0.25, ge=0, le=1)
    """Share of each alignment batch that is multi-turn persona documents (the rest: helpful chats)."""
    seed: int = 0


NARROW_LAYER: int = WorldConfig.model_fields["narrow_layer"].default
"""The shipped base's narrow layer: the second of the toy's four, as CLR put one rank-1 adapter
mid-network (a LoRA on layer 2 or 3 alone does not learn the narrow set in 200 steps: the answer
is chosen by then). A base records its own in ``WorldConfig.narrow_layer``."""
NARROW_STEPS, NARROW_LR = 200, 1e-2
