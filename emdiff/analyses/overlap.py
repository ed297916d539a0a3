"""Overlap of two feature rankings (for example Q1 against Q2): Jaccard@k, rank correlation on the
union of the top features, and a shared/unique table with both ranks and both effect sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field
from scipy import stats as st

from emdiff.analyses.base import Analysis, RunContext, save_meta
from emdiff.errors import InputError, NonFiniteError


@dataclass
class Overlap:
    """How far two rankings of the same dictionary's features coincide."""

    jaccard: pd.DataFrame
    """Per k: ``k``, the sizes ``n_a`` / ``n_b`` of the two top-k sets (fewer than k when fewer
    features moved in that direction), ``n_shared``, ``jaccard`` and ``jaccard_null`` (expected
    for two random top-k sets)."""
    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float
    n_union: int
    """Features in the union of both top-``top`` sets, on which the correlations are computed."""
    table: pd.DataFrame
    """Union of both top-``table_k`` sets: ranks, effects and q-values on each side, ``status``."""
    labels: tuple[str, str]
    direction: str
    name: str = "overlap"
    meta: dict = field(default_factory=dict)

    def save(self, out: str | Path) -> list[Path]:
        """``tables/<name>.parquet`` (shared/unique), ``tables/<name>_jaccard.parquet``,
        ``tables/<name>.json`` (meta and summary) and ``plots/<name>.png``."""
        from emdiff.report.plots import overlap_plot

        tables = Path(out) / "tables"
        tables.mkdir(parents=True, exist_ok=True)
        self.table.to_parquet(tables / f"{self.name}.parquet")
        self.jaccard.to_parquet(tables / f"{self.name}_jaccard.parquet")
        meta = save_meta({**self.meta, **self.summary()}, tables / f"{self.name}.json")
        title = f"{self.labels[0]} vs {self.labels[1]}"
        plot = overlap_plot(self, Path(out) / "plots" / f"{self.name}.png", title=title)
        return [
            tables / f"{self.name}.parquet",
            tables / f"{self.name}_jaccard.parquet",
            meta,
            plot,
        ]

    def summary(self) -> dict:
        """A flat dict (Jaccard per k, correlations) for JSON."""
        out = {
            f"jaccard@{k}": float(j)
            for k, j in zip(self.jaccard.k, self.jaccard.jaccard, strict=True)
        }
        out.update(
            spearman=self.spearman,
            spearman_p=self.spearman_p,
            kendall=self.kendall,
            kendall_p=self.kendall_p,
            n_union=self.n_union,
            labels=list(self.labels),
            direction=self.direction,
        )
        return out


def _keyed(table: pd.DataFrame, name: str) -> pd.DataFrame:
    if "feature" not in table:
        raise InputError(
            f"ranking {name!r} has no 'feature' column (it has {[str(c) for c in table.columns]}):"
            " pass a table written by emdiff diff (tables/*.parquet)"
        )
    t = table.copy()
    if "layer" not in t:
        t["layer"] = -1
    return t.set_index(["layer", "feature"])


class RankingOverlap(Analysis):
    """How far the rankings ``a`` and ``b`` coincide: earlier results of the run (by name) or
    ranking tables of the context. Top sets are taken by ``rank_<direction>`` among the features
    whose effect has that sign; correlations on the union of both top-``top`` sets."""

    kind = "overlap"
    a: str
    b: str
    ks: tuple[int, ...] = (5, 10, 20, 50, 100)
    top: int = Field(50, ge=3)
    table_k: int = Field(20, ge=1)
    direction: Literal["increase", "decrease"] = "increase"

    def run(self, ctx: RunContext) -> Overlap:
        tables = {
            **ctx.tables,
            **{k: r.table for k, r in ctx.results.items() if hasattr(r, "table")},
        }
        reads = [getattr(ctx.results.get(n), "meta", {}).get("read") for n in (self.a, self.b)]
        if all(reads):  # the same features only if read at one place through one dictionary
            where = [{k: r[k] for k in ("layers", "site", "dictionary")} for r in reads]
            if where[0] != where[1]:
                raise InputError(
                    f"rankings {self.a!r} and {self.b!r} were read at different places or "
                    f"through different dictionaries ({where[0]} vs {where[1]}): their features "
                    "are not the same"
                )
        res = overlap(
            ctx.need("ranking", tables, self.a), ctx.need("ranking", tables, self.b), self
        )
        res.name = self.name or f"overlap_{self.a}_{self.b}"
        res.meta = self.record(ctx)
        return res


def overlap(a: pd.DataFrame, b: pd.DataFrame, cfg: RankingOverlap) -> Overlap:
    """Compare two rankings (tables from :func:`emdiff.stats.compare.compare_stats` or the diffs)
    over the same features, labelled by ``cfg.a`` and ``cfg.b``."""
    ks, top, table_k, direction = cfg.ks, cfg.top, cfg.table_k, cfg.direction
    labels = (cfg.a, cfg.b)
    if direction not in ("increase", "decrease"):
        raise InputError(f"direction must be 'increase' or 'decrease', not {direction!r}")
    if labels[0] == labels[1]:
        raise InputError(f"the two rankings need different labels, got {labels}")
    col = f"rank_{direction}"
    if not any(int(k) > 0 for k in ks):
        raise InputError(f"ks {list(ks)}: need at least one k >= 1")
    ta, tb = _keyed(a, labels[0]), _keyed(b, labels[1])
    for name, t in ((labels[0], ta), (labels[1], tb)):
        missing = [c for c in (col, "effect", "q") if c not in t]
        if missing:
            raise InputError(f"ranking {name!r} lacks the column(s) {missing}")
        if t.empty:
            raise InputError(f"ranking {name!r} has no rows: nothing to compare")
        nan = t.index[t["effect"].isna().to_numpy()]
        if len(nan):  # compare_stats never writes a NaN effect: the table is broken
            raise NonFiniteError(
                f"ranking {name!r}: {len(nan)} features have a NaN effect, e.g. (layer, feature) "
                f"{tuple(int(v) for v in nan[0])}; recompute the ranking"
            )
    if set(ta.index) != set(tb.index):
        raise InputError(
            f"the rankings cover different features ({len(ta)} vs {len(tb)} rows): overlap needs "
            "tables computed with the same dictionary and layers"
        )
    n = len(ta)
    sign = 1.0 if direction == "increase" else -1.0
    # only features that moved in that direction can be "top": ties at 0 (features that never
    # fire) would otherwise fill both top-k sets in the same row order and fake an overlap
    ra = ta[col].where(sign * ta["effect"] > 0)
    rb = tb[col].reindex(ta.index).where(sign * tb["effect"].reindex(ta.index) > 0)
    rows = []
    for k in sorted({min(int(k), n) for k in ks if k > 0}):
        sa, sb = set(ra.index[ra <= k]), set(rb.index[rb <= k])
        shared = len(sa & sb)
        rows.append(
            dict(
                k=k,
                n_a=len(sa),
                n_b=len(sb),
                n_shared=shared,
                jaccard=shared / len(sa | sb) if sa | sb else 0.0,
                jaccard_null=k / (2 * n - k) if n > k else 1.0,
            )
        )
    union = ra.index[(ra <= top) | (rb <= top)]
    ea, eb = ta.loc[union, "effect"].to_numpy(), tb.loc[union, "effect"].to_numpy()
    ok = np.isfinite(ea) & np.isfinite(eb)
    if ok.sum() >= 3:
        rho, rho_p = st.spearmanr(ea[ok], eb[ok])
        tau, tau_p = st.kendalltau(ea[ok], eb[ok])
    else:
        rho = rho_p = tau = tau_p = float("nan")
    pick = ra.index[(ra <= table_k) | (rb <= table_k)]
    table = pd.DataFrame(
        {
            f"rank_{labels[0]}": ra.loc[pick],
            f"rank_{labels[1]}": rb.loc[pick],
            f"effect_{labels[0]}": ta.loc[pick, "effect"],
            f"effect_{labels[1]}": tb.loc[pick, "effect"],
            f"q_{labels[0]}": ta.loc[pick, "q"],
            f"q_{labels[1]}": tb.loc[pick, "q"],
        }
    )
    in_a, in_b = ra.loc[pick] <= table_k, rb.loc[pick] <= table_k
    table[f"rank_{labels[0]}"] = ta.loc[pick, col]
    table[f"rank_{labels[1]}"] = tb.loc[pick, col]
    table["status"] = np.where(
        in_a & in_b, "shared", np.where(in_a, f"only_{labels[0]}", f"only_{labels[1]}")
    )
    table = table.reset_index().sort_values([f"rank_{labels[0]}"]).reset_index(drop=True)
    if (table["layer"] == -1).all():
        table = table.drop(columns="layer")
    return Overlap(
        pd.DataFrame(rows),
        float(rho),
        float(rho_p),
        float(tau),
        float(tau_p),
        int(ok.sum()),
        table,
        labels,
        direction,
    )
