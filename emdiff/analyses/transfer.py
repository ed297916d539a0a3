"""Transfer: does a dictionary trained on one model still work on others (chat, fine-tuned)?

For each model variant, splice the dictionary's reconstruction into the model at the read spec's
layer and site and measure the fraction of variance explained, L0, and the cross-entropy and KL
change against the same model unspliced (:func:`emdiff.dictionaries.evaluate.reconstruction_metrics`).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from emdiff.analyses.base import Analysis, RunContext, save_meta
from emdiff.dictionaries.base import check_fits
from emdiff.dictionaries.evaluate import reconstruction_metrics
from emdiff.errors import InputError
from emdiff.models.load import adapter_state


@dataclass
class TransferResult:
    """One row per variant: ``fve`` (1 - FVU), ``fvu``, ``l0``, ``dead_fraction``, ``ce_clean``,
    ``ce_spliced``, ``ce_delta``, ``ce_recovered``, ``kl``, ``n_tokens``."""

    name: str
    table: pd.DataFrame
    meta: dict = field(default_factory=dict)

    def save(self, out: str | Path) -> list[Path]:
        """``tables/<name>.parquet`` (+ ``.json``) and ``plots/<name>.png``."""
        from emdiff.report.plots import transfer_plot

        path = Path(out) / "tables" / f"{self.name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(path)
        meta = save_meta(self.meta, path.with_suffix(".json"))
        title = self.meta.get("title", "dictionary spliced into each model")
        return [
            path,
            meta,
            transfer_plot(self.table, Path(out) / "plots" / f"{self.name}.png", title),
        ]

    def summary(self) -> dict:
        cols = [c for c in ("fve", "l0", "ce_delta", "kl") if c in self.table]
        several = self.table["layer"].nunique() > 1
        out = {}
        for r in self.table.itertuples():
            tail = f"_L{r.layer}" if several else ""
            out |= {f"{c}_{r.variant}{tail}": float(getattr(r, c)) for c in cols}
        return out


class Transfer(Analysis):
    """Splice the context's dictionary into each named variant (default: every variant of the
    context) on the answer tokens of dataset ``dataset``."""

    kind = "transfer"
    dataset: str
    variants: tuple[str, ...] | None = None
    splice: bool = True
    """Also measure the CE and KL change (three forward passes per batch instead of one)."""

    def run(self, ctx: RunContext) -> TransferResult:
        ctx = self.at_positions(ctx)
        rows = ctx.need("dataset", ctx.datasets, self.dataset)
        names = self.variants if self.variants is not None else tuple(ctx.variants)
        if not names:
            raise InputError("transfer needs at least one model variant: nothing to compute")
        ctx.require_model(self.kind)
        out = []
        for layer in ctx.read.layers:
            out += self._at(ctx.read.at(layer), ctx, names, rows)
        meta = self.record(ctx, variants=list(names), n_rows=len(rows))
        return TransferResult(self.stem, pd.DataFrame(out), meta)

    def _at(self, read, ctx: RunContext, names, rows) -> list[dict]:
        """One layer's rows: each variant with the dictionary spliced in there."""
        layer = read.layer
        dictionary = ctx.need("dictionary for layer", ctx.dictionaries, layer)
        out = []
        for name in names:
            v = ctx.need("model variant", ctx.variants, name)
            model, adapter = v if isinstance(v, tuple) else (v, None)
            check_fits(dictionary, model, layer, ctx.read.site)
            with nullcontext() if adapter is None else adapter_state(model, adapter):
                m = reconstruction_metrics(
                    model,
                    dictionary,
                    rows,
                    read,
                    batch_size=ctx.stats_cfg.batch_size,
                    splice=self.splice,
                    progress=ctx.stats_cfg.progress,
                )
            out.append({"variant": name, "layer": layer, "fve": 1.0 - m.fvu, **m.model_dump()})
        return out
