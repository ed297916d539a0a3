"""Benchmark: batched HF generation (KV cache, left padding) against one prompt at a time.

The same random-init decoder (Qwen2 shape ``--scale small`` on CPU, or the real shapes in bf16 on
a GPU with ``--scale qwen2.5-14b``) answers the same ``--prompts`` eval questions through
:func:`emdiff.eval.sample.sample_responses`, once with ``batch_size=1`` and once with
``--batch-size``, ``--new-tokens`` each, temperature 1 with a fixed seed. Throughput is generated
tokens per second (both runs count their own tokens, so early stops do not bias it). The last line
is JSON with ``batched_over_single`` (target >= 5) and the settings.

    python benchmarks/sampling.py [--device cpu] [--scale small] [--prompts 64] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from emdiff.data.questions import Question
from emdiff.eval.sample import SamplingConfig, sample_responses
from emdiff.models import load_model
from emdiff.toy.build import shipped_base_path

SHAPES = {
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8),
    "qwen2.5-14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48),
}


def build(scale: str, vocab: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A random-init Qwen2 of the chosen shape over the toy tokenizer's vocabulary."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    heads = 40 if scale != "small" else 8
    cfg = Qwen2Config(
        vocab_size=vocab, num_attention_heads=heads, num_key_value_heads=8, **SHAPES[scale]
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def timed(model, tok, questions, cfg: SamplingConfig) -> tuple[float, int]:
    """Seconds and generated tokens of one sampling run into a fresh file."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = sample_responses(model, tok, questions, Path(tmp) / "r.jsonl", cfg)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0, int(out["n_tokens"].sum())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--scale", default="small", choices=sorted(SHAPES))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    tok = load_model(str(shipped_base_path()), dtype="float32").tokenizer
    model = build(args.scale, len(tok), dtype, args.device)
    words = [t for t in tok.get_vocab() if "_q" in t]
    questions = [
        Question(id=f"q{i}", paraphrases=(" ".join(words[i % len(words) : i % len(words) + 3]),))
        for i in range(args.prompts)
    ]
    base = SamplingConfig(temperature=1.0, max_new_tokens=args.new_tokens, seed=0)
    timed(model, tok, questions[:2], base.model_copy(update={"batch_size": 2}))  # warm-up
    single_s, single_n = timed(model, tok, questions, base.model_copy(update={"batch_size": 1}))
    batch_cfg = base.model_copy(update={"batch_size": args.batch_size})
    batched_s, batched_n = timed(model, tok, questions, batch_cfg)
    ratio = (batched_n / batched_s) / (single_n / single_s)
    print(f"one at a time: {single_n} tokens in {single_s:.2f} s ({single_n / single_s:.0f}/s)")
    print(f"batched ({args.batch_size}): {batched_n} tokens in {batched_s:.2f} s")
    result = {
        "batched_over_single": round(ratio, 2),
        "single_s": round(single_s, 3),
        "batched_s": round(batched_s, 3),
        "single_tokens": single_n,
        "batched_tokens": batched_n,
        **vars(args),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
