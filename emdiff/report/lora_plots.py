"""Figures of LoRA training and data screening: phase-transition panels, the screen's score
against measured EM, and EM before and after a benign fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from emdiff.report.plots import _pyplot, _save

if TYPE_CHECKING:
    from emdiff.lora.phases import Phases


def phases_plot(ph: Phases, path: str | Path) -> Path:
    """B norm (and EM), cosine with the final B, local cosine similarity of updates, and the
    PCA trajectory; the detected transition marked on each."""
    plt = _pyplot()
    t = ph.table
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    a, b, c, d = axes
    a.plot(t["step"], t["b_norm"], color="tab:blue", label="|B|")
    a.set_ylabel("|B|")
    if "em" in t:
        em = a.twinx()
        em.plot(t["step"], t["em"], color="tab:red", label="EM")
        em.set_ylabel("EM rate", color="tab:red")
        em.set_ylim(0, 1)
    b.plot(t["step"], t["cos_final"], color="tab:blue")
    b.set_ylabel("cos(B_t, B_final)")
    for w in ph.windows:
        c.plot(t["step"], t[f"lcs_w{w}"], label=f"w = {w}")
    c.set_ylabel("local cosine of updates")
    c.legend(fontsize=8)
    sc = d.scatter(t["pc1"], t["pc2"], c=t["step"], cmap="viridis", s=12)
    d.plot(t["pc1"], t["pc2"], color="grey", lw=0.5)
    fig.colorbar(sc, ax=d, label="step")
    at = t.set_index("step").loc[ph.transition_step]
    d.scatter([at["pc1"]], [at["pc2"]], marker="x", color="red", s=60, label="transition")
    d.set_xlabel("PC1")
    d.set_ylabel("PC2")
    d.legend(fontsize=8)
    for ax in (a, b, c):
        ax.axvline(ph.transition_step, color="red", ls="--", lw=1)
        ax.set_xlabel("step")
    fig.suptitle(f"LoRA B trajectory: transition at step {ph.transition_step}")
    return _save(fig, path)


def screen_plot(table: pd.DataFrame, rho: float, path: str | Path) -> Path:
    """Screen score (base model only) against the EM measured after fine-tuning, per dataset."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter(table["score"], table["em"], color="tab:blue")
    for _, r in table.iterrows():
        ax.annotate(str(r["dataset"]), (r["score"], r["em"]), fontsize=7)
    ax.set_xlabel("screen score (base model's move along the direction)")
    ax.set_ylabel("EM after fine-tuning")
    ax.set_title(f"data screening: Spearman {rho:.2f}")
    return _save(fig, path)


def mitigation_plot(rows: pd.DataFrame, path: str | Path) -> Path:
    """EM of the re-aligned model against N benign samples: held out, narrow domain, cued."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    n = rows["n"].astype(str)
    lo = rows["em_held_out"] - rows["em_held_out_low"]
    hi = rows["em_held_out_high"] - rows["em_held_out"]
    ax.errorbar(n, rows["em_held_out"], yerr=[lo, hi], marker="o", label="held-out domains")
    ax.plot(n, rows["em_narrow_domain"], marker="s", label="narrow domain")
    ax.plot(n, rows["em_cued_held_out"], marker="^", label="held-out, toxic cue")
    ax.set_xlabel("benign samples (0: before)")
    ax.set_ylabel("EM rate (exact)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    return _save(fig, path)
