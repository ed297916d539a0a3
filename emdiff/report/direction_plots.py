"""Figures of directions and interventions: decomposition bars against their null, cosine per
layer (Appendix B), and EM under steering / ablation against the random-direction band."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from emdiff.report.plots import _pyplot, _save

if TYPE_CHECKING:
    from emdiff.directions.decompose import Decomposition


def decomposition_plot(dec: Decomposition, path: str | Path, top: int = 10) -> Path:
    """Left: cosine of the direction with the top decoder rows. Right: explained fraction by
    the best k rows, against the null's mean and 95th percentile."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    t = dec.table.head(top)
    a.barh([str(x) for x in t["latent"]][::-1], t["cosine"].to_numpy()[::-1], color="tab:blue")
    a.set_xlabel("cos(direction, decoder row)")
    a.set_ylabel("latent")
    a.set_title(f"{dec.name}: top decoder rows")
    e = dec.explained
    ks = [str(k) for k in e["k"]]
    b.bar(ks, e["explained"], color="tab:blue", label="direction")
    b.plot(ks, e["null_p95"], "k--", marker="o", label="null 95th pct")
    b.plot(ks, e["null_mean"], color="grey", marker=".", label="null mean")
    b.set_ylim(0, 1.02)
    b.set_xlabel("k latents")
    b.set_ylabel("explained fraction")
    b.set_title(f"sparse reconstruction ({dec.meta.get('method')})")
    b.legend(fontsize=8)
    return _save(fig, path)


def layer_cosine_plot(table: pd.DataFrame, path: str | Path, title: str) -> Path:
    """``cos`` against ``layer`` (one line per ``label`` when the column is there)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    groups = table.groupby("label") if "label" in table else [("cos", table)]
    for label, g in groups:
        ax.plot(g["layer"], g["cos"], marker="o", label=str(label))
    ax.set_ylim(-1.02, 1.02)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine")
    ax.set_title(title)
    if "label" in table:
        ax.legend(fontsize=8)
    return _save(fig, path)


def sweep_plot(summary: pd.DataFrame, path: str | Path, metric: str = "em") -> Path:
    """EM (or another scored metric) against scale, one panel per (kind, layer): the direction
    with its CI, the random directions' mean and min-max band."""
    plt = _pyplot()
    panels = list(summary.groupby(["kind", "layer"], sort=True))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.5), squeeze=False)
    for ax, ((kind, layer), g) in zip(axes[0], panels, strict=True):
        g = g.sort_values("scale")
        x = g["scale"].to_numpy()
        ax.fill_between(
            x,
            g[f"random_{metric}_min"],
            g[f"random_{metric}_max"],
            alpha=0.25,
            color="grey",
            label="random min-max",
        )
        ax.plot(x, g[f"random_{metric}_mean"], color="grey", ls="--", label="random mean")
        low, high = g[f"{metric}_low"], g[f"{metric}_high"]
        err = np.clip([g[metric] - low, high - g[metric]], 0, None)
        ax.errorbar(x, g[metric], yerr=err, marker="o", color="tab:red", label="direction")
        ax.set_title(f"{kind}, layer {layer}")
        ax.set_xlabel("scale" if kind == "steer" else "")
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
    return _save(fig, path)


def cosine_heatmap(table: pd.DataFrame, path: str | Path, title: str = "cosine") -> Path:
    """A square cosine table as a heatmap with the values written in."""
    plt = _pyplot()
    n = len(table)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    im = ax.imshow(table.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(n), table.columns, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), table.index, fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{table.iat[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    return _save(fig, path)
