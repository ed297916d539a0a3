"""Steering and ablation as an analysis (``steer``): a saved direction swept over scales, layers
and interventions (add it, project it out at one or all layers, project it out of the LoRA's B),
each beside matched random directions, scored by sampling the questions and judging the answers
with the configured judge (EM rate with its CI, coherence). Answers are kept per configuration
under ``out/steer_answers/<name>/`` so a rerun resumes."""

from __future__ import annotations

from pydantic import Field

from emdiff.analyses.base import Analysis, RunContext
from emdiff.directions.direction import Direction
from emdiff.errors import InputError
from emdiff.eval.run import JudgeConfig, load_question_files, make_judge
from emdiff.eval.sample import SamplingConfig
from emdiff.interventions.sweep import JudgedScorer, SweepConfig, SweepResult, intervention_sweep


class Steer(Analysis):
    """Sweep the direction ``direction`` (a file, or an earlier ``direction`` result by name; see
    the module docstring). ``layers`` default to the direction's own layer."""

    kind = "steer"
    direction: str
    questions: tuple[str, ...] = Field(min_length=1)
    """Question files (YAML in the original EM layout, or JSONL)."""
    layers: tuple[int, ...] = ()
    sweep: SweepConfig = SweepConfig()
    judge: JudgeConfig = JudgeConfig()
    sampling: SamplingConfig = SamplingConfig()

    def _direction(self, ctx: RunContext) -> Direction:
        """A direction file, or an earlier ``direction`` result of the run by name (its
        direction at the first of ``layers``, else at its first layer)."""
        from emdiff.analyses.directions import DirectionResult

        earlier = ctx.results.get(self.direction)
        if not isinstance(earlier, DirectionResult):
            return Direction.load(self.direction)
        layer = self.layers[0] if self.layers else min(earlier.directions)
        if layer not in earlier.directions:
            raise InputError(
                f"steer: {self.direction!r} has directions at layers {sorted(earlier.directions)}, "
                f"not {layer}"
            )
        return earlier.directions[layer]

    def run(self, ctx: RunContext) -> SweepResult:
        if ctx.model is None or ctx.tokenizer is None:
            raise InputError("steer samples answers: the run context has no model or tokenizer")
        if ctx.out is None:
            raise InputError("steer keeps sampled answers on disk: the run context has no out")
        v = self._direction(ctx)
        questions = load_question_files(self.questions)
        folder = ctx.out / "steer_answers" / self.stem
        base = getattr(ctx.model, "get_base_model", lambda: ctx.model)()
        judge = make_judge(
            self.judge, folder / "judge_cache.sqlite", toy_path=base.config._name_or_path
        )
        scorer = JudgedScorer(ctx.tokenizer, questions, judge, self.sampling, folder)
        cfg = self.sweep.model_copy(update={"site": v.site})
        layers = self.layers or (v.layer,)
        res = intervention_sweep(
            ctx.model, {layer: v.vector for layer in layers}, scorer, cfg, name=self.stem
        )
        res.meta.update(self.record(ctx, direction=v.name, direction_layer=v.layer))
        return res
