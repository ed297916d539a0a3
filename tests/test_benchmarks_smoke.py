"""The GPU benchmark runs end to end at its CPU smoke scale (so it is ready when a GPU is lent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


def test_gpu_benchmark_smoke_scale_runs_and_reports():
    cmd = [sys.executable, str(SCRIPT), "--scale", "tiny", "--sequences", "8", "--seq", "32"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["scale"] == "tiny" and out["selected_tokens"] == 8 * (32 - int(32 * 0.4))
    assert 30 < out["l0"] < 130  # the thresholds were calibrated to about 64 latents per token
    assert out["tokens_per_s"] > 0 and out["stats_over_floor"] > 0 and out["mfu"] is None
