"""Q1: which features differ between two datasets read by the same model.

The headline use: the narrowly misaligned training set (bad medical advice) against its aligned twin
(good medical advice), both read by the aligned model. Datasets that share their prompts row by row
can be compared *paired* (row ``i`` of ``a`` against row ``i`` of ``b``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from emdiff.analyses.common import DiffResult, feature_stats
from emdiff.data.masks import EncodedChat
from emdiff.dictionaries.base import SparseDictionary
from emdiff.stats.compare import Test, compare_layers


def dataset_diff(
    model: torch.nn.Module,
    dictionaries: Mapping[int, SparseDictionary],
    rows_a: Sequence[EncodedChat],
    rows_b: Sequence[EncodedChat],
    *,
    paired: bool = False,
    test: Test | None = None,
    adapter: bool | None = None,
    labels: tuple[str, str] = ("a", "b"),
    out: str | Path | None = None,
    confidence: float = 0.95,
    progress: bool = False,
    **collect_kwargs,
) -> DiffResult:
    """Per-feature difference between ``rows_a`` and ``rows_b`` (a minus b) under ``model``.

    ``dictionaries`` maps layer -> dictionary. ``collect_kwargs`` go to the statistics pass
    (``roles`` — answer tokens by default —, ``bos_token_id``, ``pad_token_id``, ``site``,
    ``batch_size``, ...). ``adapter=False`` reads with the base of a PEFT model. With ``out`` the
    statistics are resumable on disk under ``out/stats/<variant>/<label>``.
    """
    if paired and len(rows_a) != len(rows_b):
        raise ValueError(
            f"paired datasets must have the same number of rows, got {len(rows_a)} and "
            f"{len(rows_b)}; pass paired=False to compare them as independent samples"
        )
    if labels[0] == labels[1]:
        raise ValueError(f"the two datasets need different labels, got {labels}")
    variant = {None: "model", True: "adapter_on", False: "adapter_off"}[adapter]
    common = dict(adapter=adapter, out=out, variant=variant, progress=progress, **collect_kwargs)
    sa = feature_stats(model, rows_a, dictionaries, dataset=labels[0], **common)
    sb = feature_stats(model, rows_b, dictionaries, dataset=labels[1], **common)
    table = compare_layers(sa, sb, paired=paired, test=test, confidence=confidence, labels=labels)
    meta = dict(
        kind="dataset_diff",
        label_a=labels[0],
        label_b=labels[1],
        paired=paired,
        test=str(table["test"].iloc[0]),
        adapter=adapter,
        layers=sorted(dictionaries),
        n_rows_a=len(rows_a),
        n_rows_b=len(rows_b),
        confidence=confidence,
    )
    return DiffResult(table, sa, sb, meta)
