"""The settings of sampling and judging: plain pydantic models, light to import (the CLI builds its
options from them before anything heavy is loaded)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class SamplingConfig(BaseModel):
    """How answers are sampled."""

    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(600, ge=1)
    seed: int = 0
    samples_per_paraphrase: int | None = Field(None, ge=1)
    """Overrides every question's own ``samples_per_paraphrase`` when set."""
    include_system: bool = True
    """Send the YAML ``system`` prompt. The original open-model script dropped it: set False."""
    batch_size: int = Field(32, ge=1)
    """Not part of the run's identity: changing it on resume is allowed (samples then differ from
    an uninterrupted run, but stay valid draws)."""


class JudgeConfig(BaseModel):
    """Which judge to use and how to reach it."""

    kind: Literal["openai", "hf", "toy"] = "openai"
    """``openai``: any OpenAI-compatible server; ``hf``: a local causal LM; ``toy``: exact."""
    model: str | None = None
    """Judge model name (``openai``) or local path / hub id (``hf``)."""
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (the key itself is never stored)."""
    concurrency: int = Field(8, ge=1)
    max_retries: int = Field(6, ge=0)
    timeout: float = Field(60.0, gt=0)
