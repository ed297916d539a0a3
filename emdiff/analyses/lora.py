"""What a LoRA learnt and when, as analyses:

- :class:`LoraRead` (``lora``): every rank of the context model's adapter, B mapped into the
  residual and decomposed over the context's dictionary (when there is one) and compared with
  saved directions; with a judged table, the per-token scalars over the answers (the signs that
  orient each rank) and L1 probes, misaligned vs aligned over every answer (``general``) and
  within each domain of the table's ``domain`` column, against shuffled labels.
- :class:`LoraPhases` (``phases``): the trajectory of a fine-tune's ``checkpoint-STEP`` folders
  (:mod:`emdiff.lora.phases`); with questions and a judge, the EM rate of every ``em_every``-th
  checkpoint, sampled and judged with the context model's adapter set to that checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from emdiff.analyses.base import Analysis, RunContext
from emdiff.analyses.common import encode_qa
from emdiff.analyses.response_diff import ResponseSplit, split_responses
from emdiff.data.positions import Positions
from emdiff.directions.decompose import DecomposeConfig
from emdiff.directions.direction import Direction
from emdiff.errors import InputError
from emdiff.eval.run import JudgeConfig, load_question_files, make_judge
from emdiff.eval.sample import SamplingConfig
from emdiff.lora.interpret import LoraReading, read_lora, scalar_signs
from emdiff.lora.phases import Phases, load_checkpoints, phases
from emdiff.lora.probes import ProbeConfig, ProbeResult, scalar_probes
from emdiff.lora.scalars import lora_scalars, per_row
from emdiff.models.read import selection


@dataclass
class LoraResult:
    """The reading of every rank, and with judged answers the scalars and the probes."""

    name: str
    reading: LoraReading
    scalars: pd.DataFrame | None = None
    probes: ProbeResult | None = None
    meta: dict = field(default_factory=dict)

    def save(self, out: str | Path) -> list[Path]:
        """``tables/<name>_ranks.csv``, a decomposition per rank (table and plot),
        ``tables/<name>_scalars.parquet`` (per token), ``tables/<name>_probes.csv`` and
        ``_coefficients.csv``, ``plots/<name>_scalars.png``."""
        from emdiff.report.lora_plots import scalar_plot

        out = Path(out)
        files = self.reading.save(out, self.name)
        if self.scalars is not None:
            path = out / "tables" / f"{self.name}_scalars.parquet"
            self.scalars.to_parquet(path)
            files += [path, scalar_plot(self.scalars, out / "plots" / f"{self.name}_scalars.png")]
        if self.probes is not None:
            parts = {"probes": self.probes.scores, "coefficients": self.probes.coefficients}
            for part, frame in parts.items():
                path = out / "tables" / f"{self.name}_{part}.csv"
                frame.to_csv(path, index=False)
                files.append(path)
        return files

    def summary(self) -> dict:
        t = self.reading.table
        out = {"n_ranks": len(t), **{k: v for k, v in self.meta.items() if k != "config"}}
        if "b_top_latent" in t:
            best = t.loc[t["b_explained_k1"].idxmax()]
            out.update(best_rank=best["adapter"], best_rank_top_latent=int(best["b_top_latent"]))
        if self.probes is not None:
            s = self.probes.scores.set_index("task")
            for task in s.index:
                out[f"probe_{task}_acc"] = float(s.loc[task, "accuracy"])
                out[f"probe_{task}_shuffled"] = float(s.loc[task, "shuffled_accuracy"])
        return out


class LoraRead(Analysis):
    """Read the context model's LoRA (see the module docstring). ``judged`` names a table of the
    context (the model's own judged answers) for scalars and probes; ``directions`` are files."""

    kind = "lora"
    directions: tuple[str, ...] = ()
    judged: str | None = "judged"
    split: ResponseSplit = ResponseSplit()
    decompose: DecomposeConfig = DecomposeConfig()
    probe: ProbeConfig = ProbeConfig()

    def run(self, ctx: RunContext) -> LoraResult:
        if ctx.model is None:
            raise InputError("lora reads an adapter: the run context has no model")
        dirs = self._directions(ctx)
        dictionary = next(iter(ctx.dictionaries.values()), None)
        scalars = probes = signs = None
        empty = 0
        if self.judged is not None and self.judged in ctx.tables:
            if ctx.tokenizer is None:
                raise InputError("lora scalars read answers: the run context has no tokenizer")
            scalars, probes, signs, empty = self._scalars(ctx, ctx.tables[self.judged])
        reading = read_lora(ctx.model, dictionary, dirs, self.decompose, signs)
        meta = self.record(
            ctx, directions=list(dirs), oriented=signs is not None, empty_answers_left_out=empty
        )
        return LoraResult(self.stem, reading, scalars, probes, meta)

    def _directions(self, ctx: RunContext) -> dict[str, Direction]:
        """Each of ``directions``: a file, or an earlier ``direction`` result by name (all its
        layers, ``<name>_L<layer>``)."""
        from emdiff.analyses.directions import DirectionResult

        out = {}
        for p in self.directions:
            earlier = ctx.results.get(p)
            if isinstance(earlier, DirectionResult):
                out |= {d.name: d for d in earlier.directions.values()}
            else:
                out[Path(p).stem] = Direction.load(p)
        return out

    def _scalars(self, ctx: RunContext, judged: pd.DataFrame):
        mis, good = split_responses(judged, self.split, source=f"table {self.judged!r}")
        both = pd.concat([mis.assign(misaligned=1), good.assign(misaligned=0)], ignore_index=True)
        positions = Positions.parse(self.positions or "answer")
        rows = encode_qa(ctx.tokenizer, both["question"], both["answer"])
        # an empty answer (the model stopped at once) has no answer token to read: left out
        keep = [any(m) for m in selection(rows, positions, ctx.model)]
        both = both[keep].reset_index(drop=True)
        rows = [r for r, k in zip(rows, keep, strict=True) if k]
        frame, cols = lora_scalars(ctx.model, rows, positions, progress=True)
        every, _ = lora_scalars(ctx.model, rows, Positions.parse("answer_predicting"))
        x = per_row(frame, cols, len(rows))
        y = both["misaligned"].to_numpy()
        tasks = {"general": y}
        if "domain" in both:
            for d in sorted(both["domain"].dropna().unique()):
                labels = np.where(both["domain"] == d, y, -1)
                if np.bincount(labels[labels >= 0], minlength=2).min() >= 2 * self.probe.folds:
                    tasks[f"domain:{d}"] = labels
        probes = scalar_probes(x, tasks, cols, self.probe)
        frame["misaligned"] = y[frame["seq"].to_numpy()]
        if "domain" in both:
            frame["domain"] = both["domain"].to_numpy()[frame["seq"].to_numpy()]
        return frame, probes, scalar_signs(every, cols), len(keep) - len(rows)


class LoraPhases(Analysis):
    """Phases of the fine-tune whose checkpoints are in ``checkpoints`` (see the module
    docstring); EM needs ``questions`` and the context model carrying the same adapter."""

    kind = "phases"
    checkpoints: str
    windows: tuple[int, ...] = (5, 10, 15)
    questions: tuple[str, ...] = ()
    em_every: int = Field(1, ge=1)
    judge: JudgeConfig = JudgeConfig()
    sampling: SamplingConfig = SamplingConfig()

    def run(self, ctx: RunContext) -> Phases:
        found = load_checkpoints(self.checkpoints)
        em_at = None
        if self.questions:
            em_at = self._em_at(ctx, {s for s, _ in found[:: self.em_every]} | {found[-1][0]})
        ph = phases(found, self.windows, em_at)
        ph.meta.update(self.record(ctx, n_checkpoints=len(found)))
        return ph

    def _em_at(self, ctx: RunContext, scored: set[int]):
        from peft import set_peft_model_state_dict

        from emdiff.interventions.sweep import JudgedScorer

        if ctx.model is None or ctx.tokenizer is None or ctx.out is None:
            raise InputError("phases with EM samples answers: the context needs model and out")
        folder = ctx.out / "phases_answers" / self.stem
        base = getattr(ctx.model, "get_base_model", lambda: ctx.model)()
        judge = make_judge(
            self.judge, folder / "judge_cache.sqlite", toy_path=base.config._name_or_path
        )
        scorer = JudgedScorer(
            ctx.tokenizer, load_question_files(self.questions), judge, self.sampling, folder
        )

        def em_at(step: int, weights) -> float:
            if step not in scored:
                return float("nan")
            set_peft_model_state_dict(ctx.model, weights)
            return float(scorer(ctx.model, f"step-{step}")["em"])

        return em_at
