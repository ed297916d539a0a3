"""Phase transitions of a LoRA fine-tune, read from its checkpoints.

For the concatenated B weights ``B_t`` of every ``checkpoint-STEP`` folder: the norm, the cosine
with the final B, the local cosine similarity of successive updates
``LCS_w(t) = cos(B_t - B_{t-w}, B_{t+w} - B_t)`` for windows ``w`` (in steps), the trajectory's
first two principal components, and, when a scorer is given, the EM rate at each checkpoint.

The **transition step** is where successive updates agree least: the minimum of the local cosine
similarity averaged over the windows, at steps where every window is defined (the dip that marks
B turning to a new direction). ``turn_deg`` (the angle between ``B_{t-w}`` and ``B_{t+w}``, ``w``
the smallest window) shows how fast B rotates there. With EM rates, ``em_half_step`` (the first
checkpoint reaching half the final EM) is reported beside it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from emdiff.errors import InputError

EMAt = Callable[[int, dict[str, torch.Tensor]], float]
"""``(step, adapter weights) -> EM rate`` of the model with those weights."""


def load_checkpoints(folder: str | Path) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """``(step, LoRA weights)`` of every ``checkpoint-STEP`` under ``folder``, by step (and the
    final adapter in ``folder`` itself is not included: it repeats the last step)."""
    folder = Path(folder)
    found = []
    for path in folder.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", path.name)
        weights = path / "adapter_model.safetensors"
        if m and weights.is_file():
            found.append((int(m.group(1)), load_file(str(weights))))
    if len(found) < 3:
        raise InputError(
            f"{folder}: {len(found)} checkpoint-STEP folders with adapter_model.safetensors; "
            "phases need at least 3 (fine-tune with checkpoint_every)"
        )
    return sorted(found, key=lambda s: s[0])


def _flat(weights: dict[str, torch.Tensor], part: str) -> np.ndarray:
    keys = sorted(k for k in weights if f"lora_{part}" in k)
    if not keys:
        raise InputError(f"checkpoint has no lora_{part} weights")
    return torch.cat([weights[k].float().flatten() for k in keys]).numpy()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


@dataclass
class Phases:
    """Per-checkpoint table and the detected transition."""

    table: pd.DataFrame
    """``step``, ``b_norm``, ``a_norm``, ``cos_final``, ``lcs_w{w}``, ``turn_deg``, ``pc1``,
    ``pc2`` and ``em`` when scored."""
    transition_step: int
    windows: tuple[int, ...]
    meta: dict = field(default_factory=dict)

    @property
    def em_half_step(self) -> int | None:
        if "em" not in self.table:
            return None
        em = self.table["em"].to_numpy()
        hit = np.nonzero(em >= em[-1] / 2)[0]
        return int(self.table["step"].iloc[hit[0]]) if len(hit) else None

    def summary(self) -> dict:
        out = {"phase_transition_step": self.transition_step, **self.meta}
        if self.em_half_step is not None:
            out["phase_em_half_step"] = self.em_half_step
            out["phase_em_final"] = float(self.table["em"].iloc[-1])
        return out

    def save(self, out: str | Path, name: str = "phases") -> list[Path]:
        from emdiff.report.lora_plots import phases_plot

        out = Path(out)
        (out / "tables").mkdir(parents=True, exist_ok=True)
        t = out / "tables" / f"{name}.csv"
        self.table.to_csv(t, index=False)
        return [t, phases_plot(self, out / "plots" / f"{name}.png")]


def phases(
    checkpoints: Sequence[tuple[int, dict[str, torch.Tensor]]],
    windows: Sequence[int] = (5, 10, 15),
    em_at: EMAt | None = None,
) -> Phases:
    """The trajectory metrics above for checkpoints sorted by step."""
    steps = [s for s, _ in checkpoints]
    B = np.stack([_flat(w, "B") for _, w in checkpoints])
    A = np.stack([_flat(w, "A") for _, w in checkpoints])
    at = {s: i for i, s in enumerate(steps)}
    table = pd.DataFrame(
        {
            "step": steps,
            "b_norm": np.linalg.norm(B, axis=1),
            "a_norm": np.linalg.norm(A, axis=1),
            "cos_final": [_cos(b, B[-1]) for b in B],
        }
    )
    for w in windows:
        table[f"lcs_w{w}"] = [
            _cos(B[i] - B[at[s - w]], B[at[s + w]] - B[i])
            if s - w in at and s + w in at
            else np.nan
            for i, s in enumerate(steps)
        ]
    w = min(windows)
    turn = [
        np.degrees(np.arccos(np.clip(_cos(B[at[s - w]], B[at[s + w]]), -1, 1)))
        if s - w in at and s + w in at
        else np.nan
        for s in steps
    ]
    table["turn_deg"] = turn
    centred = B - B.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    table["pc1"], table["pc2"] = u[:, 0] * s[0], (u[:, 1] * s[1] if len(s) > 1 else 0.0)
    var = s**2 / max(float((s**2).sum()), 1e-30)
    if em_at is not None:
        table["em"] = [em_at(step, weights) for step, weights in checkpoints]
    lcs = table[[f"lcs_w{w}" for w in windows]].mean(axis=1, skipna=False).to_numpy()
    if np.isnan(lcs).all():
        raise InputError(
            f"phases: no checkpoint has all windows {tuple(windows)} defined (steps "
            f"{steps[0]}..{steps[-1]}): use smaller windows or more checkpoints"
        )
    i = int(np.nanargmin(lcs))
    transition = int(table["step"].iloc[i])
    meta = {
        "phase_pc1_variance": float(var[0]),
        "phase_lcs_min": float(lcs[i]),
        "phase_turn_deg_at_transition": float(turn[i]),
    }
    return Phases(table, transition, tuple(windows), meta)
