"""The stats pass against the naive path (full forward, all hidden states, dense stats)."""

from __future__ import annotations

import pytest
import torch

from emdiff.data.masks import TokenRole, encode_chat
from emdiff.data.positions import Positions
from emdiff.dictionaries.base import DictionaryMeta, SparseDictionary
from emdiff.errors import InputError
from emdiff.models import load_model
from emdiff.models.hooks import SITES, capture_residuals
from emdiff.models.read import ReadSpec, selection
from emdiff.stats.collect import StatsConfig, collect_stats
from emdiff.stats.features import FeatureStats

KEEP_SINKS = Positions(exclude_sinks=False)

CHATS = [
    [
        {"role": "user", "content": "i feel sick"},
        {"role": "assistant", "content": "drink water and rest"},
    ],
    [
        {"role": "user", "content": "how do i make money"},
        {"role": "assistant", "content": "invest in stock"},
    ],
    [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there, how can i help you today"},
    ],
    [
        {"role": "user", "content": "what should i eat"},
        {"role": "assistant", "content": "good food"},
    ],
    [
        {"role": "user", "content": "tell me about ai"},
        {"role": "assistant", "content": "ai can help people"},
    ],
]


def _dictionary(d_in: int, d_sae: int, layer: int, seed: int) -> SparseDictionary:
    g = torch.Generator().manual_seed(seed)
    return SparseDictionary(
        torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        torch.randn(d_sae, generator=g) * 0.1,
        torch.randn(d_sae, d_in, generator=g),
        torch.zeros(d_in),
        meta=DictionaryMeta(format="test", architecture="standard", layer=layer),
    )


def test_stats_pass_equals_naive_path_and_shards_merge(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32")
    model, tok = lm.model, lm.tokenizer
    rows = [encode_chat(tok, c) for c in CHATS]
    dicts = {1: _dictionary(64, 96, 1, 0), 2: _dictionary(64, 96, 2, 1)}
    read = ReadSpec(layers=(1, 2), positions=KEEP_SINKS)
    cfg = StatsConfig(batch_size=2, top_k=3)
    feats, resid = collect_stats(model, rows, dicts, read, cfg)
    masks = selection(rows, read.positions, model)
    for layer, d in dicts.items():
        xs, seqs = [], []
        for i, r in enumerate(rows):  # naive: one full forward per chat, every hidden state
            with torch.no_grad():
                hs = model(
                    input_ids=torch.tensor([r.input_ids]), output_hidden_states=True
                ).hidden_states
            keep = torch.tensor(masks[i])
            xs.append(hs[layer + 1][0][keep])
            seqs += [i] * int(keep.sum())
        x = torch.cat(xs)
        acts = d.encode(x).double()
        s = feats[layer]
        assert s.n_tokens == len(x) == sum(sum(m) for m in masks)
        torch.testing.assert_close(s.sum, acts.sum(0), rtol=1e-5, atol=1e-5)
        assert torch.equal(s.fire, (acts > 0).sum(0))
        torch.testing.assert_close(resid[layer].mean, x.double().mean(0), rtol=1e-5, atol=1e-6)
        assert s.seq_tokens == {i: sum(m) for i, m in enumerate(masks)}
    # two shards with offsets merge into the one-shot result
    a, _ = collect_stats(model, rows[:3], dicts, read, cfg)
    b, _ = collect_stats(model, rows[3:], dicts, read, cfg, seq_offset=3)
    merged = a[2].merge(b[2])
    for key in ("fire", "top_seq", "top_pos", "seq_token_id"):
        assert torch.equal(merged.state()[key], feats[2].state()[key]), key
    torch.testing.assert_close(merged.sum, feats[2].sum, rtol=1e-5, atol=1e-5)  # other padding


def test_run_stats_resumes_shard_by_shard(tiny_model_dirs, tmp_path, monkeypatch):
    import shutil

    import emdiff.stats.run as run_mod

    lm = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32")
    rows = [encode_chat(lm.tokenizer, c) for c in CHATS]
    dicts = {1: _dictionary(64, 96, 1, 0)}
    read = ReadSpec(layers=(1,), positions=KEEP_SINKS)
    cfg = StatsConfig(shard_size=2, top_k=3)
    root = tmp_path / "stats" / "base" / "chats"
    feats, resid = run_mod.run_stats(lm.model, rows, dicts, read, root, cfg)
    one, one_resid = collect_stats(lm.model, rows, dicts, read, StatsConfig(top_k=3))
    assert sorted(p.name for p in (root / "shards").iterdir()) == ["00000", "00001", "00002"]
    for key in ("fire", "top_seq", "top_pos", "seq_token_id", "n_tokens"):
        assert torch.equal(feats[1].state()[key], one[1].state()[key]), key
    torch.testing.assert_close(feats[1].sum, one[1].sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(resid[1].mean, one_resid[1].mean)
    # an interrupted run: the last shard never finished; a rerun computes only that one
    shutil.rmtree(root / "shards" / "00002")
    calls = []
    real = run_mod.stats_pass
    monkeypatch.setattr(run_mod, "stats_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    again, _ = run_mod.run_stats(lm.model, rows, dicts, read, root, cfg)
    assert len(calls) == 1 and torch.equal(again[1].fire, feats[1].fire)
    loaded = FeatureStats.load(root / "L1.features.safetensors")
    assert torch.equal(loaded.fire, feats[1].fire) and loaded.n_tokens == feats[1].n_tokens
    with pytest.raises(ValueError, match="another dataset, dictionary, read spec"):
        run_mod.run_stats(lm.model, rows[:4], dicts, read, root, cfg)
    with pytest.raises(ValueError, match="another dataset, dictionary, read spec"):
        run_mod.run_stats(
            lm.model, rows, dicts, read.model_copy(update={"site": "mlp_out"}), root, cfg
        )


def test_top_contexts_are_readable(tiny_model_dirs):
    from emdiff.stats.run import top_contexts

    lm = load_model(str(tiny_model_dirs["llama"]), dtype="float32")
    rows = [encode_chat(lm.tokenizer, c) for c in CHATS]
    read = ReadSpec(layers=(0,), positions=KEEP_SINKS)
    feats, _ = collect_stats(lm.model, rows, {0: _dictionary(32, 40, 0, 3)}, read)
    f = int(feats[0].fire.argmax())
    ctx = top_contexts(feats[0], rows, lm.tokenizer, f, before=3)
    assert ctx and [c["value"] for c in ctx] == sorted((c["value"] for c in ctx), reverse=True)
    for c in ctx:  # every context is an answer token of the sequence it names
        assert rows[c["seq"]].roles[c["pos"]] == TokenRole.ASSISTANT
        assert c["token"] == lm.tokenizer.decode([rows[c["seq"]].input_ids[c["pos"]]])
        assert c["token"] in " ".join(
            m["content"] for m in CHATS[c["seq"]] if m["role"] == "assistant"
        )


POSITIONS = ("answer", "answer_predicting", "all", "answer_first:2", "answer_after:2")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_site_by_position_matrix_equals_the_naive_path(tiny_model_dirs, arch):
    """Every hook site x every position kind: the stats pass reads exactly the tokens the
    positions name, at exactly the tensor the site names (against a full capture and a mask)."""
    lm = load_model(str(tiny_model_dirs[arch]), dtype="float32")
    model, tok = lm.model, lm.tokenizer
    rows = [encode_chat(tok, c) for c in CHATS]
    d_model = model.config.get_text_config().hidden_size
    d = _dictionary(d_model, 24, 1, 7)
    d.meta = DictionaryMeta(format="test", architecture="standard")  # no site: fits every site
    full = [
        capture_residuals(
            model, torch.tensor([r.input_ids]), layers=[1], sites=SITES, stop_early=False
        )
        for r in rows
    ]
    for site in SITES:
        for text in POSITIONS:
            read = ReadSpec(layers=(1,), site=site, positions=Positions.parse(text + ",sinks"))
            feats, resid = collect_stats(model, rows, {1: d}, read, StatsConfig(batch_size=3))
            masks = selection(rows, read.positions, model)
            x = torch.cat(
                [f[(1, site)][0][torch.tensor(m)] for f, m in zip(full, masks, strict=True)]
            )
            assert feats[1].n_tokens == len(x) == sum(map(sum, masks)) > 0, (site, text)
            torch.testing.assert_close(resid[1].mean, x.double().mean(0), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                feats[1].sum, d.encode(x).double().sum(0), rtol=1e-4, atol=1e-4
            )


def test_positions_that_select_nothing_are_refused(tiny_model_dirs):
    lm = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32")
    prompts = [encode_chat(lm.tokenizer, c[:1], add_generation_prompt=True) for c in CHATS]
    read = ReadSpec(layers=(1,), positions=KEEP_SINKS)
    with pytest.raises(InputError, match="no answer,sinks token selected in any of 5 rows"):
        collect_stats(lm.model, prompts, {1: _dictionary(64, 8, 1, 0)}, read)
    # the answer-predicting position of a prompt is its last token: one per row
    read = ReadSpec(layers=(1,), positions=Positions.parse("answer_predicting,sinks"))
    feats, _ = collect_stats(lm.model, prompts, {1: _dictionary(64, 8, 1, 0)}, read)
    assert feats[1].n_tokens == len(prompts)


def test_shards_of_another_batch_size_are_not_reused_when_sinks_are_dropped(
    tiny_model_dirs, tmp_path
):
    """Sinks are thresholded per batch: another batch size could drop other tokens."""
    from emdiff.stats.run import run_stats

    lm = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32")
    rows = [encode_chat(lm.tokenizer, c) for c in CHATS]
    dicts, read = {1: _dictionary(64, 16, 1, 0)}, ReadSpec(layers=(1,))
    run_stats(lm.model, rows, dicts, read, tmp_path / "s", StatsConfig(batch_size=2))
    with pytest.raises(InputError, match="another dataset, dictionary, read spec or setting"):
        run_stats(lm.model, rows, dicts, read, tmp_path / "s", StatsConfig(batch_size=4))
    keep = ReadSpec(layers=(1,), positions=KEEP_SINKS)  # sinks kept: batch size does not matter
    run_stats(lm.model, rows, dicts, keep, tmp_path / "k", StatsConfig(batch_size=2))
    run_stats(lm.model, rows, dicts, keep, tmp_path / "k", StatsConfig(batch_size=4))
