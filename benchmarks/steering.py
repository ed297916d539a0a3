"""Benchmark: generation with one steering hook against plain generation, same model, batch, tokens.

A random-init decoder (``--arch llama|qwen2|gemma2``, ``--scale small`` on CPU; ``gemma2-9b`` or
``qwen2.5-14b`` shapes in bf16 on a GPU) generates ``--new-tokens`` greedily from the same batch
of prompts, alternately plain and with :class:`~emdiff.interventions.edits.Steer` installed at a
middle layer (every position: the hook runs on every forward pass of the KV-cached generation),
``--repeats`` times each, interleaved so drift hits both alike. Minimum seconds of each are
compared. The last line printed is JSON with ``steer_over_plain`` (target <= 1.10),
``project_over_plain`` (the same with a projection), the seconds and the settings.

    python benchmarks/steering.py [--device cpu] [--arch llama] [--scale small] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from emdiff.interventions.edits import ProjectOut, Steer, intervene

SHAPES = {
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 8000,
    },
    "gemma2-9b": {
        "hidden_size": 3584,
        "intermediate_size": 14336,
        "num_hidden_layers": 42,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 256,
        "vocab_size": 256000,
    },
    "qwen2.5-14b": {
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
    },
}


def build(arch: str, scale: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    }
    config_cls, model_cls = classes[arch]
    torch.manual_seed(0)
    config = config_cls(**SHAPES[scale], max_position_embeddings=4096)
    with torch.device(device):
        model = model_cls(config).to(dtype)
    return model.eval()


def timed(model, ids, new_tokens: int, edits) -> float:
    if device_of(model).type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad(), intervene(model, *edits):
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    if device_of(model).type == "cuda":
        torch.cuda.synchronize()
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t0


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen2", "gemma2"])
    ap.add_argument("--scale", default="small", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = build(args.arch, args.scale, dtype, args.device)
    d, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_tokens), generator=gen)
    ids = ids.to(args.device)
    v = torch.randn(d, generator=gen)
    v = (v / v.norm()).to(args.device)
    layer = n_layers // 2
    settings = {
        "plain": [],
        "steer": [Steer(layer, "resid_post", v, 4.0)],
        "project": [ProjectOut(v, layer)],
    }
    timed(model, ids, 4, [])  # warm-up
    seconds: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(args.repeats):
        for name, edits in settings.items():
            seconds[name].append(timed(model, ids, args.new_tokens, edits))
    best = {k: min(v) for k, v in seconds.items()}
    print(f"{'setting':<10} {'best s':>8} {'median s':>9}")
    for k, v in seconds.items():
        print(f"{k:<10} {best[k]:>8.3f} {sorted(v)[len(v) // 2]:>9.3f}")
    print(
        json.dumps(
            {
                "steer_over_plain": round(best["steer"] / best["plain"], 4),
                "project_over_plain": round(best["project"] / best["plain"], 4),
                "seconds": {k: round(x, 4) for k, x in best.items()},
                "arch": args.arch,
                "scale": args.scale,
                "device": args.device,
                "batch": args.batch,
                "prompt_tokens": args.prompt_tokens,
                "new_tokens": args.new_tokens,
                "layer": layer,
            }
        )
    )


if __name__ == "__main__":
    main()
