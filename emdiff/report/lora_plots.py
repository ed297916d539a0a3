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
    """EM against N benign samples (0: before), with its interval; the narrow domain's and the
    cued EM beside when measured."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    n = rows["n"].astype(str)
    err = [rows["em"] - rows["em_low"], rows["em_high"] - rows["em"]]
    ax.errorbar(n, rows["em"], yerr=err, marker="o", capsize=3, label="eval questions")
    for col, marker, label in (
        ("narrow_em", "s", "narrow domain"),
        ("cued_em", "^", "with the persona cue"),
    ):
        if col in rows:
            ax.plot(n, rows[col], marker=marker, label=label)
    ax.set_xlabel("benign samples (0: before)")
    ax.set_ylabel("EM rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("benign re-alignment")
    return _save(fig, path)


def scalar_plot(frame: pd.DataFrame, path: str | Path, top: int = 12) -> Path:
    """Per-token LoRA scalars of misaligned and aligned answers, per rank (box plots)."""
    plt = _pyplot()
    cols = [c for c in frame.columns if c not in ("seq", "pos", "misaligned", "domain")][:top]
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(cols) + 2), 4))
    pos = range(len(cols))
    for label, shift, color in ((1, -0.18, "tab:red"), (0, 0.18, "tab:blue")):
        part = frame[frame["misaligned"] == label]
        box = ax.boxplot(
            [part[c].to_numpy() for c in cols],
            positions=[p + shift for p in pos],
            widths=0.3,
            showfliers=False,
            patch_artist=True,
        )
        for b in box["boxes"]:
            b.set_facecolor(color)
            b.set_alpha(0.5)
        ax.plot([], [], color=color, lw=6, alpha=0.5, label="misaligned" if label else "aligned")
    ax.set_xticks(list(pos), cols, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("A . x per answer token")
    ax.legend(fontsize=8)
    ax.set_title("when each LoRA rank fires")
    return _save(fig, path)
