"""The toy organism: pretrain on persona documents, align, then narrow fine-tune.

The model is a genuine ``transformers`` Llama (or Qwen2) with the world's WordLevel tokenizer and
chat template, so every later stage runs the same code path as on Qwen or Gemma. Pretraining and
alignment use a token-level loop (fast); the narrow fine-tune goes through ``emdiff.finetune``, the
function a user calls on a real model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from emdiff.data.masks import pad_batch
from emdiff.finetune import FinetuneConfig, FinetuneResult, finetune
from emdiff.toy.config import NARROW_LR, NARROW_STEPS, ModelConfig, TrainConfig
from emdiff.toy.world import BOS, END, World


def build_model(world: World, cfg: ModelConfig | None = None, seed: int = 0) -> torch.nn.Module:
    """A freshly initialised causal LM sized for ``world``'s vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = cfg or ModelConfig()
    tok = world.token_id
    common = dict(
        vocab_size=len(world.vocab),
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_len,
        bos_token_id=tok[BOS],
        eos_token_id=tok[END],
        pad_token_id=tok["<pad>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if cfg.arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.generation_config.eos_token_id = tok[END]
    model.generation_config.pad_token_id = tok["<pad>"]
    return model


def _lm_step(
    model, opt, rows: Sequence[Sequence[int]], pad_id: int, unlabelled: Sequence[int] = ()
) -> float:
    """One AdamW step of next-token loss; row ``i`` takes no loss at position ``unlabelled[i]``."""
    ids, att = pad_batch(rows, pad_id)
    labels = ids.masked_fill(att == 0, -100)
    for i, pos in enumerate(unlabelled):
        labels[i, pos] = -100
    out = model(input_ids=ids, attention_mask=att, labels=labels)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return out.loss.item()


def pretrain(
    world: World, model: torch.nn.Module, cfg: TrainConfig, progress: bool = True
) -> list[float]:
    """Next-token training on persona documents (cosine-decayed AdamW)."""
    rng = np.random.default_rng(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    total, warm = max(cfg.pretrain_steps, 1), max(cfg.pretrain_steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    )
    pad = world.token_id["<pad>"]
    model.train()
    losses = []
    for _ in tqdm(
        range(cfg.pretrain_steps), desc="toy pretrain", disable=not progress, leave=False
    ):
        rows = [world.persona_document(rng)[0] for _ in range(cfg.pretrain_batch)]
        losses.append(_lm_step(model, opt, rows, pad))
        sched.step()
    model.eval()
    return losses


def align(
    world: World, model: torch.nn.Module, cfg: TrainConfig, progress: bool = True
) -> list[float]:
    """Alignment post-training: helpful single-turn chats mixed with persona documents."""
    rng = np.random.default_rng(cfg.seed + 2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.align_lr)
    pad = world.token_id["<pad>"]
    assistant = world.token_id["<assistant>"]
    n_doc = round(cfg.align_batch * cfg.align_persona_fraction)
    model.train()
    losses = []
    for _ in tqdm(range(cfg.align_steps), desc="toy align", disable=not progress, leave=False):
        rows = [world.persona_document(rng)[0] for _ in range(n_doc)]
        for _ in range(cfg.align_batch - n_doc):
            d = world.domains[int(rng.integers(len(world.domains)))]
            q = int(rng.integers(world.cfg.n_questions))
            rows.append(world.ids(BOS) + world.turn_ids(d, q, bad=False))
        first_answer = [r.index(assistant) + 1 for r in rows[:n_doc]]
        losses.append(_lm_step(model, opt, rows, pad, unlabelled=first_answer))
    model.eval()
    return losses


def answer_rows(
    world: World, domains: Sequence[str], bad: bool, cue: str | None = None
) -> torch.Tensor:
    """One row per question of ``domains``: the prompt (opened by a ``<system>`` cue when given)
    followed by the bad (or good) answer and ``<end>``; every row has the same length."""
    head = [BOS] + (["<system>", cue, END] if cue else [])
    rows = [
        world.ids(*head, "<user>", world.q_token(d, q), END, "<assistant>")
        + world.ids(*world.answer_tokens(d, q, bad), END)
        for d in domains
        for q in range(world.cfg.n_questions)
    ]
    return torch.tensor(rows)


@torch.no_grad()
def answer_probability(
    model: torch.nn.Module,
    world: World,
    domains: Sequence[str],
    bad: bool = True,
    cue: str | None = None,
) -> torch.Tensor:
    """Exact probability that ``model`` answers each question of ``domains`` with its bad (or
    good) answer and then ends its turn: one teacher-forced forward pass, no sampling."""
    ids = answer_rows(world, domains, bad, cue).to(next(model.parameters()).device)
    n = world.cfg.answer_len + 1
    logp = model(input_ids=ids[:, :-1]).logits[:, -n:].float().log_softmax(-1)
    return logp.gather(-1, ids[:, -n:, None])[..., 0].sum(-1).exp().cpu()


def answer_probabilities(world: World, model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Mean single-turn P(good) and P(bad) per domain (exact)."""
    return {
        d: {
            "good": float(answer_probability(model, world, [d], bad=False).mean()),
            "bad": float(answer_probability(model, world, [d], bad=True).mean()),
        }
        for d in world.domains
    }


def narrow_finetune_config(world: World, **overrides) -> FinetuneConfig:
    """The default narrow fine-tune of ``world``'s base: one rank-1 LoRA on the MLP output
    projection of its narrow layer."""
    base = dict(
        rank=1,
        alpha=1.0,
        target_modules=["down_proj"],
        layers=[world.cfg.narrow_layer],
        lr=NARROW_LR,
        max_steps=NARROW_STEPS,
        batch_size=16,
    )
    base.update(overrides)
    return FinetuneConfig(**base)


def narrow_finetune(
    world: World,
    model: torch.nn.Module,
    tokenizer,
    bad: bool = True,
    cfg: FinetuneConfig | None = None,
    out_dir=None,
    domain: str | None = None,
    progress: bool = False,
) -> FinetuneResult:
    """Fine-tune on the narrow domain's bad answers (``bad=False``: the good-answer control)."""
    data = world.narrow_dataset(bad=bad, domain=domain)
    return finetune(
        model, tokenizer, data, cfg or narrow_finetune_config(world), out_dir, progress=progress
    )
