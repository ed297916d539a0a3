"""Streaming feature statistics: exact against dense references, and shards merge exactly."""

from __future__ import annotations

import pytest
import torch

from emdiff.stats.features import FeatureStats, ResidualStats

F, K = 50, 4


def _batches(n_batches=6, seed=0):
    """Sparse nonnegative activations of whole sequences, with global sequence ids."""
    g = torch.Generator().manual_seed(seed)
    out, next_seq = [], 0
    for _ in range(n_batches):
        lens = torch.randint(1, 9, (5,), generator=g).tolist()
        n = sum(lens)
        acts = torch.rand(n, F, generator=g) * (torch.rand(n, F, generator=g) < 0.1)
        seq = torch.repeat_interleave(torch.arange(next_seq, next_seq + 5), torch.tensor(lens))
        pos = torch.cat([torch.arange(m) for m in lens])
        out.append((acts, seq, pos))
        next_seq += 5
    return out


def _fill(batches):
    s = FeatureStats(F, top_k=K)
    for b in batches:
        s.update(*b)
    return s


def test_matches_dense_reference():
    batches = _batches()
    s = _fill(batches)
    acts = torch.cat([b[0] for b in batches]).double()
    seq = torch.cat([b[1] for b in batches])
    pos = torch.cat([b[2] for b in batches])
    assert s.n_tokens == len(acts)
    torch.testing.assert_close(s.sum, acts.sum(0))
    torch.testing.assert_close(s.sumsq, acts.square().sum(0))
    assert torch.equal(s.fire, (acts > 0).sum(0))
    torch.testing.assert_close(s.max, acts.amax(0).float())
    torch.testing.assert_close(s.var, acts.var(0, unbiased=False))
    # top-k: values, and (sequence, position) of each
    ref = acts.float().topk(K, dim=0)
    for f in range(F):
        n_active = int((acts[:, f] > 0).sum())
        got = s.top_val[f][: min(K, n_active)]
        torch.testing.assert_close(got, ref.values[: len(got), f])
        rows = ref.indices[: len(got), f]
        assert s.top_seq[f][: len(got)].tolist() == seq[rows].tolist()
        assert s.top_pos[f][: len(got)].tolist() == pos[rows].tolist()
        assert (s.top_val[f][len(got) :] == float("-inf")).all()
    # sequence means over the selected tokens of each sequence
    sid, feat, mean = s.sequence_means()
    dense = torch.zeros(int(seq.max()) + 1, F, dtype=torch.float64)
    dense.index_add_(0, seq, acts)
    dense /= torch.bincount(seq)[:, None]
    torch.testing.assert_close(mean.double(), dense[sid, feat], rtol=1e-6, atol=1e-7)
    assert len(sid) == int((dense > 0).sum())
    assert s.seq_tokens == dict(enumerate(torch.bincount(seq).tolist()))


def test_shards_merge_to_the_one_shot_result(tmp_path):
    batches = _batches(8, seed=1)
    one = _fill(batches)
    shards = [_fill(batches[:3]), _fill(batches[3:5]), _fill(batches[5:])]
    for i, sh in enumerate(shards):  # through disk, as a resumed run would
        sh.save(tmp_path / f"shard{i}.safetensors", meta={"layer": 3})
    merged = FeatureStats.load(tmp_path / "shard0.safetensors")
    for i in (1, 2):
        merged.merge(FeatureStats.load(tmp_path / f"shard{i}.safetensors"))
    a, b = one.state(), merged.state()
    for key in (
        "sum",
        "sumsq",
        "fire",
        "max",
        "top_val",
        "top_seq",
        "top_pos",
        "n_tokens",
        "seq_token_id",
        "seq_token_count",
    ):
        torch.testing.assert_close(a[key], b[key], msg=key)
    order_a = torch.argsort(a["seq_id"] * F + a["seq_feature"])
    order_b = torch.argsort(b["seq_id"] * F + b["seq_feature"])
    torch.testing.assert_close(a["seq_mean"][order_a], b["seq_mean"][order_b])
    with pytest.raises(ValueError, match="share sequence ids"):
        merged.merge(_fill(batches[:1]))


def test_bad_updates_are_refused():
    s = FeatureStats(F, top_k=K)
    acts, seq, pos = _batches(1)[0]
    s.update(acts, seq, pos)
    with pytest.raises(ValueError, match="already added"):
        s.update(acts, seq, pos)
    with pytest.raises(ValueError, match="expected 50 features"):
        s.update(torch.zeros(2, 3), torch.tensor([90, 91]), torch.tensor([0, 0]))


def test_residual_stats_merge_and_norms():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g) * 3
    whole = ResidualStats(16)
    whole.update(x)
    parts = ResidualStats(16)
    parts.update(x[:100])
    other = ResidualStats(16)
    other.update(x[100:])
    parts.merge(other)
    torch.testing.assert_close(parts.mean, x.double().mean(0))
    torch.testing.assert_close(parts.sumsq, whole.sumsq)
    assert torch.equal(parts.norm_hist, whole.norm_hist)
    median = x.norm(dim=-1).median().item()
    assert median <= parts.norm_quantile(0.5) <= median * 1.2  # histogram bins are 12% wide


def test_sequence_means_are_the_same_through_the_dense_and_the_sparse_path(monkeypatch):
    """Signed codes (ITDA) included: each path gives every (sequence, feature) mean."""
    import emdiff.stats.features as features

    g = torch.Generator().manual_seed(3)
    acts = torch.randn(40, 12, generator=g) * (torch.rand(40, 12, generator=g) < 0.3)
    seq, pos = torch.arange(40) // 7, torch.arange(40) % 7
    results = []
    for limit in (1 << 22, 0):
        monkeypatch.setattr(features, "DENSE_SEQUENCE_SUMS", limit)
        f = FeatureStats(12, top_k=3)
        f.update(acts[:21], seq[:21], pos[:21])
        f.update(acts[21:], seq[21:], pos[21:])
        results.append(f.sequence_means())
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    s, feat, mean = results[0]
    for i in range(len(s)):  # against the definition
        rows = seq == s[i]
        torch.testing.assert_close(mean[i], acts[rows, feat[i]].mean())


def test_top_contexts_and_sequence_means_are_options(tmp_path):
    """top_k=0 and sequences=False skip those parts; the token statistics are unchanged, and
    asking for the skipped part says how to get it."""
    batches = _batches()
    full = _fill(batches)
    lean = FeatureStats(F, top_k=0, sequences=False)
    for b in batches:
        lean.update(*b)
    for name in ("sum", "sumsq", "fire", "max"):
        assert torch.equal(getattr(lean, name), getattr(full, name)), name
    assert lean.top_val.shape == (F, 0) and lean.seq_tokens == full.seq_tokens
    with pytest.raises(ValueError, match=r"without per-sequence means \(StatsConfig"):
        lean.sequence_means()
    back = FeatureStats.load(lean.save(tmp_path / "lean.safetensors"))
    assert (back.top_k, back.sequences, back.n_tokens) == (0, False, full.n_tokens)
    with pytest.raises(ValueError, match="different shapes or options"):
        full.merge(back)
