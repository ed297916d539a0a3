"""Q1: which features differ between two datasets read by the same model.

The headline use: the narrowly misaligned training set (bad medical advice) against its aligned twin
(good medical advice), both read by the aligned model. Datasets that share their prompts row by row
can be compared *paired* (row ``i`` of ``a`` against row ``i`` of ``b``).
"""

from __future__ import annotations

from emdiff.analyses.base import Analysis, RunContext
from emdiff.analyses.common import DiffResult, mean_difference
from emdiff.errors import InputError
from emdiff.stats.compare import Test, compare_layers


class DatasetDiff(Analysis):
    """Per-feature difference between the datasets ``a`` and ``b`` of the context (a minus b).

    ``adapter=False`` reads with the base of a PEFT model (the aligned model), ``True`` with the
    adapter on, None the model as it is. ``test`` defaults to the design's (paired or Welch)."""

    kind = "dataset_diff"
    a: str
    b: str
    paired: bool = False
    test: Test | None = None
    adapter: bool | None = None
    confidence: float = 0.95

    def run(self, ctx: RunContext) -> DiffResult:
        if self.a == self.b:
            raise InputError(f"the two datasets need different names, got {self.a!r} twice")
        ctx = self.at_positions(ctx)
        rows_a = ctx.need("dataset", ctx.datasets, self.a)
        rows_b = ctx.need("dataset", ctx.datasets, self.b)
        if self.paired and len(rows_a) != len(rows_b):
            raise InputError(
                f"paired datasets must have the same number of rows, got {len(rows_a)} "
                f"({self.a}) and {len(rows_b)} ({self.b}); compare them unpaired instead"
            )
        model = ctx.require_model(self.kind)
        variant = model if self.adapter is None else (model, self.adapter)
        name = {None: "model", True: "adapter_on", False: "adapter_off"}[self.adapter]
        sa, ra = ctx.read_stats(rows_a, self.a, variant, name)
        sb, rb = ctx.read_stats(rows_b, self.b, variant, name)
        table = compare_layers(
            sa,
            sb,
            paired=self.paired,
            test=self.test,
            confidence=self.confidence,
            labels=(self.a, self.b),
        )
        meta = self.record(
            ctx,
            label_a=self.a,
            label_b=self.b,
            paired=self.paired,
            test=str(table["test"].iloc[0]),
            n_rows_a=len(rows_a),
            n_rows_b=len(rows_b),
        )
        return DiffResult(self.stem, table, sa, sb, meta, mean_difference=mean_difference(ra, rb))
