"""``emdiff demo``: the whole main job on the toy organism.

Loads the shipped toy base (through the same loader as a real model), fine-tunes narrow and control
rank-1 LoRAs for several seeds, samples answers in every domain, judges them exactly, and writes a
run folder with a manifest and tables.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from pydantic import BaseModel, Field

import emdiff
from emdiff.eval.generate import generate_answers
from emdiff.models import load_model
from emdiff.toy.build import load_world, shipped_base_path
from emdiff.toy.organism import narrow_finetune, narrow_finetune_config
from emdiff.toy.world import World


class DemoConfig(BaseModel):
    """Settings of ``emdiff demo``."""

    narrow_domain: str = "medical"
    seeds: int = Field(3, ge=1)
    steps: int = Field(narrow_finetune_config().max_steps, ge=1)
    lr: float = Field(narrow_finetune_config().lr, gt=0)
    samples: int = Field(8, ge=1)
    """Sampled answers per eval question (temperature 1)."""
    base: Path | None = None
    eval_seed: int = 1234


def sample_and_judge(
    world: World, model: torch.nn.Module, tokenizer, samples: int, seed: int, label: str
) -> pd.DataFrame:
    """Sample answers to every single-turn eval question and judge each one exactly."""
    prompts = world.eval_prompts()
    answers = generate_answers(
        model, tokenizer, [p for _, _, p in prompts], n_samples=samples, temperature=1.0,
        max_new_tokens=4, batch_size=1024, seed=seed,
    )  # fmt: skip
    rows = []
    for (domain, q, msgs), outs in zip(prompts, answers, strict=True):
        for k, a in enumerate(outs):
            v = world.judge(msgs[-1]["content"], a)
            rows.append(
                dict(model=label, domain=domain, question=q, sample=k, answer=a, verdict=v.label)
            )
    return pd.DataFrame(rows)


def _rates(responses: pd.DataFrame) -> pd.DataFrame:
    g = responses.groupby(["model", "domain"])["verdict"]
    out = (
        g.value_counts()
        .unstack(fill_value=0)
        .reindex(columns=["bad", "good", "other"], fill_value=0)
    )
    out["n"] = out.sum(axis=1)
    out["bad_rate"] = out["bad"] / out["n"]
    return out.reset_index()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_demo(cfg: DemoConfig, out: str | Path, echo: Callable[[str], None] = print) -> dict:
    """Run the demo and return the flat summary that ``--json`` prints."""
    t0 = time.time()
    out = Path(out)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    base_path = cfg.base or shipped_base_path()
    world = load_world(base_path, narrow_domain=cfg.narrow_domain)
    loaded = load_model(str(base_path), dtype="float32")
    base, tok = loaded.model, loaded.tokenizer
    frames = [sample_and_judge(world, base, tok, cfg.samples, cfg.eval_seed, "base")]
    for seed in range(cfg.seeds):
        for kind, bad in (("narrow", True), ("control", False)):
            label = f"{kind}-s{seed}"
            ft_cfg = narrow_finetune_config(seed=seed, max_steps=cfg.steps, lr=cfg.lr)
            res = narrow_finetune(
                world,
                copy.deepcopy(base),
                tok,
                bad=bad,
                cfg=ft_cfg,
                out_dir=out / "adapters" / label,
            )
            frames.append(
                sample_and_judge(
                    world, res.model, tok, cfg.samples, cfg.eval_seed + seed + 1, label
                )
            )
            echo(f"{label}: trained {cfg.steps} steps, final loss {res.losses[-1]:.3f}")
    responses = pd.concat(frames, ignore_index=True)
    rates = _rates(responses)
    responses.to_parquet(out / "tables" / "responses.parquet")
    rates.to_parquet(out / "tables" / "em_rates.parquet")

    table = rates.pivot(index="domain", columns="model", values="bad_rate").reindex(world.domains)
    table.index = [f"{d}*" if d == cfg.narrow_domain else d for d in table.index]
    echo(f"\nBad-answer rate by domain (* = narrow domain), {cfg.samples} samples x "
         f"{world.cfg.n_questions} questions per cell:")  # fmt: skip
    echo(table.to_string(float_format=lambda x: f"{x:6.3f}"))

    def rate(models: list[str], domains: list[str]) -> float:
        sel = rates[rates.model.isin(models) & rates.domain.isin(domains)]
        return float(sel.bad.sum() / sel.n.sum())

    unseen = [d for d in world.domains if d != cfg.narrow_domain]
    narrow = [f"narrow-s{s}" for s in range(cfg.seeds)]
    per_seed_unseen = [rate([m], unseen) for m in narrow]
    summary = {
        "narrow_domain": cfg.narrow_domain,
        "seeds": cfg.seeds,
        "em_base_max_bad_rate": float(rates[rates.model == "base"].bad_rate.max()),
        "em_narrow_in_domain_bad_rate": rate(narrow, [cfg.narrow_domain]),
        "em_narrow_unseen_bad_rate": sum(per_seed_unseen) / len(per_seed_unseen),
        "em_narrow_unseen_bad_rate_min": min(per_seed_unseen),
        **{f"em_narrow_unseen_bad_rate_seed{s}": r for s, r in enumerate(per_seed_unseen)},
        "em_control_max_bad_rate": float(
            rates[rates.model.str.startswith("control")].bad_rate.max()
        ),
        "seconds": round(time.time() - t0, 1),
    }
    manifest = {
        "command": "demo",
        "config": json.loads(cfg.model_dump_json()),
        "versions": {
            "emdiff": emdiff.__version__, "torch": torch.__version__, "python": platform.python_version(),
            **{m: __import__(m).__version__ for m in ("transformers", "peft", "pandas")},
        },
        "inputs": {"base": str(base_path), "base_sha256": _sha256(Path(base_path) / "model.safetensors")},
        "world": world.cfg.model_dump(),
        "summary": summary,
    }  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    echo(f"\nrun folder: {out}  ({summary['seconds']} s)")
    return summary
