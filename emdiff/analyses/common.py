"""What every feature diff shares: collecting statistics under a model variant, and the result."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from emdiff.data.masks import EncodedChat, TokenRole, encode_chat, role_names
from emdiff.dictionaries.base import SparseDictionary
from emdiff.errors import InputError
from emdiff.models.load import adapter_state, model_identity
from emdiff.stats.collect import collect_stats, selection_mask
from emdiff.stats.features import FeatureStats
from emdiff.stats.run import run_stats


@dataclass
class DiffResult:
    """A feature diff: the ranking table and the statistics it was computed from."""

    table: pd.DataFrame
    """One row per (layer, feature); see :func:`emdiff.stats.compare.compare_stats` for columns."""
    stats_a: dict[int, FeatureStats]
    stats_b: dict[int, FeatureStats]
    meta: dict = field(default_factory=dict)
    """What was compared: ``kind``, ``label_a``, ``label_b``, ``paired``, ``test``, sizes."""

    def save(self, out: str | Path, name: str) -> Path:
        """Write ``tables/<name>.parquet`` and ``tables/<name>.json`` (the meta) under ``out``."""
        path = Path(out) / "tables" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(path)
        path.with_suffix(".json").write_text(json.dumps(self.meta, indent=2, default=str))
        return path


def feature_stats(
    model: torch.nn.Module,
    rows: Sequence[EncodedChat],
    dictionaries: Mapping[int, SparseDictionary],
    *,
    adapter: bool | None = None,
    out: str | Path | None = None,
    variant: str = "model",
    dataset: str = "data",
    progress: bool = False,
    **kwargs,
) -> dict[int, FeatureStats]:
    """Feature statistics of ``rows`` per layer, with the model's adapter on, off, or as it is
    (``adapter=None``). With ``out`` the pass is sharded and resumable (``emdiff.stats.run``) and
    the statistics are kept under ``out/stats/<variant>/<dataset>``; reusing that folder with
    another model, adapter or setting is refused."""
    if not rows:
        raise InputError(f"dataset {dataset!r} has no rows: nothing to compute")
    roles = kwargs.get("roles", (TokenRole.ASSISTANT,))
    if not any(any(m) for m in selection_mask(rows, roles, kwargs.get("bos_token_id"))):
        raise InputError(
            f"dataset {dataset!r}: no {role_names(roles)} token selected in any of {len(rows)} "
            "rows: nothing to compute (check the rows' roles and the chat template)"
        )
    ctx = nullcontext() if adapter is None else adapter_state(model, adapter)
    with ctx:
        if out is not None:
            ident = {
                "model": model_identity(model),
                "adapter": adapter,
                "settings": {k: repr(v) for k, v in sorted(kwargs.items())},
            }
            feats, _ = run_stats(
                model,
                rows,
                dictionaries,
                out,
                variant=variant,
                dataset=dataset,
                progress=progress,
                residual=False,
                identity=ident,
                **kwargs,
            )
        else:
            feats, _ = collect_stats(
                model, rows, dictionaries, residual=False, progress=progress, **kwargs
            )
    return feats


def encode_qa(tokenizer, questions: Sequence[str], answers: Sequence[str]) -> list[EncodedChat]:
    """Single-turn chats (user question, assistant answer) through the tokenizer's template."""
    chats = [
        [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
        for q, a in zip(questions, answers, strict=True)
    ]
    return [encode_chat(tokenizer, c) for c in chats]


def token_ids(tokenizer) -> dict[str, int | None]:
    """``bos_token_id`` and ``pad_token_id`` keyword arguments for the statistics pass."""
    pad = tokenizer.pad_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": 0 if pad is None else pad}
