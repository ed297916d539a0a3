"""Batched sampling of chat answers with left padding."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from emdiff.data.masks import encode_chat, pad_batch


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[Mapping[str, str]]],
    *,
    n_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> list[list[str]]:
    """Sample ``n_samples`` answers per prompt; returns one list of answer strings per prompt.

    Prompts are chat message lists; the generation prompt of the chat template is appended.
    ``temperature=0`` decodes greedily.
    """
    encoded = [encode_chat(tokenizer, p, add_generation_prompt=True).input_ids for p in prompts]
    jobs = [(i, ids) for i, ids in enumerate(encoded) for _ in range(n_samples)]
    device = next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    out: list[list[str]] = [[] for _ in prompts]
    torch.manual_seed(seed)
    sampling = temperature > 0
    kwargs = (
        dict(do_sample=True, temperature=temperature, top_p=top_p)
        if sampling
        else dict(do_sample=False)
    )
    for start in tqdm(
        range(0, len(jobs), batch_size), desc="generate", disable=not progress, leave=False
    ):
        chunk = jobs[start : start + batch_size]
        ids, att = pad_batch([j[1] for j in chunk], pad_id, side="left")
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=att.to(device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            **kwargs,
        )
        for (i, _), row in zip(chunk, gen[:, ids.shape[1] :], strict=True):
            out[i].append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out
