"""L1-regularised logistic probes on per-response LoRA scalars (CLR): which adapters carry general
misalignment and which only the fine-tune's own domain.

Each task is a binary label over responses (misaligned vs aligned over every domain: ``general``;
the same within the narrow domain or outside it). Each probe is fitted on a stratified training
split with its regularisation chosen by cross-validation on that split only, scored on the
held-out split by balanced accuracy (chance 0.5 whatever the class sizes), and repeated with the training labels shuffled (the control a reader compares
against). Non-zero coefficients name the adapters the probe uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from emdiff.errors import InputError


class ProbeConfig(BaseModel):
    """Settings of :func:`scalar_probes`."""

    test_size: float = Field(0.3, gt=0, lt=1)
    cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    """Inverse regularisation strengths tried by cross-validation on the training split."""
    folds: int = Field(3, ge=2)
    n_shuffles: int = Field(10, ge=1)
    """Probes fitted on shuffled training labels: the control's mean, 95th percentile and the
    permutation p-value. (One shuffle is not a control: with few features a shuffled probe
    keeps a tiny coefficient whose sign alone decides its accuracy.)"""
    seed: int = 0


@dataclass
class ProbeResult:
    """Held-out accuracy per task with its shuffled-label control, and the coefficients."""

    scores: pd.DataFrame
    """One row per task: ``task``, ``n``, ``n_positive``, ``accuracy`` and
    ``shuffled_accuracy`` (balanced, held out; the mean over shuffles), ``shuffled_p95``,
    ``p_value`` (permutation), ``chance`` (0.5), ``c``."""
    coefficients: pd.DataFrame
    """One row per (task, feature): the standardised coefficient (0 where L1 dropped it)."""

    def accuracy(self, task: str) -> float:
        return float(self.scores.set_index("task").loc[task, "accuracy"])

    def shuffled(self, task: str) -> float:
        return float(self.scores.set_index("task").loc[task, "shuffled_accuracy"])


def _fit(x: np.ndarray, y: np.ndarray, cfg: ProbeConfig):
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = max(2, min(cfg.folds, int(np.bincount(y).min())))
    # scikit-learn 1.8 replaced penalty="l1" by l1_ratios=(1.0,) and added the new attributes
    params = inspect.signature(LogisticRegressionCV).parameters
    l1 = {"l1_ratios": (1.0,)} if "use_legacy_attributes" in params else {"penalty": "l1"}
    if "use_legacy_attributes" in params:
        l1["use_legacy_attributes"] = False
    clf = LogisticRegressionCV(
        Cs=list(cfg.cs),
        cv=folds,
        solver="saga",
        max_iter=5000,
        scoring="balanced_accuracy",
        class_weight="balanced",
        random_state=cfg.seed,
        **l1,
    )
    return make_pipeline(StandardScaler(), clf).fit(x, y)


def scalar_probes(
    features: np.ndarray,
    tasks: Mapping[str, np.ndarray],
    names: Sequence[str],
    cfg: ProbeConfig | None = None,
) -> ProbeResult:
    """Fit one probe per task. ``features`` ``[n_responses, n_features]``; each task maps to a
    label array of length ``n_responses`` with 1 / 0 for the two classes and -1 for responses
    the task leaves out."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import train_test_split

    cfg = cfg or ProbeConfig()
    if not np.isfinite(features).all():
        raise InputError("LoRA probes: the scalar features contain NaN or infinity")
    rng = np.random.default_rng(cfg.seed)
    rows, coefs = [], []
    for task, labels in tasks.items():
        keep = labels >= 0
        x, y = features[keep], labels[keep].astype(int)
        counts = np.bincount(y, minlength=2)
        if counts.min() < 2 * cfg.folds:
            raise InputError(
                f"LoRA probe '{task}': {counts[1]} positive and {counts[0]} negative responses; "
                f"need at least {2 * cfg.folds} of each"
            )
        xa, xb, ya, yb = train_test_split(
            x, y, test_size=cfg.test_size, stratify=y, random_state=cfg.seed
        )
        probe = _fit(xa, ya, cfg)
        acc = float(balanced_accuracy_score(yb, probe.predict(xb)))
        null = [
            balanced_accuracy_score(yb, _fit(xa, rng.permutation(ya), cfg).predict(xb))
            for _ in range(cfg.n_shuffles)
        ]
        clf = probe[-1]
        rows.append(
            {
                "task": task,
                "n": len(y),
                "n_positive": int(counts[1]),
                "accuracy": acc,
                "shuffled_accuracy": float(np.mean(null)),
                "shuffled_p95": float(np.percentile(null, 95)),
                "p_value": (1 + sum(n >= acc for n in null)) / (1 + len(null)),
                "chance": 0.5,
                "c": float(np.ravel(clf.C_)[0]),
            }
        )
        coefs += [
            {"task": task, "feature": n, "coefficient": float(c)}
            for n, c in zip(names, clf.coef_[0], strict=True)
        ]
    return ProbeResult(pd.DataFrame(rows), pd.DataFrame(coefs))
