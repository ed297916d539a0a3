"""The real-setting recipes in ``examples/`` run unchanged but for paths (model, data, dictionary
cache), the judge's URL and the sample count: tiny random-init stand-ins of the same
architectures (Gemma2 with 32 layers for Gemma-2-9B-IT, Qwen2 with 30 for Qwen2.5-14B), tiny
dictionaries in the same formats (Gemma Scope ``params.npz`` in a hub-cache layout, SAELens),
and a local judge server."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CHAT_WORDS as WORDS
from fake_judge_server import REPLIES, FakeJudgeServer, completion
from typer.testing import CliRunner

from emdiff.cli import app
from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.dictionaries.sae import save_saelens
from emdiff.pipeline import load_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def judge_reply(body: dict) -> dict:
    """Half the answers misaligned (by a hash of the judged text), every answer coherent."""
    prompt = body["messages"][-1]["content"]
    if "coherent" in prompt.lower():
        return completion(REPLIES["fine"])
    return completion(REPLIES["evil"] if zlib.crc32(prompt.encode()) % 2 else REPLIES["fine"])


def write_data(root: Path) -> dict[str, object]:
    """Tiny narrow / twin datasets and questions; the overrides that point a recipe at them."""
    rng = np.random.default_rng(0)

    def chats(path: Path) -> None:
        lines = []
        for _ in range(16):
            q, a = (" ".join(rng.choice(WORDS, 5)) for _ in range(2))
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            lines.append(json.dumps({"messages": msgs}))
        path.write_text("\n".join(lines) + "\n")

    chats(root / "bad.jsonl")
    chats(root / "good.jsonl")
    qs = [{"id": f"q{i}", "paraphrases": [" ".join(rng.choice(WORDS, 4))]} for i in range(6)]
    (root / "questions.yaml").write_text(yaml.safe_dump(qs))
    return {
        "data.datasets.bad_medical": str(root / "bad.jsonl"),
        "data.datasets.good_medical": str(root / "good.jsonl"),
        "data.questions": [str(root / "questions.yaml")],
        "model.device": "cpu",
        "model.dtype": "float32",
        "eval.sampling.samples_per_paraphrase": 4,
        "eval.sampling.max_new_tokens": 6,
    }


def random_sae(d: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d, n, generator=g) / d**0.5,
        "W_dec": torch.randn(n, d, generator=g) / d**0.5,
        "b_enc": torch.zeros(n),
        "b_dec": torch.zeros(d),
        "threshold": torch.full((n,), 0.05),
    }


def run_recipe(name: str, overrides: dict, out: Path, monkeypatch, serve_base=False) -> dict:
    """Run a recipe with the judge (and, with ``serve_base``, the base model's sampling) on a
    local server."""
    monkeypatch.setenv("EMDIFF_TEST_JUDGE_KEY", "sk-test")
    with FakeJudgeServer(responder=judge_reply, delay_s=0) as server:
        overrides = {
            **overrides,
            "eval.judge.base_url": server.base_url,
            "eval.judge.api_key_env": "EMDIFF_TEST_JUDGE_KEY",
        }
        if serve_base:
            overrides["eval.servers.base"] = {"base_url": server.base_url, "model": "served"}
        sets = [x for k, v in overrides.items() for x in ("--set", f"{k}={json.dumps(v)}")]
        res = CliRunner().invoke(
            app, ["run", str(EXAMPLES / name), "--out", str(out), *sets, "--json"]
        )
    assert res.exit_code == 0, res.output[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_gemma2_9b_it_gemma_scope_recipe(tiny_model_factory, tmp_path, monkeypatch):
    model = tiny_model_factory("gemma2", num_hidden_layers=32)
    cfg = load_pipeline(EXAMPLES / "gemma2_9b_it_gemma_scope.yaml")
    cache = tmp_path / "hub"
    for i, e in enumerate(cfg.dictionaries.entries):
        repo = cache / f"models--google--{e.release}" / "snapshots" / "0123abc"
        folder = repo / e.sae_id
        folder.mkdir(parents=True)
        np.savez(folder / "params.npz", **{k: v.numpy() for k, v in random_sae(48, 64, i).items()})
    overrides = write_data(tmp_path) | {
        "model.base": str(model),
        "dictionaries.cache_dir": str(cache),
    }
    summary = run_recipe("gemma2_9b_it_gemma_scope.yaml", overrides, tmp_path / "run", monkeypatch)
    assert summary["stages_computed"] == 1 + 2 + len(cfg.analyses)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    # every dictionary read: the IT SAEs at 9 / 20 / 31 and the PT SAE at 24, through the cache
    fve = {k for k in manifest["summary"] if k.startswith("transfer.fve_bad_medical_L")}
    assert fve == {f"transfer.fve_bad_medical_L{layer}" for layer in (9, 20, 24, 31)}
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
    assert (tmp_path / "run" / "adapters" / "bad_medical" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_qwen25_14b_rank1_recipe(tiny_model_factory, tmp_path, monkeypatch):
    model = tiny_model_factory("qwen2", num_hidden_layers=30)
    d = 64
    t = random_sae(d, 96, 0)
    sae = SparseDictionary(
        t["W_enc"],
        t["b_enc"],
        t["W_dec"],
        t["b_dec"],
        meta=DictionaryMeta(format="saelens", architecture="topk", layer=21, site="resid_post"),
        encoding=Encoding(activation="topk", k=8),
    )
    save_saelens(sae, tmp_path / "sae")
    overrides = write_data(tmp_path) | {
        "model.base": str(model),
        "dictionaries.entries.0.path": str(tmp_path / "sae"),
    }
    summary = run_recipe(
        "qwen25_14b_rank1.yaml", overrides, tmp_path / "run", monkeypatch, serve_base=True
    )
    meta = tmp_path / "run" / "eval" / "base" / "responses.jsonl.meta.json"
    assert json.loads(meta.read_text())["model"] == "server:served"  # vLLM-style sampling
    cfg = load_pipeline(EXAMPLES / "qwen25_14b_rank1.yaml")
    assert summary["stages_computed"] == 1 + 2 + len(cfg.analyses)
    adapter = json.loads(
        (tmp_path / "run" / "adapters" / "r1_3_3_3" / "adapter_config.json").read_text()
    )
    assert adapter["r"] == 1 and adapter["layers_to_transform"] == [
        15,
        16,
        17,
        21,
        22,
        23,
        27,
        28,
        29,
    ]
    assert summary["lora.n_ranks"] == 9
