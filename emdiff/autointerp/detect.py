"""Detection scoring: can a reader of the explanation tell held-out activating contexts from
non-activating ones?

As in delphi: the held-out activating contexts and as many non-activating ones are shuffled
(seeded), shown unmarked in batches of a few, and the interpreter says for each whether the latent
fires. The score is the balanced accuracy, ``(TPR + TNR) / 2``, so 0.5 is chance whatever the class
balance; the AUC is added when the interpreter gives probabilities. Batches whose reply cannot be
read after retries count as unparsed, not as guesses.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

from emdiff.autointerp.cards import Context
from emdiff.autointerp.explain import Interpreter, ask_with_retries


class Detection(NamedTuple):
    """Counts and scores of one explanation on held-out contexts."""

    true_pos: int
    """Activating contexts predicted to fire."""
    false_neg: int
    """Activating contexts predicted not to fire."""
    true_neg: int
    """Non-activating contexts predicted not to fire."""
    false_pos: int
    """Non-activating contexts predicted to fire."""
    unparsed: int
    """Contexts in batches whose reply could not be read (left out of the counts)."""
    balanced_accuracy: float | None
    """``(TPR + TNR) / 2``; None without at least one scored context of each class."""
    auc: float | None
    """Area under the ROC of the predicted probabilities; None when there are none."""
    error: str | None = None
    """The last reason a batch went unparsed."""

    @property
    def n_active(self) -> int:
        return self.true_pos + self.false_neg

    @property
    def n_inactive(self) -> int:
        return self.true_neg + self.false_pos


def balanced_accuracy(tp: int, fn: int, tn: int, fp: int) -> float | None:
    """Mean of the true-positive and true-negative rates; None when a class is empty."""
    if tp + fn == 0 or tn + fp == 0:
        return None
    return (tp / (tp + fn) + tn / (tn + fp)) / 2


def roc_auc(labels: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def score_detection(
    interpreter: Interpreter,
    explanation: str,
    activating: Sequence[Context],
    negatives: Sequence[Context],
    *,
    batch_size: int = 5,
    seed: int | str = 0,
    parse_retries: int = 2,
) -> Detection:
    """Score ``explanation`` by detection on held-out ``activating`` and ``negatives``."""
    samples = [(c.tokens, True) for c in activating] + [(c.tokens, False) for c in negatives]
    random.Random(f"detect/{seed}").shuffle(samples)
    counts = {"tp": 0, "fn": 0, "tn": 0, "fp": 0}
    unparsed, error = 0, None
    labels: list[bool] = []
    probs: list[float] = []
    have_probs = True
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        texts = [tokens for tokens, _ in batch]
        got, why = ask_with_retries(
            lambda texts=texts: interpreter.detect(explanation, texts), parse_retries, "detect"
        )
        if got is None:
            unparsed, error = unparsed + len(batch), why
            continue
        predicted, p = got
        for (_, fires), guess in zip(batch, predicted, strict=True):
            key = ("tp" if guess else "fn") if fires else ("fp" if guess else "tn")
            counts[key] += 1
        labels += [fires for _, fires in batch]
        if p is None:
            have_probs = False
        else:
            probs += p
    tp, fn, tn, fp = counts["tp"], counts["fn"], counts["tn"], counts["fp"]
    auc = roc_auc(labels, probs) if have_probs and labels else None
    return Detection(tp, fn, tn, fp, unparsed, balanced_accuracy(tp, fn, tn, fp), auc, error)
