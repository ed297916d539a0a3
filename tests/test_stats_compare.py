"""Effect sizes, CIs, tests and BH q-values of feature comparisons (emdiff.stats.compare)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from emdiff.errors import InputError
from emdiff.stats.compare import (
    bh_qvalues,
    compare_layers,
    compare_stats,
    finalize,
    ranked,
    sequence_ids,
    sequence_matrix,
)
from emdiff.stats.features import FeatureStats


def stats_of(values: np.ndarray, tokens_per_seq: int = 1, offset: int = 0) -> FeatureStats:
    """FeatureStats of ``values [n_seq * tokens_per_seq, d]`` (consecutive tokens share a seq)."""
    n, d = values.shape
    s = FeatureStats(d)
    seq = torch.arange(n) // tokens_per_seq + offset
    s.update(torch.tensor(values, dtype=torch.float32), seq, torch.arange(n) % tokens_per_seq)
    return s


def test_sequence_matrix_is_the_mean_over_each_sequences_tokens():
    rng = np.random.default_rng(0)
    x = rng.exponential(size=(12, 5)) * (rng.random((12, 5)) < 0.4)
    s = stats_of(x, tokens_per_seq=3)
    ids = sequence_ids(s)
    np.testing.assert_array_equal(ids, np.arange(4))
    expect = x.reshape(4, 3, 5).mean(1)
    np.testing.assert_allclose(sequence_matrix(s, ids), expect, rtol=1e-6)
    np.testing.assert_allclose(sequence_matrix(s, ids, np.array([3, 1])), expect[:, [3, 1]], 1e-6)


def test_bh_matches_the_step_up_definition():
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan, 0.001])
    m = len(p)
    filled = np.nan_to_num(p, nan=1.0)
    order = np.argsort(filled)
    adj = np.minimum.accumulate((filled[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    expect = np.empty(m)
    expect[order] = np.minimum(adj, 1)
    np.testing.assert_allclose(bh_qvalues(p), expect)


@pytest.mark.parametrize("test", ["welch", "mannwhitney"])
def test_planted_feature_ranks_first_and_nulls_stay_below_fdr(test):
    rng = np.random.default_rng(1)
    a, b = rng.exponential(size=(300, 200)), rng.exponential(size=(300, 200))
    a[:, 7] += 0.8  # planted increase
    b[:, 11] += 0.8  # planted decrease (stronger in b)
    t = compare_stats(stats_of(a), stats_of(b), test=test)
    assert ranked(t, "increase").feature[0] == 7
    assert ranked(t, "decrease").feature[0] == 11
    assert t.q[7] < 1e-6 and t.q[11] < 1e-6
    assert (t.q.drop([7, 11]) < 0.05).sum() <= 2  # BH at 5%: almost no false discoveries
    assert (t.test == test).all() and (t.n_a == 300).all()
    assert t.effect_ci_low[7] > 0 > t.effect_ci_high[11]
    chunked = compare_stats(stats_of(a), stats_of(b), test=test, chunk=7)  # ragged last chunk
    pd.testing.assert_frame_equal(chunked, t)


def test_confidence_intervals_cover_the_truth():
    """Each of 400 features is an independent replicate with the same true difference."""
    rng = np.random.default_rng(2)
    d, n = 400, 60
    a, b = rng.exponential(1.2, size=(n, d)), rng.exponential(1.0, size=(n, d))
    t = compare_stats(stats_of(a), stats_of(b))
    cover_diff = ((t.diff_ci_low <= 0.2) & (t.diff_ci_high >= 0.2)).mean()
    g = 0.2 / np.sqrt((1.2**2 + 1.0**2) / 2)
    cover_g = ((t.effect_ci_low <= g) & (g <= t.effect_ci_high)).mean()
    assert 0.9 <= cover_diff <= 0.99, cover_diff
    assert 0.9 <= cover_g <= 0.99, cover_g
    np.testing.assert_allclose(t.seq_mean_a - t.seq_mean_b, t["diff"], atol=1e-9)


@pytest.mark.parametrize("test", ["paired_t", "wilcoxon"])
def test_pairing_removes_between_sequence_variance(test):
    rng = np.random.default_rng(3)
    level = rng.exponential(5.0, size=(80, 1)) * np.ones((1, 4))  # large per-prompt level
    b = level + rng.exponential(0.1, size=(80, 4))
    a = b + np.array([0.3, 0.0, 0.0, 0.0]) + rng.normal(0, 0.05, size=(80, 4)).clip(-0.09)
    sa, sb = stats_of(a), stats_of(b)
    paired = compare_stats(sa, sb, paired=True, test=test)
    unpaired = compare_stats(sa, sb)
    assert paired.p[0] < 1e-10 < unpaired.p[0]
    assert paired.effect[0] > 3 * unpaired.effect[0]
    assert paired.rank_increase[0] == 1


def test_features_that_never_fire_are_neutral_and_constant_ones_are_not_tests():
    rng = np.random.default_rng(4)
    a, b = rng.exponential(size=(30, 3)), rng.exponential(size=(30, 3))
    a[:, 1] = b[:, 1] = 0.0
    for paired, test in (
        (False, "welch"),
        (False, "mannwhitney"),
        (True, "paired_t"),
        (True, "wilcoxon"),
    ):
        t = compare_stats(stats_of(a), stats_of(b), paired=paired, test=test)
        assert (t.effect[1], t.p[1], t["diff"][1]) == (0.0, 1.0, 0.0)
        assert t.fire_rate_a[1] == 0 and np.isfinite(t.effect[[0, 2]]).all()


def test_signed_codes_count_as_firing():
    s = stats_of(np.array([[-1.0, 0.0], [0.0, 2.0]]))
    assert s.fire.tolist() == [1, 1] and s.sum.tolist() == [-1.0, 2.0]


def test_wrong_test_width_and_sizes_are_refused():
    x = np.ones((5, 3))
    with pytest.raises(ValueError, match="not a paired test"):
        compare_stats(stats_of(x), stats_of(x), paired=True, test="welch")
    with pytest.raises(ValueError, match="3 and 4 features"):
        compare_stats(stats_of(x), stats_of(np.ones((5, 4))))
    with pytest.raises(ValueError, match="at least 2 sequences"):
        compare_stats(stats_of(x[:1]), stats_of(x))
    with pytest.raises(ValueError, match="different sequences"):  # nothing lines up to pair
        compare_stats(stats_of(x), stats_of(x, offset=100), paired=True)
    with pytest.raises(ValueError, match="different selected token counts"):
        three_pairs = stats_of(np.ones((6, 3)), 2)  # ids 0, 1, 2 with 2 tokens each
        short_last = stats_of(np.ones((4, 3)), 2).merge(stats_of(np.ones((1, 3)), 1, offset=2))
        compare_stats(three_pairs, short_last, paired=True, same_tokens=True)


def test_layers_share_one_fdr_and_one_ranking():
    rng = np.random.default_rng(5)
    a = {0: rng.exponential(size=(50, 20)), 3: rng.exponential(size=(50, 20))}
    b = {k: rng.exponential(size=(50, 20)) for k in a}
    a[3][:, 4] += 2.0
    t = compare_layers(
        {k: stats_of(v) for k, v in a.items()}, {k: stats_of(v) for k, v in b.items()}
    )
    assert len(t) == 40 and sorted(set(t.layer)) == [0, 3]
    top = ranked(t).iloc[0]
    assert (top.layer, top.feature) == (3, 4)
    np.testing.assert_allclose(t.q, bh_qvalues(t.p.to_numpy()))
    assert sorted(t.rank_increase) == list(range(1, 41))
    with pytest.raises(ValueError, match="only one side"):
        compare_layers({0: stats_of(a[0])}, {1: stats_of(b[0])})


def test_rankings_follow_the_chosen_statistic():
    """A latent that barely varies wins on the standardised effect; by the activation increase
    (``diff``, OpenAI's ranking) the one that moved most wins. Unknown statistics are refused."""
    t = pd.DataFrame({"feature": [0, 1], "effect": [4.0, 3.9], "diff": [6.1, 7.4], "p": 1e-9})
    assert finalize(t).sort_values("rank_increase").feature.tolist() == [0, 1]
    assert finalize(t, "diff").sort_values("rank_increase").feature.tolist() == [1, 0]
    assert finalize(t, "diff").sort_values("rank_decrease").feature.tolist() == [0, 1]
    with pytest.raises(InputError, match="rank_by"):
        finalize(t, "p")
