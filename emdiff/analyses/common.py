"""What every feature diff shares: its result (ranking table, statistics, meta, volcano plot)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from emdiff.analyses.base import save_meta
from emdiff.data.masks import EncodedChat, encode_chat
from emdiff.stats.features import FeatureStats


@dataclass
class DiffResult:
    """A feature diff: the ranking table and the statistics it was computed from."""

    name: str
    table: pd.DataFrame
    """One row per (layer, feature); see :func:`emdiff.stats.compare.compare_stats` for columns."""
    stats_a: dict[int, FeatureStats]
    stats_b: dict[int, FeatureStats]
    meta: dict = field(default_factory=dict)
    """What was compared: ``kind``, ``config``, ``read`` (the read spec), ``label_a``,
    ``label_b``, ``paired``, ``test``, sizes."""
    highlight: int | None = None
    """A feature to ring in the volcano plot (the toy's known persona latent)."""

    def save(self, out: str | Path) -> list[Path]:
        """``tables/<name>.parquet``, ``tables/<name>.json`` (the meta) and ``plots/<name>.png``."""
        from emdiff.report.plots import volcano_plot

        path = Path(out) / "tables" / f"{self.name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(path)
        meta = save_meta(self.meta, path.with_suffix(".json"))
        title = f"{self.meta.get('label_a', 'a')} vs {self.meta.get('label_b', 'b')}"
        plot = volcano_plot(
            self.table,
            Path(out) / "plots" / f"{self.name}.png",
            title=title,
            highlight=self.highlight,
        )
        return [path, meta, plot]

    def summary(self, alpha: float = 0.05) -> dict:
        """Sizes, the test, how many features pass q < alpha, and the top feature each way."""
        t = self.table
        top = {
            f"top_{d}": int(t.loc[t[f"rank_{d}"] == 1, "feature"].iloc[0])
            for d in ("increase", "decrease")
            if (t[f"rank_{d}"] == 1).any()
        }
        return {
            **self.meta,
            "n_features": len(t),
            "n_significant": int((t["q"] < alpha).sum()),
            **top,
        }


def encode_qa(tokenizer, questions: Sequence[str], answers: Sequence[str]) -> list[EncodedChat]:
    """Single-turn chats (user question, assistant answer) through the tokenizer's template."""
    chats = [
        [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
        for q, a in zip(questions, answers, strict=True)
    ]
    return [encode_chat(tokenizer, c) for c in chats]
