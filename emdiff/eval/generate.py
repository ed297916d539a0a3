"""Batched sampling of chat answers with left padding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from emdiff.data.masks import encode_chat, pad_batch


class Generation(NamedTuple):
    """One sampled answer."""

    text: str
    """Decoded answer, special tokens dropped, surrounding whitespace stripped."""
    n_tokens: int
    """Generated tokens up to and including the first end-of-turn token."""
    finished: bool
    """Whether the model ended its turn before ``max_new_tokens``."""


UNTRUNCATED = {"top_k": 0, "typical_p": 1.0, "min_p": 0.0}
"""Sampling overrides: many chat checkpoints ship a ``generation_config`` with e.g. ``top_k=20``;
the EM evals sample the full (temperature / top_p) distribution, so these are always set."""
NO_PENALTIES = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
"""Overrides of any penalty a checkpoint's ``generation_config`` would otherwise apply."""


def _eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = ids if ids is not None else tokenizer.eos_token_id
    return set(ids) if isinstance(ids, list | tuple) else {ids} if ids is not None else set()


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
) -> list[Generation]:
    """One answer per chat prompt, generated together in one left-padded batch.

    The chat template's generation prompt is appended; ``temperature=0`` decodes greedily. Seed
    the global torch RNG beforehand for reproducible samples. The checkpoint's own
    ``generation_config`` sampling defaults (top_k, penalties) are overridden: see
    :data:`UNTRUNCATED` and :data:`NO_PENALTIES`.
    """
    encoded = [encode_chat(tokenizer, p, add_generation_prompt=True).input_ids for p in prompts]
    device = next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    sampling = (
        dict(do_sample=True, temperature=temperature, top_p=top_p, **UNTRUNCATED)
        if temperature > 0
        else dict(do_sample=False)
    )
    ids, att = pad_batch(encoded, pad_id, side="left")
    gen = model.generate(
        input_ids=ids.to(device),
        attention_mask=att.to(device),
        max_new_tokens=max_new_tokens,
        pad_token_id=pad_id,
        **NO_PENALTIES,
        **sampling,
    )
    eos = _eos_ids(model, tokenizer)
    out = []
    for row in gen[:, ids.shape[1] :].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        kept = row if stop is None else row[: stop + 1]
        text = tokenizer.decode(kept, skip_special_tokens=True).strip()
        out.append(Generation(text, len(kept), stop is not None))
    return out
