"""Q2: which features change between the base and the fine-tuned model on the same tokens.

The same sequences are read twice — by the base model and by the fine-tuned one (a PEFT model with
its adapter switched off and on, or two separate models) — so the comparison is paired by sequence.
Rank by ``rank_increase`` for latents the fine-tune switched on (persona latents) and by
``rank_decrease`` for the ones it switched off ("helpful assistant" latents).
"""

from __future__ import annotations

from dataclasses import replace

from emdiff.analyses.base import Analysis, RunContext
from emdiff.analyses.common import DiffResult, mean_difference
from emdiff.errors import InputError
from emdiff.models.load import has_adapter
from emdiff.stats.compare import RankBy, Test, compare_layers


class ModelDiff(Analysis):
    """Per-feature change fine-tuned minus base on the context's dataset ``dataset``.

    Without ``finetuned``, the context's model must carry an adapter: the base side runs with it
    off, the fine-tuned side with it on. With ``finetuned`` (a variant of the context), the
    context's model as it is is the base. Attention sinks are kept whatever the read spec says:
    they are thresholded on each model's own norms, and both sides must read the same tokens
    (the meta records the read spec as used)."""

    kind = "model_diff"
    dataset: str
    finetuned: str | None = None
    test: Test = "paired_t"
    confidence: float = 0.95
    rank_by: RankBy = "diff"
    """Order by the activation increase (OpenAI's ranking of a fine-tune's latents); ``effect``
    orders by the standardised effect, which favours latents that barely vary."""

    def run(self, ctx: RunContext) -> DiffResult:
        ctx = self.at_positions(ctx)
        rows = ctx.need("dataset", ctx.datasets, self.dataset)
        model = ctx.require_model(self.kind)
        keep = ctx.read.positions.model_copy(update={"exclude_sinks": False})
        ctx = replace(ctx, read=ctx.read.model_copy(update={"positions": keep}))
        if self.finetuned is None:
            if not has_adapter(model):
                raise InputError(
                    "model_diff needs a fine-tuned side: a model with a PEFT adapter, or a "
                    "fine-tuned variant in the run context"
                )
            base, tuned = (model, False), (model, True)
        else:
            base, tuned = model, ctx.need("model variant", ctx.variants, self.finetuned)
        sb, rb = ctx.read_stats(rows, self.dataset, base, "base")
        sa, ra = ctx.read_stats(rows, self.dataset, tuned, self.finetuned or "finetuned")
        table = compare_layers(
            sa,
            sb,
            paired=True,
            test=self.test,
            confidence=self.confidence,
            same_tokens=True,
            labels=("finetuned", "base"),
            rank_by=self.rank_by,
        )
        meta = self.record(
            ctx,
            label_a="finetuned",
            label_b="base",
            paired=True,
            test=self.test,
            n_rows=len(rows),
            rank_by=self.rank_by,
        )
        return DiffResult(self.stem, table, sa, sb, meta, mean_difference=mean_difference(ra, rb))
