"""Directions as analyses: the misalignment direction (CLR's mean difference, with Appendix B's
base-model reading beside it), its decomposition into latents, and latent attribution.

- :class:`MeanDirection` (``direction``): per layer of the read spec, the mean residual of the
  model's misaligned answers minus its aligned ones (the judged table's CLR split), at the read
  spec's positions (answer tokens by default); with ``compare_base`` and a PEFT model, the same
  texts read by the base too, and cos(base, fine-tuned) per layer. No dictionary is needed.
- :class:`Decompose` (``decompose``): a direction (a saved file, or an earlier ``direction``
  result) over the decoder rows of the context's dictionary at its layer, against a null.
- :class:`Attribute` (``attribute``): latents of the context's dictionary ranked by attribution of
  log P(misaligned answers) - log P(aligned answers), checked against true ablation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from emdiff.analyses.base import Analysis, RunContext
from emdiff.analyses.common import encode_qa
from emdiff.analyses.response_diff import ResponseSplit, split_responses
from emdiff.data.positions import Positions
from emdiff.directions.attribution import Attribution, ContrastMetric, attribute
from emdiff.directions.decompose import DecomposeConfig, Decomposition, decompose
from emdiff.directions.direction import Direction, mean_difference_directions, residual_means
from emdiff.errors import InputError
from emdiff.models.load import adapter_state, model_identity


@dataclass
class DirectionResult:
    """Per-layer directions of the model (``directions``) and of the base (``base``, maybe
    empty), with a table of norms and cosines."""

    name: str
    directions: dict[int, Direction]
    base: dict[int, Direction] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    shuffled: dict[int, list[Direction]] = field(default_factory=dict)
    """Per layer, mean differences of randomly relabelled answers (a null for decomposition)."""

    @property
    def table(self) -> pd.DataFrame:
        rows = []
        for layer, d in self.directions.items():
            b = self.base.get(layer)
            rows.append(
                {
                    "layer": layer,
                    "norm": d.norm,
                    "cos_base": d.cos(b) if b is not None else float("nan"),
                    "norm_base": b.norm if b is not None else float("nan"),
                }
            )
        return pd.DataFrame(rows)

    @classmethod
    def from_files(cls, name: str, files: list[str | Path], meta: dict | None = None):
        """The result back from the direction files its :meth:`save` listed (a pipeline stage
        reused as the input of a later one)."""
        pattern = re.compile(rf"^{re.escape(name)}(_base|_shuffled\d+)?_L(\d+)$")
        res = cls(name, {}, meta=dict(meta or {}))
        for f in files:
            m = pattern.match(Path(f).stem)
            if m is None or Path(f).suffix != ".json":
                continue
            d, layer = Direction.load(f), int(m[2])
            if m[1] is None:
                res.directions[layer] = d
            elif m[1] == "_base":
                res.base[layer] = d
            else:
                res.shuffled.setdefault(layer, []).append(d)
        if not res.directions:
            raise InputError(f"direction {name!r}: no direction files among {len(files)} listed")
        for ds in res.shuffled.values():
            ds.sort(key=lambda d: int(re.search(r"_shuffled(\d+)_", d.name)[1]))
        return res

    def save(self, out: str | Path) -> list[Path]:
        """``directions/<name>_L*.{safetensors,json}`` (and ``<name>_base_L*``),
        ``tables/<name>.csv`` and, with base directions, ``plots/<name>_base_vs_ft.png``."""
        from emdiff.report.direction_plots import layer_cosine_plot

        out = Path(out)
        every = [*self.directions.values(), *self.base.values()]
        every += [d for ds in self.shuffled.values() for d in ds]
        files = [p for d in every for p in d.save(out / "directions")]
        table = out / "tables" / f"{self.name}.csv"
        table.parent.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(table, index=False)
        files.append(table)
        if self.base:
            t = self.table.rename(columns={"cos_base": "cos"})
            title = "Appendix B: cos(base direction, fine-tuned direction)"
            files.append(layer_cosine_plot(t, out / "plots" / f"{self.name}_base_vs_ft.png", title))
        return files

    def summary(self) -> dict:
        t = self.table
        return {
            "layers": [int(x) for x in t["layer"]],
            "cos_base": {int(r.layer): float(r.cos_base) for r in t.itertuples()},
            **self.meta,
        }


def _split_rows(ctx: RunContext, judged_name: str, split: ResponseSplit, follow_up: str | None):
    judged = ctx.need("table", ctx.tables, judged_name)
    if ctx.tokenizer is None:
        raise InputError("the judged answers must be encoded: the context has no tokenizer")
    mis, good = split_responses(judged, split, source=f"judged answers {judged_name!r}")
    return (
        encode_qa(ctx.tokenizer, mis["question"], mis["answer"], follow_up),
        encode_qa(ctx.tokenizer, good["question"], good["answer"], follow_up),
    )


class MeanDirection(Analysis):
    """CLR's misalignment direction per layer of the read spec (see the module docstring)."""

    kind = "direction"
    judged: str = "judged"
    split: ResponseSplit = ResponseSplit()
    compare_base: bool = True
    follow_up: str | None = None
    """A user turn after each answer; read it at positions ``last``."""
    shuffles: int = Field(0, ge=0)
    """Also this many directions of randomly relabelled answers (nulls for ``decompose``)."""
    seed: int = 0

    def _shuffled(self, ctx: RunContext, mis, good, kw) -> dict[int, list[Direction]]:
        rows, rng = [*mis, *good], np.random.default_rng(self.seed)
        out: dict[int, list[Direction]] = {layer: [] for layer in ctx.read.layers}
        for i in range(self.shuffles):
            perm = rng.permutation(len(rows))
            a = residual_means(ctx.model, [rows[j] for j in perm[: len(mis)]], ctx.read, **kw)
            b = residual_means(ctx.model, [rows[j] for j in perm[len(mis) :]], ctx.read, **kw)
            name = f"{self.stem}_shuffled{i}"
            for layer, d in mean_difference_directions(a, b, ctx.read.site, name).items():
                out[layer].append(d)
        return out

    def run(self, ctx: RunContext) -> DirectionResult:
        ctx = self.at_positions(ctx)
        if ctx.model is None or ctx.read is None:
            raise InputError("direction reads a model: the run context has no model or read spec")
        mis, good = _split_rows(ctx, self.judged, self.split, self.follow_up)
        model, read = ctx.model, ctx.read
        provenance = {
            "texts": f"judged answers {self.judged!r}, CLR split",
            "positions": str(read.positions),
            "model": model_identity(model),
            "n_misaligned": len(mis),
            "n_aligned": len(good),
        }
        kw = {"batch_size": ctx.stats_cfg.batch_size, "progress": ctx.stats_cfg.progress}
        a, b = residual_means(model, mis, read, **kw), residual_means(model, good, read, **kw)
        dirs = mean_difference_directions(a, b, read.site, self.stem, provenance)
        base = {}
        if self.compare_base and hasattr(model, "disable_adapter"):
            with adapter_state(model, False):
                a, b = (
                    residual_means(model, mis, read, **kw),
                    residual_means(model, good, read, **kw),
                )
            base = mean_difference_directions(
                a, b, read.site, f"{self.stem}_base", {**provenance, "adapter": "off"}
            )
        shuffled = self._shuffled(ctx, mis, good, kw) if self.shuffles else {}
        return DirectionResult(self.stem, dirs, base, self.record(ctx, **provenance), shuffled)


class Decompose(Analysis):
    """A direction over the decoder rows of the context's dictionary at its layer. ``direction``
    is a file (``NAME.json`` / ``.safetensors``) or the name of an earlier ``direction`` result
    in the context (its direction at the dictionary's layer)."""

    kind = "decompose"
    direction: str
    settings: DecomposeConfig = DecomposeConfig()
    null_directions: tuple[str, ...] = ()
    """Direction files added to the random null (e.g. shuffled-label directions); with an
    earlier ``direction`` result, its shuffled directions are added by themselves."""
    diff: str | None = None
    """A feature diff of the two sets the direction came from (an earlier result's name in the
    context, or its ``tables/*.parquet``): its per-latent difference joins the table."""

    def _diff(self, ctx: RunContext, layer: int) -> pd.DataFrame | None:
        if self.diff is None:
            return None
        earlier = ctx.results.get(self.diff)
        if earlier is not None:
            table = earlier.table
        elif self.diff in ctx.tables:
            table = ctx.tables[self.diff]
        else:
            table = pd.read_parquet(self.diff)
        if "layer" in table:
            table = table[table["layer"] == layer]
        if table.empty or "feature" not in table:
            raise InputError(f"decompose: {self.diff!r} has no feature rows at layer {layer}")
        return table

    def _direction(self, ctx: RunContext) -> Direction:
        earlier = ctx.results.get(self.direction)
        if isinstance(earlier, DirectionResult):
            layers = [layer for layer in earlier.directions if layer in ctx.dictionaries]
            if not layers:
                raise InputError(
                    f"decompose: {self.direction!r} has directions at layers "
                    f"{sorted(earlier.directions)}, the dictionaries are at {sorted(ctx.dictionaries)}"
                )
            return earlier.directions[layers[0]]
        return Direction.load(self.direction)

    def run(self, ctx: RunContext) -> Decomposition:
        v = self._direction(ctx)
        d = ctx.dictionaries.get(v.layer)
        if d is None:
            raise InputError(
                f"decompose: the direction is at layer {v.layer}; the context has dictionaries "
                f"at {sorted(ctx.dictionaries) or 'no layer'}"
            )
        nulls = [Direction.load(p).raw for p in self.null_directions]
        earlier = ctx.results.get(self.direction)
        if isinstance(earlier, DirectionResult):
            nulls += [n.raw for n in earlier.shuffled.get(v.layer, [])]
        dec = decompose(
            v.raw,
            d.decoder_rows,
            self.settings,
            name=self.stem,
            latent_diff=self._diff(ctx, v.layer),
            null_directions=nulls,
        )
        dec.meta.update(self.record(ctx, direction=v.name, layer=v.layer, site=v.site))
        return dec


class Attribute(Analysis):
    """Latent attribution of the misaligned-vs-aligned contrast of the judged answers."""

    kind = "attribute"
    judged: str = "judged"
    split: ResponseSplit = ResponseSplit()
    check_top: int = 20

    def run(self, ctx: RunContext) -> Attribution:
        ctx = self.at_positions(ctx)
        model = ctx.require_model(self.kind)
        layer = self.one_layer(ctx)
        mis, good = _split_rows(ctx, self.judged, self.split, None)
        # an empty answer (the model stopped at once) has nothing to score: left out, counted
        answer = Positions.parse("answer")
        keep = {id(r) for r in (*mis, *good) if any(answer.mask(r))}
        empty = len(mis) + len(good) - len(keep)
        mis, good = [r for r in mis if id(r) in keep], [r for r in good if id(r) in keep]
        if not mis or not good:
            raise InputError(
                f"attribute: no {'misaligned' if not mis else 'aligned'} answer has a token"
            )
        d = ctx.dictionaries[layer]
        res = attribute(
            model,
            d,
            ContrastMetric.from_chats(mis, good),
            check_top=self.check_top,
            name=self.stem,
            progress=ctx.stats_cfg.progress,
            layer=layer,
            site=ctx.read.site,
        )
        res.meta.update(
            self.record(ctx, n_misaligned=len(mis), n_aligned=len(good), empty_answers=empty)
        )
        return res
