"""Figures of the analyses: volcano plots of feature diffs, overlap of two rankings, transfer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from emdiff.analyses.overlap import Overlap


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _name(row) -> str:
    layer = int(row["layer"]) if "layer" in row and row["layer"] >= 0 else None
    return f"L{layer}/{int(row['feature'])}" if layer is not None else str(int(row["feature"]))


def volcano_plot(
    table: pd.DataFrame,
    path: str | Path,
    *,
    title: str = "feature diff",
    alpha: float = 0.05,
    label_top: int = 8,
    highlight: int | None = None,
) -> Path:
    """Effect size (with its CI for the labelled features) against -log10 q; one dot per feature.

    Features with q < ``alpha`` are coloured; the ``label_top`` largest increases and decreases are
    named; ``highlight`` (a feature index) is ringed, e.g. the known persona latent of the toy.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    eff = table["effect"].replace([np.inf, -np.inf], np.nan)
    q = -np.log10(table["q"].clip(lower=1e-300))
    sig = table["q"] < alpha
    ax.scatter(eff[~sig], q[~sig], s=6, c="0.7", label=f"q >= {alpha}")
    ax.scatter(eff[sig], q[sig], s=8, c="tab:red", label=f"q < {alpha}")
    ax.axhline(-np.log10(alpha), color="0.5", lw=0.8, ls="--")
    ax.axvline(0, color="0.5", lw=0.8)
    for col in ("rank_increase", "rank_decrease"):
        labelled = table[(table[col] <= label_top) & np.isfinite(table["effect"])]
        for _, r in labelled.iterrows():
            y = -np.log10(max(r["q"], 1e-300))
            ax.errorbar(
                r["effect"],
                y,
                xerr=[[r["effect"] - r["effect_ci_low"]], [r["effect_ci_high"] - r["effect"]]],
                color="tab:blue",
                lw=0.8,
            )
            ax.annotate(
                _name(r), (r["effect"], y), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
    if highlight is not None:
        h = table[table["feature"] == highlight]
        ax.scatter(
            h["effect"],
            -np.log10(h["q"].clip(lower=1e-300)),
            s=120,
            facecolors="none",
            edgecolors="black",
            label=f"feature {highlight}",
        )
    test = table["test"].iloc[0] if "test" in table and len(table) else ""
    ax.set(
        xlabel="effect size (a - b, standardised; 95% CI on labelled)",
        ylabel="-log10 q (BH)",
        title=f"{title} ({test})",
    )
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def overlap_plot(result: Overlap, path: str | Path, title: str = "overlap") -> Path:
    """Left: Jaccard@k with its random-ranking expectation. Right: effect sizes of the union of
    the top features on both sides, shared ones in red, the top 3 of each labelled."""
    plt = _pyplot()
    la, lb = result.labels
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    j = result.jaccard
    ax1.plot(j["k"], j["jaccard"], "o-", label="observed")
    ax1.plot(j["k"], j["jaccard_null"], "--", color="0.5", label="random rankings")
    ax1.set(
        xscale="log",
        xlabel="k",
        ylabel="Jaccard of the top-k sets",
        ylim=(0, 1.02),
        title=f"top-k overlap ({result.direction})",
    )
    ax1.legend(fontsize=8)
    t = result.table
    colours = t["status"].map(
        {"shared": "tab:red", f"only_{la}": "tab:blue", f"only_{lb}": "tab:green"}
    )
    ax2.scatter(t[f"effect_{la}"], t[f"effect_{lb}"], c=colours, s=14)
    for status, c in (
        ("shared", "tab:red"),
        (f"only_{la}", "tab:blue"),
        (f"only_{lb}", "tab:green"),
    ):
        ax2.scatter([], [], c=c, s=14, label=status)
    ax2.axhline(0, color="0.6", lw=0.6)
    ax2.axvline(0, color="0.6", lw=0.6)
    top = t[(t[f"rank_{la}"] <= 3) | (t[f"rank_{lb}"] <= 3)]  # the top latents of each, labelled
    for _, r in top.iterrows():
        ax2.annotate(str(int(r["feature"])), (r[f"effect_{la}"], r[f"effect_{lb}"]), fontsize=7)
    ax2.set(
        xlabel=f"effect ({la})",
        ylabel=f"effect ({lb})",
        title=f"Spearman {result.spearman:.2f}, Kendall {result.kendall:.2f} (n={result.n_union})",
    )
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def transfer_plot(table: pd.DataFrame, path: str | Path, title: str = "transfer") -> Path:
    """Bars per model variant (and layer, when there are several): fraction of variance
    explained, and the spliced CE increase."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    several = "layer" in table and table["layer"].nunique() > 1
    labels = table["variant"] + " L" + table["layer"].astype(str) if several else table["variant"]
    ax1.bar(labels, table["fve"], color="tab:blue")
    ax1.set(ylabel="fraction of variance explained", ylim=(min(0, table["fve"].min()), 1))
    ax2.bar(labels, table["ce_delta"].fillna(0), color="tab:orange")
    ax2.set(ylabel="CE increase when spliced (nats/token)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    return _save(fig, path)
