"""Statistics split across processes (gloo on CPU, as under ``torchrun``) equal one process's:
exact token and firing counts, maxima and top activations; means within 1e-6; and the sharded,
resumable ``run_stats`` folder merges to the same numbers."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CHAT_WORDS as WORDS
from safetensors.torch import load_file, save_file

from emdiff.data.masks import encode_chat
from emdiff.data.positions import Positions
from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.models import load_model
from emdiff.models.read import ReadSpec
from emdiff.stats.collect import StatsConfig, collect_stats
from emdiff.stats.distributed import batch_shard, collect_stats_sharded
from emdiff.stats.run import run_stats


def _setup(model_dir: str):
    lm = load_model(model_dir, dtype="float32")
    g = torch.Generator().manual_seed(1)
    d = lm.model.config.hidden_size
    sae = SparseDictionary(
        torch.randn(d, 40, generator=g) / d**0.5,
        torch.zeros(40),
        torch.randn(40, d, generator=g) / d**0.5,
        torch.zeros(d),
        meta=DictionaryMeta(format="saelens", architecture="topk", layer=1, site="resid_post"),
        encoding=Encoding(activation="topk", k=6),
    )
    rows = []
    for i in range(23):  # not a multiple of the batch size or of the ranks
        q = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 4))
        a = " ".join(WORDS[(2 * i + j) % len(WORDS)] for j in range(2 + i % 5))
        msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append(encode_chat(lm.tokenizer, msgs))
    read = ReadSpec(layers=(1,), site="resid_post", positions=Positions.parse("answer"))
    return lm.model, rows, {1: sae}, read


def _worker(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, rows, dicts, read = _setup(model_dir)
        cfg = StatsConfig(batch_size=4, shard_size=5)
        feats, resid = collect_stats_sharded(model, rows, dicts, read, cfg)
        state = {f"f.{k}": v.contiguous() for k, v in feats[1].state().items()}
        state |= {f"r.{k}": v.contiguous() for k, v in resid[1].state().items()}
        save_file(state, str(Path(out) / f"memory_rank{rank}.safetensors"))
        disk, _ = run_stats(model, rows, dicts, read, Path(out) / "run", cfg)
        state = {k: v.contiguous() for k, v in disk[1].state().items()}
        save_file(state, str(Path(out) / f"disk_rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _same(got: dict, want: dict, prefix: str = "") -> None:
    for key in ("n_tokens", "fire", "max", "top_val", "seq_id", "seq_feature", "seq_token_id"):
        assert torch.equal(got[prefix + key], want[key]), key
    for key in ("sum", "sumsq", "seq_mean"):
        torch.testing.assert_close(got[prefix + key], want[key], rtol=1e-6, atol=1e-9)


def test_batch_shards_cover_the_rows_once():
    for n, bs, world in ((23, 4, 2), (23, 4, 3), (5, 4, 4), (0, 4, 2)):
        parts = [batch_shard(n, bs, r, world) for r in range(world)]
        covered = [i for s in parts for i in range(n)[s]]
        assert covered == list(range(n))
        assert all(s.start % bs == 0 for s in parts if s.start < n)


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ranks_give_the_statistics_of_one_process(world, tiny_model_dirs, tmp_path):
    model_dir = str(tiny_model_dirs["qwen2"])
    mp.spawn(_worker, args=(world, _free_port(), model_dir, str(tmp_path)), nprocs=world)
    model, rows, dicts, read = _setup(model_dir)
    cfg = StatsConfig(batch_size=4, shard_size=5)
    feats, resid = collect_stats(model, rows, dicts, read, cfg)
    want = feats[1].state()
    for rank in range(world):  # every rank holds the whole statistics
        got = load_file(str(tmp_path / f"memory_rank{rank}.safetensors"))
        _same(got, want, "f.")
        torch.testing.assert_close(got["r.sum"], resid[1].state()["sum"], rtol=1e-6, atol=1e-9)
        assert torch.equal(got["r.norm_hist"], resid[1].state()["norm_hist"])
    single, _ = run_stats(model, rows, dicts, read, tmp_path / "single", cfg)
    for rank in range(world):
        got = load_file(str(tmp_path / f"disk_rank{rank}.safetensors"))
        _same(got, single[1].state())
    assert len(list((tmp_path / "run" / "shards").glob("*/done"))) == 5  # 23 rows / 5 per shard
