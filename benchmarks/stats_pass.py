"""Benchmark: the emdiff stats pass against its floor and against the naive user path.

One run, same model, same batches (CPU by default; ``--device cuda`` on a GPU), at each hook site
of ``--sites`` (default resid_post, mlp_out, resid_mid):

    (a) forward pass cut at the last hook point (same hooks, doing nothing)
    (e) bare dictionary encode of the selected activations
    (b) emdiff stats pass (``collect_stats``): token statistics, top contexts, sequence means
    (t) the same with only the token statistics (``top_k=0, sequence_means=False``)
    (c) naive path (resid_post only): full forward with output_hidden_states, encode every
        position, then mask and accumulate everything (b) does with plain torch ops
    (n) the nnsight path (resid_post only, needs the ``bench`` extra): trace, save the layers'
        outputs, stop, encode them, accumulate the token statistics over the selected tokens

and peak memory of (b) at 1x, 4x and 16x the tokens, each size in a fresh process. Each path's
results are checked against (b) or (t). The last line printed is JSON: stats_over_floor = b / (a +
e) (worst site), naive_over_stats = c / b, nnsight_over_stats = n / t, peak_mem_mb per size;
each ratio compares the paths' fastest repeats (the timings printed are medians).
Targets: stats_over_floor <= 1.05, naive_over_stats >= 3, nnsight_over_stats >= 1.5, memory flat
in tokens.

    python benchmarks/stats_pass.py [--device cpu] [--batches 6] [--repeats 7] [--sites ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from _floor import floor_paths, timed

from emdiff.data.masks import EncodedChat, TokenRole
from emdiff.data.positions import Positions
from emdiff.dictionaries.base import DictionaryMeta, Encoding, SparseDictionary
from emdiff.models.hooks import capture_residuals
from emdiff.models.read import ReadSpec
from emdiff.stats.collect import StatsConfig, collect_stats

LAYERS = (3, 4)  # of 8, as real runs hook middle layers
SEQ, BATCH = 128, 8


def build_model(device: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval().to(device)


def build_dictionary(
    model, layer: int, rows, site: str = "resid_post", expansion: int = 16
) -> SparseDictionary:
    """A random JumpReLU dictionary whose thresholds give about 64 active latents per token."""
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(layer)
    W_enc = torch.randn(d, d * expansion, generator=g) / d**0.5
    b_enc = torch.zeros(d * expansion)
    ids = torch.tensor([rows[0].input_ids], device=next(model.parameters()).device)
    x = capture_residuals(model, ids, layers=[layer], sites=site)[(layer, site)]
    pre = (x[0].cpu() @ W_enc).flatten()
    threshold = torch.full((d * expansion,), float(pre.quantile(1 - 64 / (d * expansion))))
    return SparseDictionary(
        W_enc,
        b_enc,
        torch.randn(d * expansion, d, generator=g) / d**0.5,
        torch.zeros(d),
        encoding=Encoding(activation="jumprelu"),
        tensors={"threshold": threshold},
        meta=DictionaryMeta(format="bench", architecture="jumprelu", layer=layer, site=site),
    ).to(next(model.parameters()).device)


def make_rows(n: int, seed: int = 0) -> list[EncodedChat]:
    """Chat-like rows: a prompt part and an answer part (~60% of tokens selected)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(5, 8192, (SEQ,), generator=g).tolist()
        cut = int(SEQ * 0.4)
        roles = [int(TokenRole.USER)] * cut + [int(TokenRole.ASSISTANT)] * (SEQ - cut)
        rows.append(EncodedChat(ids, roles))
    return rows


@torch.no_grad()
def naive(model, rows, dicts, device: str, top_k: int = 16) -> dict[int, dict[str, torch.Tensor]]:
    """What a user writes by hand: all hidden states, encode everything, mask, accumulate."""
    out = {L: {"sum": 0, "fire": 0, "max": None, "top": None, "seq_means": []} for L in dicts}
    for s in range(0, len(rows), BATCH):
        chunk = rows[s : s + BATCH]
        ids = torch.tensor([r.input_ids for r in chunk], device=device)
        mask = torch.tensor([r.mask() for r in chunk], device=device)
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        for L, d in dicts.items():
            acts = d.encode(hs[L + 1])  # every position
            acts = acts * mask[..., None]
            o = out[L]
            flat = acts[mask]
            o["sum"] = o["sum"] + flat.double().sum(0)
            o["sumsq"] = o.get("sumsq", 0) + flat.double().square().sum(0)
            o["fire"] = o["fire"] + (flat > 0).sum(0)
            m = flat.amax(0)
            o["max"] = m if o["max"] is None else torch.maximum(o["max"], m)
            o["seq_means"].append((acts.sum(1) / mask.sum(1, keepdim=True)).cpu())
            top = flat.topk(min(top_k, len(flat)), dim=0).values
            o["top"] = top if o["top"] is None else torch.cat([o["top"], top]).topk(top_k, 0).values
    return out


@torch.no_grad()
def nnsight_path(model, rows, dicts, device: str) -> dict[int, dict[str, torch.Tensor]]:
    """What an nnsight user writes: trace, save the layers' outputs, stop, encode, accumulate."""
    from nnsight import NNsight

    traced = NNsight(model)
    out = {L: {"sum": 0, "fire": 0, "max": None} for L in dicts}
    for s in range(0, len(rows), BATCH):
        chunk = rows[s : s + BATCH]
        ids = torch.tensor([r.input_ids for r in chunk], device=device)
        mask = torch.tensor([r.mask() for r in chunk], device=device)
        saved = {}
        with traced.trace(ids) as tracer:
            for L in dicts:
                saved[L] = traced.model.layers[L].output.save()
            tracer.stop()
        for L, d in dicts.items():
            acts = d.encode(saved[L])[mask]
            o = out[L]
            o["sum"] = o["sum"] + acts.double().sum(0)
            o["fire"] = o["fire"] + (acts > 0).sum(0)
            m = acts.amax(0)
            o["max"] = m if o["max"] is None else torch.maximum(o["max"], m)
    return out


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def read_at(site: str) -> ReadSpec:
    return ReadSpec(layers=LAYERS, site=site, positions=Positions(exclude_sinks=False))


def has_nnsight() -> bool:
    try:
        import nnsight  # noqa: F401
    except ImportError:
        print("nnsight is not installed: (n) left out (pip install -e '.[bench]')")
        return False
    return True


def measure_memory(mult: int, device: str) -> dict[str, float]:
    """Peak memory (MB) during the stats pass over ``mult`` x the base tokens, in this process:
    the peak, and the peak above the memory held before the pass (model, dictionaries, data)."""
    model = build_model(device)
    rows = make_rows(BATCH * 2 * mult)
    dicts = {L: build_dictionary(model, L, rows) for L in LAYERS}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        collect_stats(model, rows, dicts, read_at("resid_post"), StatsConfig(batch_size=BATCH))
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        with open("/proc/self/clear_refs", "w") as fh:  # reset the RSS high-water mark (Linux)
            fh.write("5")
        before = _status_mb("VmRSS")
        collect_stats(model, rows, dicts, read_at("resid_post"), StatsConfig(batch_size=BATCH))
        peak = _status_mb("VmHWM")
    return {"peak_mb": peak, "above_setup_mb": peak - before}


def time_site(model, rows, site: str, dev: str, repeats: int) -> tuple[dict, dict]:
    """Median seconds of each path at one site (c and n at resid_post only), and their stats."""
    dicts = {L: build_dictionary(model, L, rows, site) for L in LAYERS}
    read, cfg = read_at(site), StatsConfig(batch_size=BATCH, residual=False)
    lean = cfg.model_copy(update={"top_k": 0, "sequence_means": False})
    out: dict = {}
    fns = floor_paths(model, rows, dicts, read, cfg, out)

    def t():
        out["t"] = collect_stats(model, rows, dicts, read, lean)[0]

    def c():
        out["c"] = naive(model, rows, dicts, dev)

    def n():
        out["n"] = nnsight_path(model, rows, dicts, dev)

    fns["t"] = t
    if site == "resid_post":
        fns["c"] = c
        if has_nnsight():
            fns["n"] = n
    for f in fns.values():  # warm up
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # interleaved, so drift hits all alike
        for name, f in fns.items():
            times[name].append(timed(f, dev))
    for L in LAYERS:  # every path computes the same statistics
        sb, st = out["b"][L], out["t"][L]
        for name in ("sum", "sumsq", "fire", "max"):
            assert torch.equal(getattr(sb, name), getattr(st, name)), name
        if "c" in out:
            sc = out["c"][L]
            torch.testing.assert_close(sb.sum, sc["sum"], rtol=1e-4, atol=1e-3)
            assert torch.equal(sb.fire.cpu(), sc["fire"].cpu())
            torch.testing.assert_close(sb.max, sc["max"], rtol=1e-5, atol=1e-5)
            fired = sb.fire > 0  # never-active features: -inf in the top-k store, 0 naive
            torch.testing.assert_close(
                sb.top_val[fired, 0], sc["top"][0][fired], rtol=1e-5, atol=1e-5
            )
        if "n" in out:
            sn = out["n"][L]
            torch.testing.assert_close(st.sum, sn["sum"], rtol=1e-4, atol=1e-3)
            assert torch.equal(st.fire.cpu(), sn["fire"].cpu())
            torch.testing.assert_close(st.max, sn["max"], rtol=1e-5, atol=1e-5)
    return {k: statistics.median(v) for k, v in times.items()}, {"times": times, **out}


def paired(times: dict[str, list[float]], num: str, den: tuple[str, ...]) -> float:
    """``num / sum(den)`` of each path's fastest repeat: interference on a shared machine only
    ever adds time, so the minimum is the least disturbed measurement of each path."""
    return round(min(times[num]) / sum(min(times[d]) for d in den), 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sites", default="resid_post,mlp_out,resid_mid")
    ap.add_argument("--memory-only", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_only:
        print(json.dumps(measure_memory(args.memory_only, args.device)))
        return
    dev = args.device
    model = build_model(dev)
    rows = make_rows(BATCH * args.batches)
    sites = args.sites.split(",")
    per_site = {site: time_site(model, rows, site, dev, args.repeats) for site in sites}
    mem, above = {}, {}
    for mult in (1, 4, 16):
        res = subprocess.run(
            [sys.executable, __file__, "--device", dev, "--memory-only", str(mult)],
            capture_output=True,
            text=True,
            check=True,
        )
        m = json.loads(res.stdout.strip().splitlines()[-1])
        mem[f"{mult}x"], above[f"{mult}x"] = round(m["peak_mb"], 1), round(m["above_setup_mb"], 1)
    n_tokens = sum(sum(r.mask()) for r in rows)
    first = per_site[sites[0]][1]["b"][LAYERS[0]]
    l0 = float(first.fire.sum() / first.n_tokens)
    print(f"tokens selected per pass: {n_tokens} ({len(rows)} sequences x {SEQ}); L0 ~ {l0:.0f}")
    labels = {
        "a": "forward to last hook point",
        "e": "bare encode",
        "b": "emdiff stats pass",
        "t": "emdiff, token statistics",
        "c": "naive path",
        "n": "nnsight path",
    }
    ratios = {}
    for site, (t, extra) in per_site.items():
        ratios[site] = paired(extra["times"], "b", ("a", "e"))
        print(f"site {site}: stats_over_floor {ratios[site]}")
        for k, v in t.items():
            runs = [round(x * 1000) for x in extra["times"][k]]
            print(f"  ({k}) {labels[k]:<28} {v * 1000:8.1f} ms  (runs: {runs})")
    print(f"peak memory during the stats pass: {mem}; above the setup: {above}")
    t, extra = per_site.get("resid_post", next(iter(per_site.values())))
    runs = extra["times"]
    result = {
        "device": dev,
        "threads": torch.get_num_threads(),
        "tokens": n_tokens,
        "stats_over_floor": max(ratios.values()),
        "stats_over_floor_by_site": ratios,
        "naive_over_stats": paired(runs, "c", ("b",)) if "c" in t else None,
        "nnsight_over_stats": paired(runs, "n", ("t",)) if "n" in t else None,
        "token_stats_over_floor": paired(runs, "t", ("a", "e")),
        "peak_mem_mb": mem,
        "peak_mem_above_setup_mb": above,
        "ms": {
            s: {k: round(v * 1000, 1) for k, v in ts.items()} for s, (ts, _) in per_site.items()
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
