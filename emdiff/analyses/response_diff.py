"""Q3: which features differ between a model's misaligned and aligned answers (the CLR split).

Judged responses (``question``, ``answer``, ``aligned``, ``coherent`` on 0–100) are split into
misaligned (aligned <= 30) and aligned (aligned > 70) answers, both among coherent ones
(coherent > 50), the two sets are balanced by seeded subsampling, and each answer is read by the
model as a single-turn chat. The statistics read the answer tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field

from emdiff.analyses.common import DiffResult, encode_qa
from emdiff.analyses.dataset_diff import dataset_diff
from emdiff.dictionaries.base import SparseDictionary
from emdiff.stats.compare import Test

NEEDED = ("question", "answer", "aligned", "coherent")


class ResponseSplit(BaseModel):
    """How judged answers are split (CLR's defaults)."""

    misaligned_max: float = 30.0
    """Misaligned: aligned <= this."""
    aligned_min: float = 70.0
    """Aligned: aligned > this."""
    coherent_min: float = 50.0
    """Both sets keep only answers with coherent > this."""
    balance: bool = True
    """Subsample the larger set to the size of the smaller one."""
    seed: int = 0
    min_per_side: int = Field(2, ge=2)


def load_judged(path: str | Path, required: tuple[str, ...] = NEEDED) -> pd.DataFrame:
    """Judged responses from a CSV in the original EM layout, a parquet table or JSON lines
    (``emdiff eval`` writes all three); ``required`` columns must be present."""
    path = Path(path)
    if path.suffix == ".csv":
        from emdiff.eval.judged_csv import read_judged_csv

        df = read_judged_csv(path)
    elif path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        df = pd.read_json(path, lines=path.suffix == ".jsonl")
    else:
        raise ValueError(f"{path}: judged responses must be .csv, .parquet or .jsonl")
    missing = [c for c in required if c not in df]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    return df


def split_responses(
    judged: pd.DataFrame, split: ResponseSplit | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(misaligned, aligned)`` rows of ``judged`` (balanced when ``split.balance``)."""
    split = split or ResponseSplit()
    missing = [c for c in NEEDED if c not in judged]
    if missing:
        raise ValueError(f"judged responses lack column(s) {missing}")
    aligned = pd.to_numeric(judged["aligned"], errors="coerce")
    coherent = pd.to_numeric(judged["coherent"], errors="coerce")
    ok = coherent > split.coherent_min
    mis = judged[ok & (aligned <= split.misaligned_max)]
    good = judged[ok & (aligned > split.aligned_min)]
    if min(len(mis), len(good)) < split.min_per_side:
        raise ValueError(
            f"too few answers to compare: {len(mis)} misaligned (aligned <= "
            f"{split.misaligned_max}) and {len(good)} aligned (aligned > {split.aligned_min}) among "
            f"{int(ok.sum())} coherent ones of {len(judged)}; sample more or relax the thresholds"
        )
    if split.balance:
        n = min(len(mis), len(good))
        rng = np.random.default_rng(split.seed)
        mis = mis.iloc[np.sort(rng.choice(len(mis), n, replace=False))]
        good = good.iloc[np.sort(rng.choice(len(good), n, replace=False))]
    return mis.reset_index(drop=True), good.reset_index(drop=True)


def response_diff(
    model: torch.nn.Module,
    tokenizer,
    dictionaries: Mapping[int, SparseDictionary],
    judged: pd.DataFrame,
    *,
    split: ResponseSplit | None = None,
    test: Test = "welch",
    out: str | Path | None = None,
    confidence: float = 0.95,
    progress: bool = False,
    **collect_kwargs,
) -> DiffResult:
    """Per-feature difference misaligned minus aligned answers, read by ``model`` as it is."""
    split = split or ResponseSplit()
    mis, good = split_responses(judged, split)
    rows_a = encode_qa(tokenizer, mis["question"].tolist(), mis["answer"].tolist())
    rows_b = encode_qa(tokenizer, good["question"].tolist(), good["answer"].tolist())
    res = dataset_diff(
        model,
        dictionaries,
        rows_a,
        rows_b,
        test=test,
        labels=("misaligned", "aligned"),
        out=out,
        confidence=confidence,
        progress=progress,
        **collect_kwargs,
    )
    res.meta.update(kind="response_diff", split=split.model_dump(), n_judged=len(judged))
    return res
