"""Compare two sets of feature statistics: effect sizes with confidence intervals, tests, FDR.

The unit of analysis is the *sequence*: each sequence contributes one number per feature, its mean
activation over the selected tokens (tokens of one sequence are not independent, so token-level
tests would overstate the evidence). Token-level means and firing rates are reported beside it.

Conventions: side ``a`` is the "treated" side and ``b`` the reference, so a positive ``diff``
means the feature is stronger in ``a`` (Q1: bad data vs good, Q2: fine-tuned vs base, Q3:
misaligned vs aligned answers).

Tests (column ``test``):

- unpaired ``welch``: Welch's t-test on the sequence means (default); ``mannwhitney``: the
  two-sided Mann–Whitney U test (scipy chooses exact or asymptotic with tie correction), for
  heavy-tailed features.
- paired ``paired_t``: the paired t-test on per-sequence differences (default when paired);
  ``wilcoxon``: the Wilcoxon signed-rank test (zero differences dropped, as in Wilcoxon's method).

An effect of ±inf means the feature is constant within each side and differs between them.

Effect sizes: unpaired, Hedges' g (pooled SD, small-sample corrected); paired, d_z (mean difference
over the SD of the differences, same correction). Their CIs use the usual large-sample standard
errors; the CI of ``diff`` is the Welch (or paired) t interval whichever test gives the p-value.
q-values are Benjamini–Hochberg over every row of the table (all features of all layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
import torch
from scipy import stats as st

from emdiff.errors import InputError, NonFiniteError
from emdiff.stats.features import FeatureStats
from emdiff.stats.methods import PAIRED, UNPAIRED

Test = Literal["welch", "mannwhitney", "paired_t", "wilcoxon"]


def sequence_ids(stats: FeatureStats) -> np.ndarray:
    """Sorted ids of the sequences that had at least one selected token."""
    return np.array(sorted(stats.seq_tokens), dtype=np.int64)


def sequence_matrix(
    stats: FeatureStats, seq_ids: np.ndarray, features: np.ndarray | None = None
) -> np.ndarray:
    """Dense ``[len(seq_ids), len(features)]`` per-sequence mean activations (0 where inactive).

    ``seq_ids`` must be sequences of ``stats``; ``features`` defaults to all of them.
    """
    features = np.arange(stats.d_sae) if features is None else np.asarray(features)
    seq, feat, mean = (t.numpy() for t in stats.sequence_means())
    row = np.searchsorted(seq_ids, seq)
    row_ok = (row < len(seq_ids)) & (seq_ids[np.minimum(row, len(seq_ids) - 1)] == seq)
    col = np.full(stats.d_sae, -1, dtype=np.int64)
    col[features] = np.arange(len(features))
    c = col[feat]
    keep = row_ok & (c >= 0)
    out = np.zeros((len(seq_ids), len(features)), dtype=np.float64)
    out[row[keep], c[keep]] = mean[keep]
    return out


def _sparse_by_feature(stats: FeatureStats, seq_ids: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(row, feature, mean)`` of the nonzero sequence means on ``seq_ids``, sorted by feature,
    so that a feature range is one contiguous slice (built once, sliced per chunk)."""
    seq, feat, mean = (t.numpy() for t in stats.sequence_means())
    row = np.searchsorted(seq_ids, seq)
    ok = (row < len(seq_ids)) & (seq_ids[np.minimum(row, max(len(seq_ids) - 1, 0))] == seq)
    order = np.argsort(feat[ok], kind="stable")
    return row[ok][order], feat[ok][order], mean[ok][order]


def _dense_chunk(sparse: tuple[np.ndarray, ...], n_rows: int, start: int, stop: int) -> np.ndarray:
    row, feat, mean = sparse
    lo, hi = np.searchsorted(feat, [start, stop])
    out = np.zeros((n_rows, stop - start), dtype=np.float64)
    out[row[lo:hi], feat[lo:hi] - start] = mean[lo:hi]
    return out


def bh_qvalues(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values); NaN p-values count as 1."""
    p = np.nan_to_num(np.asarray(p, dtype=np.float64), nan=1.0)
    if p.size == 0:
        return p
    return st.false_discovery_control(np.clip(p, 0.0, 1.0), method="bh")


def _hedges_j(df: np.ndarray | float) -> np.ndarray:
    return 1.0 - 3.0 / (4.0 * np.asarray(df, dtype=np.float64) - 1.0)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, with 0/0 = 0 and x/0 = ±inf (a constant feature that differs)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num / den
    return np.where((den == 0) & (num == 0), 0.0, r)


def _unpaired(xa: np.ndarray, xb: np.ndarray, test: str, z: float, conf: float) -> dict:
    na, nb = len(xa), len(xb)
    ma, mb = xa.mean(0), xb.mean(0)
    va, vb = xa.var(0, ddof=1), xb.var(0, ddof=1)
    diff = ma - mb
    se2 = va / na + vb / nb
    se = np.sqrt(se2)
    with np.errstate(divide="ignore", invalid="ignore"):
        dof = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    dof = np.where(np.isfinite(dof), dof, na + nb - 2)
    tq = st.t.ppf(0.5 + conf / 2, dof)
    sp = np.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    g = _hedges_j(na + nb - 2) * _safe_ratio(diff, sp)
    g_se = np.sqrt((na + nb) / (na * nb) + np.where(np.isfinite(g), g, 0) ** 2 / (2 * (na + nb)))
    if test == "welch":
        tstat = _safe_ratio(diff, se)
        p = 2 * st.t.sf(np.abs(tstat), dof)
        stat = tstat
    else:
        stat, p = _columnwise(lambda a, b: st.mannwhitneyu(a, b, axis=0), xa, xb, False)
    return dict(
        seq_mean_a=ma,
        seq_mean_b=mb,
        diff=diff,
        diff_ci_low=diff - tq * se,
        diff_ci_high=diff + tq * se,
        effect=g,
        effect_ci_low=g - z * g_se,
        effect_ci_high=g + z * g_se,
        statistic=stat,
        p=p,
    )


def _paired(xa: np.ndarray, xb: np.ndarray, test: str, z: float, conf: float) -> dict:
    n = len(xa)
    d = xa - xb
    md, sd = d.mean(0), d.std(0, ddof=1)
    se = sd / np.sqrt(n)
    tq = st.t.ppf(0.5 + conf / 2, n - 1)
    dz = _hedges_j(n - 1) * _safe_ratio(md, sd)
    dz_se = np.sqrt(1.0 / n + np.where(np.isfinite(dz), dz, 0) ** 2 / (2 * n))
    if test == "paired_t":
        stat = _safe_ratio(md, se)
        p = 2 * st.t.sf(np.abs(stat), n - 1)
    else:
        stat, p = _columnwise(
            lambda a, b: st.wilcoxon(a, b, axis=0, zero_method="wilcox"), xa, xb, True
        )
    return dict(
        seq_mean_a=xa.mean(0),
        seq_mean_b=xb.mean(0),
        diff=md,
        diff_ci_low=md - tq * se,
        diff_ci_high=md + tq * se,
        effect=dz,
        effect_ci_low=dz - z * dz_se,
        effect_ci_high=dz + z * dz_se,
        statistic=stat,
        p=p,
    )


def _columnwise(fn, xa: np.ndarray, xb: np.ndarray, paired: bool) -> tuple[np.ndarray, np.ndarray]:
    """Run a scipy test on the columns that are not identical on both sides (p = 1 there)."""
    stat = np.zeros(xa.shape[1])
    p = np.ones(xa.shape[1])
    both = np.concatenate([xa, xb])
    varying = both.max(0) > both.min(0)
    if paired:  # a column whose differences are all zero is not testable
        varying &= (xa != xb).any(0)
    if varying.any():
        with np.errstate(all="ignore"):
            res = fn(xa[:, varying], xb[:, varying])
        stat[varying] = res.statistic
        p[varying] = np.nan_to_num(res.pvalue, nan=1.0)
    return stat, p


def _paired_ids(a: FeatureStats, b: FeatureStats, ids_a, ids_b, same_tokens: bool) -> np.ndarray:
    """Sequence ids of both sides, which must agree; with ``same_tokens`` the token counts too."""
    if not np.array_equal(ids_a, ids_b):
        raise InputError(
            f"paired sides hold different sequences ({len(ids_a)} and {len(ids_b)} ids, "
            f"{len(np.intersect1d(ids_a, ids_b))} shared): a sequence lost all its selected tokens "
            "on one side only; pass exclude_sinks=False or compare unpaired"
        )
    ta, tb = a.seq_tokens, b.seq_tokens
    differ = [i for i in ids_a.tolist() if ta[i] != tb[i]] if same_tokens else []
    if differ:
        raise InputError(
            f"{len(differ)} paired sequences (e.g. id {differ[0]}) have different selected token "
            "counts on the two sides, so they are not the same tokens; pass exclude_sinks=False"
        )
    return ids_a


def check_stats(stats: FeatureStats, where: str) -> None:
    """Raise :class:`~emdiff.errors.NonFiniteError` naming ``where`` and the first feature whose
    sum, sum of squares, maximum or a sequence mean is NaN or infinite (a NaN would otherwise make
    every effect NaN and every q-value 1, which reads as "no difference")."""
    _, feat, mean = stats.sequence_means()
    parts = (("sum", stats.sum, None), ("sum of squares", stats.sumsq, None))
    parts += (("maximum", stats.max, None), ("sequence mean", mean, feat))
    for name, values, features in parts:
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            idx = bad.nonzero().flatten()
            first = int(idx[0] if features is None else features[idx[0]])
            raise NonFiniteError(
                f"{where}: the {name} of feature {first} is {float(values[idx[0]])} "
                f"({len(idx)} non-finite values); the activations or the dictionary hold NaN or "
                "infinity (check its weights and the model's dtype)"
            )


def compare_stats(
    a: FeatureStats,
    b: FeatureStats,
    *,
    paired: bool = False,
    test: Test | None = None,
    confidence: float = 0.95,
    chunk: int = 4096,
    same_tokens: bool = False,
    labels: tuple[str, str] = ("a", "b"),
    where: str = "statistics",
) -> pd.DataFrame:
    """One row per feature: token- and sequence-level means of both sides, the difference with its
    CI, the standardised effect with its CI, the test statistic, p and the BH q-value.

    ``paired`` pairs sequence ids present on both sides (the same tokens read by two models, or
    two datasets whose row ``i`` share a prompt); unpaired compares all sequences of each side.
    ``same_tokens`` (paired) also requires equal token counts per pair: the same tokens read by
    two models. ``labels`` and ``where`` (e.g. ``"layer 12"``) name the sides and the layer in
    errors: non-finite statistics, or fewer than 2 sequences on a side.
    """
    for side, label in zip((a, b), labels, strict=True):
        check_stats(side, f"{where}, side {label!r}")
    test = test or ("paired_t" if paired else "welch")
    allowed = PAIRED if paired else UNPAIRED
    if test not in allowed:
        raise InputError(
            f"test {test!r} is not {'a paired' if paired else 'an unpaired'} test; "
            f"use one of {allowed}"
        )
    if a.d_sae != b.d_sae:
        raise InputError(f"the two sides have {a.d_sae} and {b.d_sae} features")
    ids_a, ids_b = sequence_ids(a), sequence_ids(b)
    if paired:
        ids_a = ids_b = _paired_ids(a, b, ids_a, ids_b, same_tokens)
    if min(len(ids_a), len(ids_b)) < 2:
        raise InputError(
            f"{where}: need at least 2 sequences {'pairs' if paired else 'per side'} with selected "
            f"tokens to compare, got {len(ids_a)} ({labels[0]!r}) and {len(ids_b)} "
            f"({labels[1]!r}); nothing to compute"
        )
    z = float(st.norm.ppf(0.5 + confidence / 2))
    fn = _paired if paired else _unpaired
    sparse_a, sparse_b = _sparse_by_feature(a, ids_a), _sparse_by_feature(b, ids_b)
    parts = []
    for start in range(0, a.d_sae, chunk):
        stop = min(start + chunk, a.d_sae)
        xa = _dense_chunk(sparse_a, len(ids_a), start, stop)
        xb = _dense_chunk(sparse_b, len(ids_b), start, stop)
        stats_ = fn(xa, xb, test, z, confidence)
        parts.append(pd.DataFrame({"feature": np.arange(start, stop), **stats_}))
    table = pd.concat(parts, ignore_index=True)
    table.insert(1, "token_mean_a", a.mean.cpu().numpy())
    table.insert(2, "token_mean_b", b.mean.cpu().numpy())
    table.insert(3, "fire_rate_a", a.fire_rate.cpu().numpy())
    table.insert(4, "fire_rate_b", b.fire_rate.cpu().numpy())
    table["p"] = table["p"].fillna(1.0)
    table["test"] = test
    table["n_a"], table["n_b"] = len(ids_a), len(ids_b)
    table["n_tokens_a"], table["n_tokens_b"] = a.n_tokens, b.n_tokens
    return finalize(table)


RankBy = Literal["effect", "diff"]
"""What orders the features: the standardised ``effect`` (default) or the raw difference of
the means, ``diff`` (the activation increase, as OpenAI rank a fine-tune's latents)."""


def finalize(table: pd.DataFrame, rank_by: RankBy = "effect") -> pd.DataFrame:
    """(Re)compute BH q-values over all rows and the two rankings by ``rank_by``.

    ``rank_increase`` 1 is the largest positive value (stronger in ``a``); ``rank_decrease`` 1 the
    most negative. Call this again after concatenating the tables of several layers.
    """
    if rank_by not in ("effect", "diff"):
        raise InputError(f"rank_by must be 'effect' or 'diff', not {rank_by!r}")
    table = table.copy()
    table["q"] = bh_qvalues(table["p"].to_numpy())
    effect = table[rank_by].fillna(0.0)
    table["rank_increase"] = effect.rank(ascending=False, method="first").astype(int)
    table["rank_decrease"] = effect.rank(ascending=True, method="first").astype(int)
    return table


def compare_layers(
    a: Mapping[int, FeatureStats],
    b: Mapping[int, FeatureStats],
    rank_by: RankBy = "effect",
    **kwargs,
) -> pd.DataFrame:
    """:func:`compare_stats` per layer, concatenated with a ``layer`` column; q-values and ranks
    (by ``rank_by``) are over all layers together."""
    if not a and not b:
        raise InputError("no layers to compare: pass statistics of at least one layer")
    missing = sorted(set(a) ^ set(b))
    if missing:
        raise InputError(f"layers {missing} are on only one side")
    parts = []
    for layer in sorted(a):
        t = compare_stats(a[layer], b[layer], where=f"layer {layer}", **kwargs)
        t.insert(0, "layer", layer)
        parts.append(t)
    return finalize(pd.concat(parts, ignore_index=True), rank_by)


def ranked(
    table: pd.DataFrame, direction: Literal["increase", "decrease"] = "increase"
) -> pd.DataFrame:
    """The table sorted by ``rank_increase`` or ``rank_decrease``."""
    if direction not in ("increase", "decrease"):
        raise InputError(f"direction must be 'increase' or 'decrease', not {direction!r}")
    return table.sort_values(f"rank_{direction}").reset_index(drop=True)


def significant(table: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Rows with ``q < alpha``."""
    return table[table["q"] < alpha]


def feature_keys(table: pd.DataFrame) -> Sequence[tuple[int, int]] | Sequence[int]:
    """Identities of the rows: ``(layer, feature)`` when there is a layer column, else features."""
    if "layer" in table:
        return list(zip(table["layer"].astype(int), table["feature"].astype(int), strict=True))
    return table["feature"].astype(int).tolist()
