"""Benchmark: emdiff's TopK SAE trainer against SAELens's trainer, same data, same settings.

Both train a TopK SAE (``--d-in`` 256, ``--width`` 4096, ``--k`` 32, batch ``--batch`` 1024,
``--steps`` steps, fp32, Adam at one constant learning rate, AuxK on, gradient clipping at 1) on
the same activations, each token seen once, in one process. SAELens runs twice: its default
(dense codes) and with ``use_sparse_activations=True`` (its sparse decode). The activations are a
planted sparse code: ``--features`` unit directions, ``--active`` of them on per token with
random magnitudes, plus noise and an offset, so a good trainer reaches a low FVU.

Throughput is training tokens per second of the whole ``fit`` call (data feed, steps, logging).
FVU is measured on held-out tokens with each SAE's own forward pass, so a trainer that is faster
but worse shows. The last line is JSON with ``emdiff_over_saelens_tokens_per_s`` (against the
faster SAELens setting that runs; target >= 1.5) and every figure behind it. Needs the ``bench`` extra.

    python benchmarks/sae_train.py [--steps 300] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from emdiff.dictionaries.activations import TensorSource
from emdiff.dictionaries.sae import SAEConfig, TrainableSAE
from emdiff.dictionaries.train import fit


def planted(args, n: int, seed: int) -> torch.Tensor:
    """``n`` tokens: sums of ``args.active`` of ``args.features`` unit directions, plus noise."""
    g = torch.Generator().manual_seed(0)
    D = torch.randn(args.features, args.d_in, generator=g)
    D /= D.norm(dim=-1, keepdim=True)
    offset = torch.randn(args.d_in, generator=g)
    g.manual_seed(seed)
    idx = torch.randint(0, args.features, (n, args.active), generator=g)
    mag = 0.5 + torch.rand(n, args.active, generator=g)
    x = torch.nn.functional.embedding_bag(idx, D, per_sample_weights=mag, mode="sum")
    return x + offset + 0.05 * torch.randn(n, args.d_in, generator=g)


def fvu(recon: torch.Tensor, x: torch.Tensor) -> float:
    return float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def run_emdiff(args, data: torch.Tensor, held: torch.Tensor, steps: int) -> dict:
    cfg = SAEConfig(
        architecture="topk",
        d_sae=args.width,
        k=args.k,
        batch_size=args.batch,
        steps=steps,
        lr=args.lr,
        warmup_steps=0,
        decay_fraction=0.0,
        aux_coef=1.0,
        dead_tokens=args.dead_window * args.batch,
        log_every=max(steps // 4, 1),
        checkpoint_every=10**9,
    )
    sae = TrainableSAE(args.d_in, cfg).to(args.device)
    t = time.perf_counter()
    fit(sae, TensorSource(data), cfg, progress=False)
    seconds = time.perf_counter() - t
    with torch.no_grad():
        recon = sae.to_dictionary()(held)
    return {"seconds": seconds, "fvu": fvu(recon, held)}


def run_saelens(args, data: torch.Tensor, held: torch.Tensor, steps: int, sparse: bool) -> dict:
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=args.d_in,
            d_sae=args.width,
            k=args.k,
            dtype="float32",
            device=args.device,
            use_sparse_activations=sparse,
        )
    )
    with torch.no_grad():  # as SAELens's runner does with b_dec_init_method="mean"
        sae.b_dec.copy_(data[:8192].mean(0))
    tcfg = SAETrainerConfig(
        total_training_samples=steps * args.batch,
        train_batch_size_samples=args.batch,
        lr=args.lr,
        lr_end=args.lr,
        device=args.device,
        dead_feature_window=args.dead_window,
    )
    g = torch.Generator().manual_seed(0)
    order = data[torch.randperm(len(data), generator=g)]
    batches = iter(order.split(args.batch))
    trainer = SAETrainer(tcfg, sae, data_provider=batches)
    t = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - t
    with torch.no_grad():
        sae.eval()
        recon = sae(held.to(args.device))
    return {"seconds": seconds, "fvu": fvu(recon, held)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--active", type=int, default=16)
    ap.add_argument("--dead-window", type=int, default=100, help="steps without firing = dead")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    data = planted(args, args.steps * args.batch, seed=1)
    held = planted(args, 8192, seed=2)
    warm = data[: 5 * args.batch]
    runners = {
        "emdiff": lambda d, n: run_emdiff(args, d, held, n),
        "saelens": lambda d, n: run_saelens(args, d, held, n, sparse=False),
        "saelens_sparse": lambda d, n: run_saelens(args, d, held, n, sparse=True),
    }
    failed = {}
    for name, run in list(runners.items()):  # warm-up: lazy imports, allocator, kernels
        try:
            run(warm, 5)
        except (NotImplementedError, RuntimeError) as e:  # a SAELens setting this build lacks
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            print(f"{name}: fails here, left out ({failed[name]})")
            del runners[name]
    res = {name: run(data, args.steps) for name, run in runners.items()}
    tokens = args.steps * args.batch
    for name, r in res.items():
        r["tokens_per_s"] = round(tokens / r["seconds"], 1)
        print(
            f"{name:<15} {r['tokens_per_s']:>9.0f} tok/s {r['seconds']:7.1f} s  FVU {r['fvu']:.4f}"
        )
    best = max(r["tokens_per_s"] for name, r in res.items() if name.startswith("saelens"))
    out = {
        "device": args.device,
        "threads": torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k != "device"},
        "emdiff_over_saelens_tokens_per_s": round(res["emdiff"]["tokens_per_s"] / best, 3),
        "emdiff_over_saelens_dense_tokens_per_s": round(
            res["emdiff"]["tokens_per_s"] / res["saelens"]["tokens_per_s"], 3
        ),
        "fvu_gap_vs_saelens": round(res["emdiff"]["fvu"] - res["saelens"]["fvu"], 4),
        "runs": {k: {m: round(v, 4) for m, v in r.items()} for k, r in res.items()},
        "failed": failed,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
