"""Sparse decomposition of a direction (a steering vector, a LoRA B column) into dictionary latents.

Three views, each beside a null so a reader can tell whether a number is large:

- **decoder cosines**: cos(direction, decoder row) for every latent, top latents first;
- **sparse reconstruction**: the best combination of k decoder rows (``method="nn_omp"``:
  greedy orthogonal matching pursuit with non-negative coefficients refit by NNLS at each step, as
  latents only add positive multiples of their rows; ``"omp"``: signed coefficients, scikit-learn's
  OMP), with the **explained fraction** ``1 - |v - D c|^2 / |v|^2`` at each k;
- **null**: the same for ``n_null`` random unit directions (and any directions the caller adds,
  for instance shuffled-label mean differences): mean and 95th percentile per k.

When the direction came from two activation sets, :func:`decompose` also joins the encoded
difference of the two sets per latent (a feature diff's table) to the cosine table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from scipy.optimize import nnls

from emdiff.errors import InputError

Method = Literal["nn_omp", "omp"]


class DecomposeConfig(BaseModel):
    """Settings of :func:`decompose`."""

    ks: tuple[int, ...] = (1, 5, 10, 50)
    method: Method = "nn_omp"
    n_null: int = Field(20, ge=1)
    top: int = Field(20, ge=1)
    """Rows of the top-latent table."""
    seed: int = 0


def _unit(v: torch.Tensor) -> np.ndarray:
    v = v.detach().double().flatten().cpu().numpy()
    n = np.linalg.norm(v)
    if not np.isfinite(n) or n == 0:
        raise InputError("decompose: the direction is zero or not finite")
    return v / n


def nn_omp(v: np.ndarray, rows: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    """Greedy non-negative OMP: up to ``k`` rows of ``rows`` ``[n, d]`` (unit) and their
    non-negative coefficients."""
    chosen: list[int] = []
    coef = np.zeros(0)
    resid = v.copy()
    for _ in range(k):
        scores = rows @ resid
        scores[chosen] = -np.inf
        best = int(np.argmax(scores))
        if scores[best] <= 1e-12:
            break
        chosen.append(best)
        coef, _ = nnls(rows[chosen].T, v)
        resid = v - rows[chosen].T @ coef
    return chosen, coef


def _omp(v: np.ndarray, rows: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    from sklearn.linear_model import OrthogonalMatchingPursuit

    k = min(k, rows.shape[1], rows.shape[0])
    fit = OrthogonalMatchingPursuit(n_nonzero_coefs=k, fit_intercept=False).fit(rows.T, v)
    idx = np.flatnonzero(fit.coef_)
    return idx.tolist(), fit.coef_[idx]


def explained(
    v: np.ndarray, rows: np.ndarray, ks: Sequence[int], method: Method
) -> tuple[dict[int, float], dict[int, list[int]]]:
    """Explained fraction of unit ``v`` by the best ``k`` rows, per k, and the rows chosen."""
    solve = nn_omp if method == "nn_omp" else _omp
    out, chosen = {}, {}
    for k in ks:
        idx, coef = solve(v, rows, k)
        recon = rows[idx].T @ coef if idx else np.zeros_like(v)
        out[k] = float(1.0 - np.sum((v - recon) ** 2) / np.sum(v**2))
        chosen[k] = [int(i) for i in idx]
    return out, chosen


@dataclass
class Decomposition:
    """What :func:`decompose` found: the top-latent table, explained fraction per k with its
    null, and the latents the sparse reconstruction chose."""

    name: str
    table: pd.DataFrame
    explained: pd.DataFrame
    """Columns ``k``, ``explained``, ``null_mean``, ``null_p95``, ``latents``."""
    meta: dict = field(default_factory=dict)

    @property
    def top_latent(self) -> int:
        return int(self.table["latent"].iloc[0])

    def save(self, out: str | Path) -> list[Path]:
        """``tables/<name>.parquet`` (top latents), ``tables/<name>_explained.csv`` and
        ``plots/<name>.png`` (top decoder cosines, and explained fraction against the null)."""
        from emdiff.report.direction_plots import decomposition_plot

        out = Path(out)
        (out / "tables").mkdir(parents=True, exist_ok=True)
        t = out / "tables" / f"{self.name}.parquet"
        self.table.to_parquet(t)
        e = out / "tables" / f"{self.name}_explained.csv"
        self.explained.to_csv(e, index=False)
        plot = decomposition_plot(self, out / "plots" / f"{self.name}.png")
        return [t, e, plot]

    def summary(self) -> dict:
        first = self.explained.iloc[0]
        return {
            "top_latent": self.top_latent,
            "top_cosine": float(self.table["cosine"].iloc[0]),
            f"explained_k{int(first['k'])}": float(first["explained"]),
            f"null_k{int(first['k'])}": float(first["null_p95"]),
            **self.meta,
        }


def decompose(
    direction: torch.Tensor,
    decoder_rows: torch.Tensor,
    cfg: DecomposeConfig | None = None,
    name: str = "decomposition",
    latent_diff: pd.DataFrame | None = None,
    null_directions: Sequence[torch.Tensor] = (),
) -> Decomposition:
    """Decompose ``direction`` ``[d]`` over ``decoder_rows`` ``[n_latents, d]``.

    ``latent_diff``: a feature diff's table (columns ``feature`` and ``mean_a``/``mean_b`` or
    ``effect``) whose per-latent difference is joined to the top-latent table.
    ``null_directions`` are added to the ``n_null`` random ones."""
    cfg = cfg or DecomposeConfig()
    rows = decoder_rows.detach().double().cpu().numpy()
    if rows.ndim != 2 or rows.shape[1] != direction.numel():
        raise InputError(
            f"decompose: decoder rows {tuple(rows.shape)} do not match a direction of width "
            f"{direction.numel()}"
        )
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    rows = rows / np.where(norms > 0, norms, 1.0)
    v = _unit(direction)
    cos = rows @ v
    order = np.argsort(-cos)[: cfg.top]
    table = pd.DataFrame(
        {"latent": order, "cosine": cos[order], "rank": np.arange(1, len(order) + 1)}
    )
    if latent_diff is not None:
        diff = latent_diff.set_index("feature")
        col = "mean_diff" if "mean_diff" in diff else "effect"
        if "mean_a" in diff and "mean_b" in diff:
            diff = diff.assign(mean_diff=diff["mean_a"] - diff["mean_b"])
            col = "mean_diff"
        table["encoded_diff"] = diff[col].reindex(table["latent"]).to_numpy()
    ks = tuple(k for k in cfg.ks if k <= rows.shape[0])
    fit, chosen = explained(v, rows, ks, cfg.method)
    rng = np.random.default_rng(cfg.seed)
    nulls = [rng.standard_normal(rows.shape[1]) for _ in range(cfg.n_null)]
    nulls += [d.detach().double().flatten().cpu().numpy() for d in null_directions]
    null_fit = [explained(n / np.linalg.norm(n), rows, ks, cfg.method)[0] for n in nulls]
    table_k = pd.DataFrame(
        {
            "k": ks,
            "explained": [fit[k] for k in ks],
            "null_mean": [float(np.mean([n[k] for n in null_fit])) for k in ks],
            "null_p95": [float(np.percentile([n[k] for n in null_fit], 95)) for k in ks],
            "latents": [chosen[k] for k in ks],
        }
    )
    meta = {"method": cfg.method, "n_null": len(nulls), "n_latents": int(rows.shape[0])}
    return Decomposition(name, table, table_k, meta)
