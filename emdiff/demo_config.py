"""Settings of ``emdiff demo`` (light to import: the CLI reads its defaults)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from emdiff.toy.config import NARROW_LR, NARROW_STEPS


class DemoConfig(BaseModel):
    """Settings of ``emdiff demo``."""

    narrow_domain: str = "medical"
    seeds: int = Field(3, ge=1)
    steps: int = Field(NARROW_STEPS, ge=1)
    lr: float = Field(NARROW_LR, gt=0)
    samples: int = Field(8, ge=1)
    """Sampled answers per eval question (temperature 1)."""
    base: Path | None = None
    eval_seed: int = 1234
    dictionaries: bool = True
    """Also run the dictionary ground truth (probe, SAE, crosscoder, ITDA) on the analysed seed."""
    dict_steps: int = Field(1000, ge=1)
    """Training steps of the SAE and the crosscoder."""
    dict_docs: int | None = Field(None, ge=20)
    """Pretraining documents for the persona probe and the dictionaries (default: 3000 / 4000)."""
    cache: bool = True
    """Reuse the ground truth and dictionaries an earlier run computed from the same inputs and
    code (:mod:`emdiff.stagecache`), and store them for the next run."""
    analyses: list[dict] | None = None
    """The feature diffs (analysis configs, ``kind`` plus fields); default the ``analyses`` of
    the shipped pipeline config ``emdiff/toy/demo.yaml``."""
