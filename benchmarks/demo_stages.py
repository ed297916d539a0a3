"""Benchmark: the whole default ``emdiff demo`` on the toy, stage by stage.

Runs the demo with its defaults (or the options given) in a fresh folder, in this process, with
torch limited to ``--threads`` (2, as CI has), and prints the seconds of each stage kind (load,
eval, lora, dictionaries, diffs) and the total against the goal of 300 s and the limit of 600 s.
The last line printed is JSON: ``stage_seconds``, ``total_seconds``, ``within_goal``,
``within_limit``, and the scorecard's pass / fail / missing counts of that run.

    python benchmarks/demo_stages.py [--threads 2] [--seeds 3] [--narrow-domain medical]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from emdiff.demo import DemoConfig, run_demo
from emdiff.toy.scorecard import score

GOAL, LIMIT = 300.0, 600.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=DemoConfig().seeds)
    ap.add_argument("--narrow-domain", default=DemoConfig().narrow_domain)
    ap.add_argument("--out", type=Path, default=None, help="run folder (default: a temp one)")
    ap.add_argument("--cache", action="store_true", help="allow the cross-run cache (warm run)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = DemoConfig(seeds=args.seeds, narrow_domain=args.narrow_domain, cache=args.cache)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "demo"
        t0 = time.perf_counter()
        summary = run_demo(cfg, out, echo=lambda _: None)
        total = time.perf_counter() - t0
    stages = summary["stage_seconds"]
    print(f"{'stage':<14} {'seconds':>8}")
    for k, v in stages.items():
        print(f"{k:<14} {v:>8.1f}")
    print(f"{'total':<14} {total:>8.1f}  (goal {GOAL:.0f}, limit {LIMIT:.0f})")
    print(
        json.dumps(
            {
                "stage_seconds": stages,
                "total_seconds": round(total, 1),
                "within_goal": total <= GOAL,
                "within_limit": total <= LIMIT,
                "threads": args.threads,
                "scorecard": score(summary),
            }
        )
    )


if __name__ == "__main__":
    main()
