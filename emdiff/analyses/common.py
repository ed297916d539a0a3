"""What every feature diff shares: its result (ranking table, statistics, meta, volcano plot)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

from emdiff.analyses.base import save_meta
from emdiff.data.masks import EncodedChat, encode_chat
from emdiff.stats.features import FeatureStats, ResidualStats


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
    mean_difference: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per layer, the raw mean activation of side a minus side b over the tokens read (for Q3,
    CLR's misalignment direction); empty when residual statistics were off."""

    def direction(self, layer: int | None = None) -> torch.Tensor:
        """The unit mean-difference direction at ``layer`` (the only one when None)."""
        if not self.mean_difference:
            raise ValueError(f"{self.name}: no mean difference (residual statistics were off)")
        layer = next(iter(self.mean_difference)) if layer is None else layer
        d = self.mean_difference[layer]
        return d / d.norm().clamp_min(1e-12)

    def save(self, out: str | Path) -> list[Path]:
        """``tables/<name>.parquet``, ``tables/<name>.json`` (the meta) and ``plots/<name>.png``."""
        from emdiff.report.plots import volcano_plot

        path = Path(out) / "tables" / f"{self.name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(path)
        meta = save_meta(self.meta, path.with_suffix(".json"))
        written = [path, meta]
        if self.mean_difference:
            diff = path.with_name(f"{self.name}.mean_difference.safetensors")
            save_file(
                {f"L{k}": v.float().contiguous() for k, v in self.mean_difference.items()}, diff
            )
            written.append(diff)
        title = f"{self.meta.get('label_a', 'a')} vs {self.meta.get('label_b', 'b')}"
        plot = volcano_plot(
            self.table,
            Path(out) / "plots" / f"{self.name}.png",
            title=title,
            highlight=self.highlight,
        )
        return [*written, plot]

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


def mean_difference(
    ra: dict[int, ResidualStats], rb: dict[int, ResidualStats]
) -> dict[int, torch.Tensor]:
    """Per layer present on both sides: mean residual of a minus that of b (float32, CPU)."""
    return {k: (ra[k].mean - rb[k].mean).float().cpu() for k in ra if k in rb}


def encode_qa(
    tokenizer, questions: Sequence[str], answers: Sequence[str], follow_up: str | None = None
) -> list[EncodedChat]:
    """Single-turn chats (user question, assistant answer) through the tokenizer's template; with
    ``follow_up``, a second user turn and the generation prompt after each answer (read it at
    positions ``last``: the model's state for its next answer after reading the first)."""
    chats = [
        [{"role": "user", "content": str(q)}, {"role": "assistant", "content": str(a)}]
        + ([{"role": "user", "content": follow_up}] if follow_up is not None else [])
        for q, a in zip(questions, answers, strict=True)
    ]
    return [encode_chat(tokenizer, c, follow_up is not None) for c in chats]
