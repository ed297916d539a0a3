"""Q2: which features change between the base and the fine-tuned model on the same tokens.

The same sequences are read twice — by the base model and by the fine-tuned one (a PEFT model with
its adapter switched off and on, or two separate models) — so the comparison is paired by sequence.
Rank by ``rank_increase`` for latents the fine-tune switched on (persona latents) and by
``rank_decrease`` for the ones it switched off ("helpful assistant" latents).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from emdiff.analyses.common import DiffResult, feature_stats
from emdiff.data.masks import EncodedChat
from emdiff.dictionaries.base import SparseDictionary
from emdiff.models.load import has_adapter
from emdiff.stats.compare import Test, compare_layers


def model_diff(
    model: torch.nn.Module,
    dictionaries: Mapping[int, SparseDictionary],
    rows: Sequence[EncodedChat],
    *,
    finetuned: torch.nn.Module | None = None,
    test: Test = "paired_t",
    dataset: str = "data",
    out: str | Path | None = None,
    confidence: float = 0.95,
    progress: bool = False,
    **collect_kwargs,
) -> DiffResult:
    """Per-feature change fine-tuned minus base on ``rows`` (side a = fine-tuned, b = base).

    Without ``finetuned``, ``model`` must carry an adapter: the base side runs with it off, the
    fine-tuned side with it on. With ``finetuned``, ``model`` is the base as it is. Attention
    sinks are kept unless ``exclude_sinks=True`` is passed, so both sides read the same tokens.
    """
    if finetuned is None and not has_adapter(model):
        raise ValueError(
            "model_diff needs a fine-tuned side: pass a model with a PEFT adapter, or finetuned="
        )
    # sink removal thresholds each model's own norms, so the two sides could keep other tokens
    collect_kwargs.setdefault("exclude_sinks", False)
    common = dict(out=out, dataset=dataset, progress=progress, **collect_kwargs)
    if finetuned is None:
        sb = feature_stats(model, rows, dictionaries, adapter=False, variant="base", **common)
        sa = feature_stats(model, rows, dictionaries, adapter=True, variant="finetuned", **common)
    else:
        sb = feature_stats(model, rows, dictionaries, variant="base", **common)
        sa = feature_stats(finetuned, rows, dictionaries, variant="finetuned", **common)
    table = compare_layers(
        sa,
        sb,
        paired=True,
        test=test,
        confidence=confidence,
        same_tokens=True,
        labels=("finetuned", "base"),
    )
    meta = dict(
        kind="model_diff",
        label_a="finetuned",
        label_b="base",
        paired=True,
        test=test,
        dataset=dataset,
        layers=sorted(dictionaries),
        n_rows=len(rows),
        confidence=confidence,
    )
    return DiffResult(table, sa, sb, meta)
