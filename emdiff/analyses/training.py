"""Training data and training as analyses:

- :class:`Screen` (``screen``): score chat datasets (JSONL files) before anyone fine-tunes on
  them, by how far the context model moves along a saved direction while reading them
  (:mod:`emdiff.directions.screen`); per sample and per dataset, and with ``measured`` (a CSV of
  ``dataset,em`` measured after fine-tuning) the Spearman correlation and its plot.
- :class:`Mitigate` (``mitigate``): benign fine-tunes of the context model's adapter (trained
  further, ``continue_adapter``) on the first N chats of a benign dataset for each N; EM before
  and after, sampled and judged, on the eval questions, on ``narrow_questions`` when given, and
  with a ``cue`` system prompt (misalignment that returns under a cue).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from pydantic import Field

from emdiff.analyses.base import Analysis, RunContext
from emdiff.data.chat import load_chat_jsonl
from emdiff.directions.direction import Direction
from emdiff.directions.screen import ScreenConfig, screen_samples
from emdiff.errors import InputError
from emdiff.eval.run import JudgeConfig, load_question_files, make_judge
from emdiff.eval.sample import SamplingConfig
from emdiff.finetune import FinetuneConfig, finetune


@dataclass
class TableResult:
    """A result made of named tables (and figures drawn from them)."""

    name: str
    tables: dict[str, pd.DataFrame]
    figures: dict = field(default_factory=dict)
    """``{suffix: (plot function, table name)}``."""
    meta: dict = field(default_factory=dict)
    figures_summary: dict = field(default_factory=dict)

    def save(self, out: str | Path) -> list[Path]:
        out = Path(out)
        (out / "tables").mkdir(parents=True, exist_ok=True)
        files = []
        for part, frame in self.tables.items():
            path = out / "tables" / f"{self.name}_{part}.csv"
            frame.to_csv(path, index=False)
            files.append(path)
        for suffix, (plot, part) in self.figures.items():
            files.append(plot(self.tables[part], out / "plots" / f"{self.name}_{suffix}.png"))
        return files

    def summary(self) -> dict:
        return dict(self.figures_summary)


class Screen(Analysis):
    """Screen ``datasets`` with the direction file ``direction`` (see the module docstring)."""

    kind = "screen"
    direction: str
    datasets: tuple[str, ...] = Field(min_length=1)
    follow_ups: tuple[str, ...] = ()
    latent: int | None = None
    """A latent of the context's dictionary whose mean activation is reported beside."""
    measured: str | None = None

    def run(self, ctx: RunContext) -> TableResult:
        from scipy.stats import spearmanr

        from emdiff.report.lora_plots import screen_plot

        if ctx.model is None or ctx.tokenizer is None:
            raise InputError("screen reads datasets: the run context has no model or tokenizer")
        v = Direction.load(self.direction)
        dictionary = ctx.dictionaries.get(v.layer) if self.latent is not None else None
        if self.latent is not None and dictionary is None:
            raise InputError(f"screen --latent needs a dictionary at layer {v.layer}")
        cfg = ScreenConfig(follow_ups=self.follow_ups)
        per, rows = [], []
        for path in self.datasets:
            samples = load_chat_jsonl(path)
            s = screen_samples(ctx.model, ctx.tokenizer, samples, v, cfg, dictionary, self.latent)
            per.append(s.assign(dataset=Path(path).stem))
            row = {"dataset": Path(path).stem, "n": len(s), "score": float(s["score"].mean())}
            if "latent" in s:
                row["latent"] = float(s["latent"].mean())
            rows.append(row)
        table = pd.DataFrame(rows)
        res = TableResult(self.stem, {"samples": pd.concat(per), "datasets": table})
        res.figures_summary = {"n_datasets": len(table), "direction": v.name}
        if self.measured is not None:
            em = pd.read_csv(self.measured)
            if not {"dataset", "em"} <= set(em.columns):
                raise InputError(f"{self.measured}: needs columns dataset and em")
            table = table.merge(em[["dataset", "em"]], on="dataset", how="left")
            if table["em"].isna().any():
                missing = table.loc[table["em"].isna(), "dataset"].tolist()
                raise InputError(f"{self.measured}: no measured EM for datasets {missing}")
            rho = float(spearmanr(table["score"], table["em"]).statistic)
            res.tables["datasets"] = table
            res.figures["scatter"] = (lambda t, p: screen_plot(t, rho, p), "datasets")
            res.figures_summary["spearman"] = rho
        res.meta = self.record(ctx, **res.figures_summary)
        return res


class Mitigate(Analysis):
    """Benign fine-tunes of the context model's adapter (see the module docstring)."""

    kind = "mitigate"
    benign: str
    questions: tuple[str, ...] = Field(min_length=1)
    ns: tuple[int, ...] = (30, 60, 120, 240)
    narrow_questions: tuple[str, ...] = ()
    cue: str | None = None
    train: FinetuneConfig = FinetuneConfig(continue_adapter=True)
    judge: JudgeConfig = JudgeConfig()
    sampling: SamplingConfig = SamplingConfig()

    def run(self, ctx: RunContext) -> TableResult:
        from emdiff.interventions.sweep import JudgedScorer
        from emdiff.report.lora_plots import mitigation_plot

        if ctx.model is None or ctx.tokenizer is None or ctx.out is None:
            raise InputError("mitigate trains and samples: the context needs model and out")
        benign = load_chat_jsonl(self.benign)
        if max(self.ns) > len(benign):
            raise InputError(f"{self.benign}: {len(benign)} chats, fewer than N = {max(self.ns)}")
        folder = ctx.out / "mitigate_answers" / self.stem
        base = getattr(ctx.model, "get_base_model", lambda: ctx.model)()
        judge = make_judge(
            self.judge, folder / "judge_cache.sqlite", toy_path=base.config._name_or_path
        )
        sets = {"em": load_question_files(self.questions)}
        if self.narrow_questions:
            sets["narrow_em"] = load_question_files(self.narrow_questions)
        if self.cue is not None:
            sets["cued_em"] = [q.model_copy(update={"system": self.cue}) for q in sets["em"]]
        scorers = {
            k: JudgedScorer(ctx.tokenizer, qs, judge, self.sampling, folder / k)
            for k, qs in sets.items()
        }

        def measure(model, n: int) -> dict:
            row: dict = {"n": n}
            for k, scorer in scorers.items():
                m = scorer(model, f"n-{n}")
                row[k] = m["em"]
                if k == "em":
                    row.update(em_low=m["em_low"], em_high=m["em_high"], coherent=m["coherent"])
            return row

        cfg = self.train.model_copy(update={"continue_adapter": True})
        rows = [measure(ctx.model, 0)]
        for n in self.ns:
            model = finetune(copy.deepcopy(ctx.model), ctx.tokenizer, benign[:n], cfg).model
            rows.append(measure(model, n))
        table = pd.DataFrame(rows)
        res = TableResult(self.stem, {"em": table}, {"em": (mitigation_plot, "em")})
        res.figures_summary = {"em_before": rows[0]["em"]}
        res.figures_summary |= {f"em_after_{r['n']}": r["em"] for r in rows[1:]}
        res.meta = self.record(ctx, **res.figures_summary)
        return res
