"""Supervised fine-tuning on chat JSONL with the loss on answer tokens only.

LoRA (any rank, rsLoRA, chosen modules and layers: e.g. rank 1 on ``down_proj`` of a few layers,
the CLR organism) or a full fine-tune. The output is a standard PEFT adapter folder (or a full
``save_pretrained`` folder), with optional checkpoints every N optimiser steps so the phase
transition can be studied over them.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator
from tqdm.auto import tqdm

from emdiff.data.chat import Conversation
from emdiff.data.masks import encode_chat, pad_batch
from emdiff.errors import InputError, NonFiniteError
from emdiff.interventions.edits import Intervention, intervene


class FinetuneConfig(BaseModel):
    """Everything that decides a fine-tune. Serialised next to the adapter as ``emdiff_finetune.json``."""

    method: Literal["lora", "full"] = "lora"
    rank: int = Field(1, ge=1)
    alpha: float = Field(1.0, gt=0)
    use_rslora: bool = False
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["down_proj"])
    layers: list[int] | None = None
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = 0.0
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = 1.0
    max_length: int = Field(2048, ge=8)
    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1)
    continue_adapter: bool = False
    """Train the LoRA the model already carries (a benign fine-tune of a misaligned adapter)
    instead of attaching a new one."""

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.method == "full" and self.layers is not None:
            raise ValueError("layers= applies to LoRA only; a full fine-tune trains every layer")
        return self


@dataclass
class FinetuneResult:
    """What a fine-tune returns."""

    model: torch.nn.Module
    """The trained model: a ``PeftModel`` for LoRA, the base model itself for a full fine-tune."""
    losses: list[float] = field(default_factory=list)
    """Mean answer-token loss of each optimiser step."""
    checkpoints: list[Path] = field(default_factory=list)
    """Folders written every ``checkpoint_every`` steps (``checkpoint-STEP``)."""
    out_dir: Path | None = None


def tokenize_conversations(
    tokenizer, conversations: Sequence[Conversation], max_length: int
) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` per conversation, labels ``-100`` outside answers and end-of-turn."""
    out = []
    for conv in conversations:
        enc = encode_chat(tokenizer, conv.as_dicts())
        keep = enc.loss_mask()
        labels = [t if k else -100 for t, k in zip(enc.input_ids, keep, strict=True)]
        out.append((enc.input_ids[:max_length], labels[:max_length]))
    return out


def attach_lora(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """Wrap ``model`` in a fresh PEFT LoRA adapter as ``cfg`` describes."""
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        use_rslora=cfg.use_rslora,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=list(cfg.layers) if cfg.layers is not None else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft calls a transformers-5 deprecated property
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, lcfg)
    except ValueError as e:
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if not list(m.children())}
        )
        raise ValueError(f"{e}\nLeaf module names in this model: {', '.join(names)}") from None


def _lora_to_train(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.nn.Module:
    """A fresh adapter, or (``continue_adapter``) the model's own LoRA weights made trainable."""
    carries = any("lora_" in n for n, _ in model.named_parameters())
    if not cfg.continue_adapter:
        if carries:
            raise InputError(
                "the model already carries a LoRA adapter: set continue_adapter to train it "
                "further, or pass the base model for a new one"
            )
        return attach_lora(model, cfg)
    if not carries:
        raise InputError("continue_adapter: the model carries no LoRA adapter to train")
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def _save(model: torch.nn.Module, tokenizer, cfg: FinetuneConfig, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if cfg.method == "full" and tokenizer is not None:
        tokenizer.save_pretrained(path)
    (path / "emdiff_finetune.json").write_text(cfg.model_dump_json(indent=2))


def finetune(
    model: torch.nn.Module,
    tokenizer,
    conversations: Sequence[Conversation],
    cfg: FinetuneConfig,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    during: Sequence[Intervention] = (),
) -> FinetuneResult:
    """Train ``model`` on ``conversations`` with the loss on answer tokens; optionally save.

    ``out_dir`` receives the final adapter (or full model) and ``checkpoint-STEP`` folders.
    ``during``: interventions installed for every training step and removed after (concept
    ablation, preventative steering); the saved weights are the model's own.
    """
    if not conversations:
        raise InputError("no conversations to train on")
    examples = tokenize_conversations(tokenizer, conversations, cfg.max_length)
    if not any(any(t != -100 for t in lab) for _, lab in examples):
        raise InputError("no answer tokens to train on: every label is masked")
    torch.manual_seed(cfg.seed)
    if cfg.method == "lora":
        model = _lora_to_train(model, cfg)
    device = next(model.parameters()).device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum))
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    result = FinetuneResult(model=model, out_dir=Path(out_dir) if out_dir else None)
    bar = tqdm(range(total), desc=f"finetune ({cfg.method})", disable=not progress, leave=False)
    with intervene(model, *during):  # hooks off again before the weights are saved
        for step in bar:
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                if len(order) < cfg.batch_size:
                    order += torch.randperm(len(examples), generator=gen).tolist()
                idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
                ids, att = pad_batch([examples[i][0] for i in idx], pad_id)
                labels, _ = pad_batch([examples[i][1] for i in idx], -100)
                out = model(input_ids=ids.to(device), attention_mask=att.to(device))
                logits = out.logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device)
                )
                if not math.isfinite(loss.item()):  # before backward: a NaN would reach the weights
                    n_answer = int((labels[:, 1:] != -100).sum())
                    raise NonFiniteError(
                        f"fine-tuning loss is {loss.item()} at step {step} (conversations {idx}, "
                        f"{n_answer} answer tokens): "
                        + (
                            "no answer token in this batch (answers cut off by max_length?)"
                            if n_answer == 0
                            else "check the model's weights and dtype (fp16 overflow)"
                        )
                    )
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            result.losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}")
            if on_step is not None:
                on_step(step + 1, step_loss)
            if result.out_dir and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                ck = result.out_dir / f"checkpoint-{step + 1}"
                _save(model, tokenizer, cfg, ck)
                result.checkpoints.append(ck)
    model.eval()
    if result.out_dir:
        _save(model, tokenizer, cfg, result.out_dir)
        (result.out_dir / "losses.json").write_text(json.dumps(result.losses))
    return result
