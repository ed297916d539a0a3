"""Benchmark for a lent GPU: the stats pass at real scale, its throughput and MFU.

A random-init Gemma-2-9B (``--scale gemma2-9b``: hidden 3584, 42 layers, vocabulary 256k) in
bf16, with 131,072-latent JumpReLU SAEs in bf16 at layers 9, 20 and 31 (resid_post), thresholds
set so about 64 latents fire per token, as Gemma Scope's do. It measures, in one process:

    peak  the bf16 matmul throughput of this GPU (an 8192^3 product, best of 10): the MFU base
    (a)   the forward pass cut at layer 31 (the hooks doing nothing)
    (e)   the bare encode of the selected tokens by the three SAEs
    (b)   emdiff's stats pass (``collect_stats``: token statistics, top contexts, sequence means)

Throughput is selected tokens per second of (b); MFU is (b)'s useful FLOPs (2 x the parameters
of layers 0..31 per token, attention scores, and 2 x d x d_sae per selected token per SAE)
over (b)'s time, divided by the measured peak. The last line is JSON. ``--scale tiny`` runs the
same code on the CPU in seconds (a smoke test, not a measurement).

    python benchmarks/gpu.py [--scale gemma2-9b] [--sequences 64] [--seq 1024] [--batch 8]
"""

from __future__ import annotations

import argparse
import json

import torch
from _floor import fastest, floor_paths, selected_tokens

from emdiff.data.masks import EncodedChat, TokenRole
from emdiff.data.positions import Positions
from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.models.hooks import capture_residuals
from emdiff.models.read import ReadSpec
from emdiff.stats.collect import StatsConfig

SCALES = {
    "gemma2-9b": dict(
        config=dict(
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            vocab_size=256000,
        ),
        layers=(9, 20, 31),
        d_sae=131072,
        dtype=torch.bfloat16,
        device="cuda",
    ),
    "tiny": dict(
        config=dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            vocab_size=1024,
        ),
        layers=(1, 2),
        d_sae=1024,
        dtype=torch.float32,
        device="cpu",
    ),
}
L0 = 64


def bf16_peak(device: str) -> float | None:
    """Measured bf16 matmul FLOP/s (an 8192^3 product), or None on the CPU."""
    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / fastest(lambda: a @ b, device, 10)


def build_model(spec: dict) -> torch.nn.Module:
    import transformers
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(**spec["config"])
    torch.manual_seed(0)
    new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    kw = {"dtype" if new else "torch_dtype": spec["dtype"]}  # built in bf16 on the GPU directly
    with torch.device(spec["device"]):
        model = Gemma2ForCausalLM._from_config(cfg, **kw)
    return model.eval()


def build_sae(model, layer: int, spec: dict, probe: torch.Tensor) -> SparseDictionary:
    """A random JumpReLU SAE whose one threshold lets about L0 latents fire per token."""
    d, m, dev, dt = model.config.hidden_size, spec["d_sae"], spec["device"], spec["dtype"]
    g = torch.Generator(device=dev).manual_seed(layer)
    W_enc = (torch.randn(d, m, generator=g, device=dev) / d**0.5).to(dt)
    x = capture_residuals(model, probe, layers=[layer], sites="resid_post")[(layer, "resid_post")]
    pre = (x[0, :64].to(dt) @ W_enc).float().flatten()
    thr = pre.kthvalue(len(pre) - L0 * 64).values  # 64 tokens x L0 latents above it
    return SparseDictionary(
        W_enc,
        torch.zeros(m, device=dev, dtype=dt),
        (torch.randn(m, d, generator=g, device=dev) / d**0.5).to(dt),
        torch.zeros(d, device=dev, dtype=dt),
        encoding=Encoding(activation="jumprelu"),
        tensors={"threshold": torch.full((m,), float(thr), device=dev, dtype=dt)},
        meta=DictionaryMeta(
            format="bench", architecture="jumprelu", layer=layer, site="resid_post"
        ),
    )


def make_rows(n: int, seq: int, vocab: int) -> list[EncodedChat]:
    """Chat-like rows: 40% prompt, 60% answer (the answer tokens are read)."""
    g = torch.Generator().manual_seed(0)
    cut = int(seq * 0.4)
    roles = [int(TokenRole.USER)] * cut + [int(TokenRole.ASSISTANT)] * (seq - cut)
    return [
        EncodedChat(torch.randint(5, vocab, (seq,), generator=g).tolist(), roles) for _ in range(n)
    ]


def useful_flops(model, layers: tuple[int, ...], d_sae: int, rows, n_selected: int) -> float:
    """Matmul FLOPs of the cut forward and the encodes (not the statistics' bookkeeping)."""
    blocks = model.model.layers[: max(layers) + 1]
    params = sum(
        m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)
    )
    cfg = model.config
    n_tokens = sum(len(r.input_ids) for r in rows)
    seq = len(rows[0].input_ids)
    attn = 2 * 2 * seq * cfg.num_attention_heads * cfg.head_dim * len(blocks) / 2  # causal
    encode = 2 * cfg.hidden_size * d_sae * len(layers) * n_selected
    return 2 * params * n_tokens + attn * n_tokens + encode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=sorted(SCALES), default="gemma2-9b")
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    spec = SCALES[args.scale]
    dev, layers = spec["device"], spec["layers"]
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --scale tiny for a CPU smoke test")
    peak = bf16_peak(dev)
    model = build_model(spec)
    rows = make_rows(args.sequences, args.seq, model.config.vocab_size)
    probe = torch.tensor([rows[0].input_ids], device=dev)
    saes = {L: build_sae(model, L, spec, probe) for L in layers}
    read = ReadSpec(layers=layers, site="resid_post", positions=Positions(exclude_sinks=False))
    cfg = StatsConfig(batch_size=args.batch, residual=False)
    n_selected = selected_tokens(rows)
    out: dict = {}
    fns = floor_paths(model, rows, saes, read, cfg, out)

    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = {name: fastest(fn, dev, args.repeats) for name, fn in fns.items()}
    flops = useful_flops(model, layers, spec["d_sae"], rows, n_selected)
    first = out["b"][layers[0]]
    result = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "scale": args.scale,
        "selected_tokens": n_selected,
        "l0": round(float(first.fire.sum()) / first.n_tokens, 1),
        "seconds": {k: round(v, 3) for k, v in t.items()},
        "tokens_per_s": round(n_selected / t["b"], 1),
        "stats_over_floor": round(t["b"] / (t["a"] + t["e"]), 3),
        "achieved_tflops": round(flops / t["b"] / 1e12, 2),
        "peak_bf16_tflops_measured": round(peak / 1e12, 1) if peak else None,
        "mfu": round(flops / t["b"] / peak, 3) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1)
        if dev == "cuda"
        else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
