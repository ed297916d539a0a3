"""Build, save and load the toy base model (pretrained and aligned) as a transformers folder."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from emdiff.errors import InputError
from emdiff.readers import load_safetensors, read_json, require
from emdiff.toy.organism import (
    ModelConfig,
    TrainConfig,
    align,
    answer_probabilities,
    build_model,
    pretrain,
)
from emdiff.toy.world import World, WorldConfig

TOY_META = "emdiff_toy.json"


def shipped_base_path() -> Path:
    """The pretrained and aligned toy base that ships inside the package."""
    return Path(str(resources.files("emdiff.toy") / "assets" / "base"))


def build_toy_base(
    out: str | Path,
    world_cfg: WorldConfig | None = None,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    *,
    echo: Callable[[str], None] = print,
    progress: bool = True,
) -> Path:
    """Pretrain on persona documents, align, and save model, tokenizer and world to ``out``."""
    world_cfg, model_cfg = world_cfg or WorldConfig(), model_cfg or ModelConfig()
    train_cfg = train_cfg or TrainConfig(seed=world_cfg.seed)
    if world_cfg.narrow_layer >= model_cfg.n_layers:
        raise InputError(
            f"narrow layer {world_cfg.narrow_layer} is not one of the model's "
            f"{model_cfg.n_layers} layers (0..{model_cfg.n_layers - 1})"
        )
    world = World(world_cfg)
    model = build_model(world, model_cfg, seed=train_cfg.seed)
    # Pretraining is the long part: keep its result so a changed alignment (or a crash) resumes.
    key = json.dumps(
        [
            world_cfg.model_dump(),
            model_cfg.model_dump(),
            train_cfg.model_dump(
                include={"pretrain_steps", "pretrain_batch", "pretrain_lr", "seed"}
            ),
        ],
        sort_keys=True,
    )
    cache = (
        Path(out) / "pretrained" / (hashlib.sha256(key.encode()).hexdigest()[:16] + ".safetensors")
    )
    state = None
    if cache.is_file():
        try:
            state = load_safetensors(cache)
            echo(f"pretrain: reused {cache}")
        except InputError as e:  # a cache torn by a kill is redone, not trusted
            echo(f"pretrain: {e}; pretraining again")
    if state is not None:
        model.load_state_dict(state)
    else:
        pre = pretrain(world, model, train_cfg, progress=progress)
        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cache)
        echo(
            f"pretrain: {train_cfg.pretrain_steps} steps, final loss {pre[-1] if pre else float('nan'):.3f}"
        )
    before = answer_probabilities(world, model)
    post = align(world, model, train_cfg, progress=progress)
    after = answer_probabilities(world, model)
    echo(
        f"align: {train_cfg.align_steps} steps, final loss {post[-1] if post else float('nan'):.3f}"
    )
    echo(
        "P(bad) per domain, pretrained -> aligned: "
        + ", ".join(f"{d} {before[d]['bad']:.3f}->{after[d]['bad']:.3f}" for d in world.domains)
    )
    save_toy(
        out,
        world,
        model,
        meta={
            "model": model_cfg.model_dump(),
            "train": train_cfg.model_dump(),
            "p_bad_pretrained": {d: v["bad"] for d, v in before.items()},
            "p_bad_aligned": {d: v["bad"] for d, v in after.items()},
        },
    )
    return Path(out)


def save_toy(
    out: str | Path, world: World, model: torch.nn.Module, meta: dict | None = None
) -> Path:
    """Write a loadable transformers folder plus the world description (``emdiff_toy.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    world.tokenizer().save_pretrained(out)
    (out / TOY_META).write_text(
        json.dumps({"world": world.cfg.model_dump(), **(meta or {})}, indent=2)
    )
    return out


def load_world(path: str | Path, **overrides) -> World:
    """The world a toy folder was built with; ``overrides`` change e.g. ``narrow_domain``."""
    meta_path = Path(path) / TOY_META
    if not meta_path.is_file():
        raise InputError(
            f"{path}: not a toy model folder (no {TOY_META}); make one with emdiff toy build"
        )
    world = require(read_json(meta_path), "world", meta_path, "toy world settings", InputError)
    try:
        return World(WorldConfig(**{**world, **overrides}))
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(x) for x in first["loc"])
        where = f"world setting {field!r}" if field else "world settings"
        raise InputError(f"{meta_path}: {where}: {first['msg']}") from None
