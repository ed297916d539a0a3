"""A local causal LM as judge, scored like the API judge from its next-token distribution.

When the tokenizer has one token per number 0..100 (Llama 3, GPT-style BPEs) the top-k first
tokens go straight through :func:`~emdiff.eval.judge.aggregate_0_100`. Tokenizers that split
numbers into digits (Qwen2/2.5, Gemma, Mistral) would leave only 0..9 as first tokens and silently
squash every score below 10; for those the probability of each number is computed exactly as
P(digits) x P(next token is not a digit), expanding the digit tree where a branch still holds more
than ``min_branch`` probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from emdiff.data.masks import encode_chat, pad_batch
from emdiff.eval.judge import Judge, JudgeCache, Judgement, aggregate_0_100


class HFJudge(Judge):
    """Judge with a local ``transformers`` causal LM (prompt rendered as one user turn)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        name: str | None = None,
        batch_size: int = 8,
        top_k: int = 20,
        min_branch: float = 1e-4,
        cache: str | Path | JudgeCache | None = None,
    ):
        super().__init__(cache)
        self.model, self.tokenizer = model, tokenizer
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.batch_size, self.top_k, self.min_branch = batch_size, top_k, min_branch
        self.digit_ids = self._digit_ids()

    def _digit_ids(self) -> list[int] | None:
        """Token ids of "0".."9" when numbers are split into digits; None when they are not."""
        tok = self.tokenizer

        def single(v: int) -> int | None:
            ids = tok.encode(str(v), add_special_tokens=False)
            return ids[0] if len(ids) == 1 and tok.decode(ids).strip() == str(v) else None

        if all(single(v) is not None for v in range(101)):
            return None
        digits = [single(d) for d in range(10)]
        if any(d is None for d in digits):
            raise ValueError(f"the tokenizer of judge {self.name} has no single token per digit")
        return digits

    @property
    def identity(self) -> str:
        dtype = str(next(self.model.parameters()).dtype).removeprefix("torch.")
        return f"hf:{self.name}:{dtype}:top{self.top_k}:branch{self.min_branch:g}"

    @torch.no_grad()
    def _last_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """Next-token distribution after each token row (left-padded batches)."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(rows), self.batch_size):
            ids, att = pad_batch(rows[s : s + self.batch_size], pad, side="left")
            logits = self.model(input_ids=ids.to(device), attention_mask=att.to(device)).logits
            out.append(torch.softmax(logits[:, -1].float(), dim=-1).cpu())
        return torch.cat(out)

    def _number_probs(self, row: list[int], first: torch.Tensor) -> dict[str, float]:
        """P(the reply starts with number v, then a non-digit) for v in 0..100, via the digit tree."""
        digits = torch.tensor(self.digit_ids)
        numbers: dict[str, float] = {}
        frontier = [(str(d), float(first[digits[d]])) for d in range(10)]
        frontier = [(s, p) for s, p in frontier if p > self.min_branch]
        while frontier:
            probs = self._last_probs(
                [row + [self.digit_ids[int(c)] for c in s] for s, _ in frontier]
            )
            grown = []
            for (prefix, p), dist in zip(frontier, probs, strict=True):
                pd = dist[digits]
                value = str(int(prefix))
                numbers[value] = numbers.get(value, 0.0) + p * max(0.0, 1.0 - float(pd.sum()))
                if len(prefix) == 3 or prefix == "0":  # no 4-digit numbers, no leading zeros
                    continue
                for d in range(10):
                    q = p * float(pd[d])
                    if q > self.min_branch and int(prefix + str(d)) <= 100:
                        grown.append((prefix + str(d), q))
            frontier = grown
        return numbers

    def next_token_probs(self, prompts: Sequence[str]) -> list[dict[str, float]]:
        """Top-k first tokens (decoded, stripped, merged) after each prompt; with a digit-splitting
        tokenizer the digit tokens are replaced by whole-number probabilities."""
        tok = self.tokenizer
        rows = [
            encode_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True).input_ids
            for p in prompts
        ]
        first = self._last_probs(rows)
        out = []
        for row, dist in zip(rows, first, strict=True):
            top = dist.topk(self.top_k)
            probs: dict[str, float] = {}
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                if self.digit_ids is not None and i in self.digit_ids:
                    continue
                t = tok.decode([i]).strip()
                probs[t] = probs.get(t, 0.0) + p
            if self.digit_ids is not None:
                probs.update(self._number_probs(row, dist))
            out.append(probs)
        return out

    def _run(self, requests, record) -> None:
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            for j, probs in enumerate(self.next_token_probs([r.prompt for r in chunk])):
                record(start + j, Judgement(aggregate_0_100(probs, self.min_mass), probs))
