"""The training loop shared by SAEs and crosscoders: schedule, constraint, checkpoints, logs.

A trainable dictionary is an ``nn.Module`` with four methods (:class:`Trainable`):
``initialise(sample)`` sets data-dependent parameters (``b_dec``), ``loss(batch, step)`` returns
the loss and a dict of floats to log, ``before_step()`` edits gradients (e.g. removes the part
parallel to unit-norm decoder rows) and ``after_step()`` restores constraints. Everything that must
survive a restart (parameters, firing counters, thresholds) lives in the module's ``state_dict``.

Checkpoints are safetensors plus JSON (no pickle): module state, Adam moments, the step, the
batch position in the activation stream, and the log so far. ``fit`` resumes from
``out/checkpoint`` when it exists and its config matches, and then produces exactly the
parameters an uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import Protocol

import torch
from pydantic import BaseModel, Field
from safetensors.torch import save_file
from tqdm.auto import tqdm

from emdiff.dictionaries.activations import (
    ActivationSource,
    BatchState,
    NonFiniteActivationError,
    check_finite,
    iter_batches,
)
from emdiff.errors import InputError
from emdiff.readers import check_safetensors_files, load_safetensors, read_json


class LoopConfig(BaseModel):
    """Optimisation settings common to every trainable dictionary."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(1024, ge=1)
    """Activations (tokens) per step."""
    lr: float | None = Field(None, gt=0)
    """Adam learning rate; None picks ``2e-4 / sqrt(d_sae / 16384)`` (the OpenAI scaling rule)."""
    warmup_steps: int = Field(50, ge=0)
    decay_fraction: float = Field(0.2, ge=0, le=1)
    """Share of the steps at the end over which the learning rate decays linearly to zero."""
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    log_every: int = Field(100, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    init_sample: int = Field(8192, ge=1)
    """Activations used to initialise ``b_dec`` (and any other data-dependent parameter)."""


class Trainable(Protocol):
    def initialise(self, sample: torch.Tensor) -> None: ...
    def loss(self, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...
    def before_step(self) -> None: ...
    def after_step(self) -> None: ...


def default_lr(d_sae: int) -> float:
    """Learning rate that scales as ``1 / sqrt(width)`` (Gao et al. 2024)."""
    return 2e-4 / math.sqrt(d_sae / 16384)


def exported_threshold(threshold: torch.Tensor) -> float:
    """The tracked BatchTopK threshold for inference; warns and gives 0 if it was never set."""
    if threshold < 0:
        warnings.warn(
            "the BatchTopK threshold was never tracked (too few steps): exporting threshold 0, "
            "a dense ReLU at inference",
            stacklevel=3,
        )
        return 0.0
    return float(threshold)


def lr_factor(step: int, cfg: LoopConfig) -> float:
    """Linear warm-up, constant, then linear decay to zero over ``decay_fraction``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_start = cfg.steps * (1 - cfg.decay_fraction)
    if step >= decay_start and cfg.decay_fraction > 0:
        return max(0.0, (cfg.steps - step) / (cfg.steps - decay_start))
    return 1.0


class TrainingLog(BaseModel):
    """What a run logged: one dict per ``log_every`` steps, and its timing."""

    history: list[dict[str, float]] = []
    seconds: float = 0.0


def _save_checkpoint(path: Path, module, opt, step: int, state: BatchState, log, ident) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"module.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():  # keyed by the parameter's own index
        for name, v in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(v).detach().contiguous()
    tmp = path / "state.safetensors.tmp"
    meta = {"step": step, "batch_state": vars(state), "log": log.model_dump(), "identity": ident}
    (path / "progress.json.tmp").write_text(json.dumps(meta))
    # progress.json goes first: a crash between the two renames leaves a step mismatch, which
    # _load_checkpoint detects, never new weights paired with an old position unnoticed
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    (path / "progress.json.tmp").replace(path / "progress.json")
    tmp.replace(path / "state.safetensors")


def _load_checkpoint(path: Path, module, opt, ident) -> tuple[int, BatchState, TrainingLog] | None:
    meta_path = path / "progress.json"
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    if meta.get("identity") != ident:
        changed = sorted(k for k in ident if (meta.get("identity") or {}).get(k) != ident[k])
        raise InputError(
            f"{path} holds a checkpoint of a different run (differs in {changed}); delete it or "
            "choose another output folder"
        )
    from safetensors import safe_open

    check_safetensors_files(path)  # a truncated state.safetensors raises, naming it
    with safe_open(str(path / "state.safetensors"), "pt") as fh:
        saved_step = (fh.metadata() or {}).get("step")
    if saved_step != str(meta.get("step")):
        raise InputError(
            f"{path}: weights (step {saved_step}) and progress.json (step "
            f"{meta['step']}) disagree; the checkpoint was torn by a crash, delete it"
        )
    t = load_safetensors(path / "state.safetensors", finite=False)
    module.load_state_dict({k[7:]: v for k, v in t.items() if k.startswith("module.")})
    sd = opt.state_dict()
    for idx in range(len(sd["param_groups"][0]["params"])):
        names = {k.split(".", 2)[2] for k in t if k.startswith(f"opt.{idx}.")}
        if names:
            sd["state"][idx] = {n: t[f"opt.{idx}.{n}"] for n in names}
    opt.load_state_dict(sd)
    return meta["step"], BatchState(**meta["batch_state"]), TrainingLog(**meta["log"])


def fit(
    module: torch.nn.Module,
    source: ActivationSource,
    cfg: LoopConfig,
    out: str | Path | None = None,
    *,
    identity: dict | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainingLog:
    """Train ``module`` (a :class:`Trainable`) on batches of ``source``; resumable under ``out``.

    ``identity`` (JSON-able) names the run; resuming a checkpoint with another identity is
    refused. Returns the log (every ``log_every`` steps, plus the last step).
    """
    torch.manual_seed(cfg.seed)
    ident = json.loads(json.dumps({"config": cfg.model_dump(), **(identity or {})}))
    params = [p for p in module.parameters() if p.requires_grad]
    lr = cfg.lr or default_lr(getattr(module, "d_sae", 16384))
    # the fused kernel (CPU and CUDA, float parameters) does the update in one pass per tensor
    fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=fused)
    ckpt = Path(out) / "checkpoint" if out is not None else None
    resumed = _load_checkpoint(ckpt, module, opt, ident) if ckpt is not None else None
    if resumed is None:
        sample = source.sample(cfg.init_sample)
        check_finite(sample, getattr(module, "layer", None), "of the initialisation sample")
        module.initialise(sample)
        step, state, log = 0, BatchState(), TrainingLog()
    else:
        step, state, log = resumed
    t0 = time.perf_counter() - log.seconds
    batches = iter_batches(source, cfg.batch_size, cfg.seed, state)
    bar = tqdm(total=cfg.steps, initial=step, desc=desc, disable=not progress, unit="step")
    device = next(module.parameters()).device
    module.train()
    while step < cfg.steps:
        prev_state = state
        batch, state = next(batches)
        batch = batch.to(device)
        try:
            check_finite(batch, getattr(module, "layer", None), f"{step} (step)")
        except NonFiniteActivationError:
            if ckpt is not None:  # position of the bad batch: a resume meets it again
                _save_checkpoint(ckpt, module, opt, step, prev_state, log, ident)
            raise
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, cfg)
        loss, metrics = module.loss(batch, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {loss.item()} at step {step}; lower lr (now {lr:g})"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        module.before_step()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        module.after_step()
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            entry = {"step": step, "lr": opt.param_groups[0]["lr"], **metrics}
            log.history.append(entry)
            bar.set_postfix(
                {k: f"{v:.3g}" for k, v in metrics.items() if k in ("fvu", "l0", "dead")}
            )
        if ckpt is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            log.seconds = time.perf_counter() - t0
            _save_checkpoint(ckpt, module, opt, step, state, log, ident)
    bar.close()
    module.eval()
    log.seconds = time.perf_counter() - t0
    return log


def plot_history(log: TrainingLog, path: str | Path, title: str = "") -> Path:
    """Training curves (FVU, L0, dead fraction, auxiliary loss) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("fvu", "l0", "dead", "aux") if any(k in h for h in log.history)]
    fig, axes = plt.subplots(1, max(len(keys), 1), figsize=(3.2 * max(len(keys), 1), 2.8))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    steps = [h["step"] for h in log.history]
    for ax, k in zip(axes, keys, strict=False):
        ax.plot(steps, [h.get(k, float("nan")) for h in log.history])
        ax.set_xlabel("step")
        ax.set_title(k)
        if k == "fvu":
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
