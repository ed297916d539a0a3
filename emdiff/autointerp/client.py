"""The language-model interpreter: prompts for explaining and detecting, over a chat-completions
server (:class:`~emdiff.eval.chat_client.ChatClient`, the judge's transport).

The procedure follows EleutherAI's delphi: the explainer sees activating contexts with the
strongly active tokens in ``<< >>`` (those above a fraction of the context's maximum) plus
non-activating counterexamples, and ends its reply with an ``[EXPLANATION]:`` line; the detection
scorer sees the explanation and a few unmarked contexts at a time and answers with a list of 0/1,
one per context. The prompt texts are this project's own.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from emdiff.autointerp.cards import Context, marked, plain_text
from emdiff.autointerp.config import AutoInterpConfig, AutoInterpError, ReplyError
from emdiff.eval.chat_client import ChatClient, Rejected, Retryable

EXPLAIN_SYSTEM = """\
You study one latent (a learned feature) of a sparse dictionary trained on a language model's \
internal activations. You will see text excerpts on which the latent is active. In each excerpt \
the tokens where it is strongly active are put between << and >>, and the line after the excerpt \
lists those tokens with their activation on a 0-10 scale (10 = the strongest seen). You will also \
see excerpts on which the latent is not active at all; use them to separate what the latent \
responds to from what the excerpts merely have in common.

Say in one short sentence what makes the latent active: which tokens, in which context. Be \
specific. Do not list alternatives, and do not mention the << >> markers. You may reason in a few \
lines first. The last line of your reply must be:
[EXPLANATION]: <your sentence>"""

EXPLAIN_SHOT = """\
ACTIVE EXCERPTS:
Example 1: the recipe calls for two cups of <<flour>> and a pinch of salt
Activations: "flour" 10
Example 2: she kneaded the <<dough>> until it was smooth
Activations: "dough" 8
Example 3: sift the <<flour>> twice before adding the <<yeast>>
Activations: "flour" 9, "yeast" 6

INACTIVE EXCERPTS:
Example 1: the train left the station at noon
Example 2: add salt to taste and stir well"""

EXPLAIN_SHOT_REPLY = """\
The marked words are baking ingredients and doughs; plain seasoning (salt) is not marked.
[EXPLANATION]: Words for flour, dough and other bread-baking ingredients."""

DETECT_SYSTEM = """\
You test an explanation of a latent (a learned feature) of a language model. You get the \
explanation and numbered text excerpts. For each excerpt, in order, decide whether the latent \
described by the explanation is active somewhere in it: 1 for yes, 0 for no. Reply with only a \
JSON list of 0s and 1s, one number per excerpt, and nothing else."""

DETECT_SHOT = """\
Explanation: Words for flour, dough and other bread-baking ingredients.

Excerpts:
Example 1: mix the yeast with warm water
Example 2: the meeting moved to Thursday
Example 3: roll the dough out thinly

Answer with a list of 3 numbers."""

DETECT_SHOT_REPLY = "[1, 0, 1]"

_EXPLANATION = re.compile(r"\[EXPLANATION\]\s*:\s*(.+)", re.IGNORECASE)
_LIST = re.compile(r"\[[^\[\]]*\]")


def explain_prompt(
    activating: Sequence[Context], negatives: Sequence[Context], threshold: float
) -> str:
    """The user message for the explainer: marked activating excerpts, then counterexamples."""
    top = max((c.peak for c in activating), default=0.0) or 1.0
    lines = ["ACTIVE EXCERPTS:"]
    for i, ctx in enumerate(activating, 1):
        text, hot = marked(ctx, threshold)
        lines.append(f"Example {i}: {text}")
        shown = ", ".join(
            f"{json.dumps(t.strip() or t)} {round(10 * a / top)}" for t, a in hot[:10]
        )
        lines.append(f"Activations: {shown}")
    if negatives:
        lines += ["", "INACTIVE EXCERPTS:"]
        if any(c.peak > 0 for c in negatives):  # a latent on nearly everywhere: its weakest rows
            lines.append("(the latent's weakest contexts: it fires weakly here, or not at all)")
        lines += [f"Example {i}: {plain_text(c.tokens)}" for i, c in enumerate(negatives, 1)]
    return "\n".join(lines)


def parse_explanation(text: str) -> str:
    """The sentence after the last ``[EXPLANATION]:``; :class:`ReplyError` when there is none."""
    found = _EXPLANATION.findall(text)
    explanation = found[-1].strip().strip('"').strip() if found else ""
    if not explanation:
        raise ReplyError(f"no '[EXPLANATION]: ...' line in the reply {text[:80]!r}")
    return explanation[:500]


def detect_prompt(explanation: str, texts: Sequence[Sequence[str]]) -> str:
    """The user message for the detection scorer: the explanation and unmarked excerpts."""
    lines = [f"Explanation: {explanation}", "", "Excerpts:"]
    lines += [f"Example {i}: {plain_text(t)}" for i, t in enumerate(texts, 1)]
    lines += ["", f"Answer with a list of {len(texts)} numbers."]
    return "\n".join(lines)


def parse_predictions(text: str, n: int) -> list[bool]:
    """The first ``[...]`` list in ``text`` as ``n`` booleans; :class:`ReplyError` otherwise."""
    match = _LIST.search(text)
    try:
        values = json.loads(match.group(0)) if match else None
    except ValueError:
        values = None
    if not isinstance(values, list) or len(values) != n or any(v not in (0, 1) for v in values):
        raise ReplyError(f"expected a list of {n} zeros and ones, got {text[:80]!r}")
    return [bool(v) for v in values]


def parse_probabilities(logprobs: list | None, n: int) -> list[float] | None:
    """P(1) / (P(0) + P(1)) at each answer token, from the reply's per-token top log-probabilities
    (as delphi reads them); ``None`` when the server sent none or they do not line up."""
    if not isinstance(logprobs, list):
        return None
    out = []
    try:
        for item in logprobs:
            if str(item["token"]).strip(" [],") not in ("0", "1"):
                continue
            mass = {"0": 0.0, "1": 0.0}
            for alt in item.get("top_logprobs") or []:
                digit = str(alt["token"]).strip(" [],")
                if digit in mass:
                    mass[digit] += math.exp(float(alt["logprob"]))
            total = mass["0"] + mass["1"]
            out.append(mass["1"] / total if total > 0 else None)
    except (KeyError, TypeError, ValueError):
        return None
    return out if len(out) == n and all(p is not None for p in out) else None


def _reply(raw: bytes) -> tuple[str, list | None]:
    try:
        choice = json.loads(raw)["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise Retryable(f"unparseable reply: {raw[:120]!r}") from None
    if not isinstance(text, str):
        raise Retryable(f"unparseable reply: {raw[:120]!r}")
    logprobs = (choice.get("logprobs") or {}).get("content")
    return text, logprobs


class LLMInterpreter:
    """Explains and detects with a chat model; one instance is shared by worker threads."""

    def __init__(self, cfg: AutoInterpConfig):
        self.cfg = cfg
        self.name = cfg.model
        self.client = ChatClient(
            cfg.model,
            base_url=cfg.url,
            api_key_env=cfg.api_key_env,
            max_retries=cfg.max_retries,
            timeout=cfg.timeout,
            backoff=cfg.backoff,
            error=AutoInterpError,
            who="autointerp",
            resume_hint="Latents finished so far are cached; rerun the same command to continue.",
        )

    def __repr__(self) -> str:
        return f"LLMInterpreter({self.client!r})"

    def _ask(self, messages: list[dict], **params) -> tuple[str, list | None]:
        try:
            return self.client.post({"messages": messages, "seed": 0, **params}, _reply)
        except Rejected as e:
            raise ReplyError(f"the server refused the request ({e})", retry=False) from None

    def explain(self, activating: Sequence[Context], negatives: Sequence[Context]) -> str:
        """One explanation of the latent behind ``activating`` (and not ``negatives``)."""
        messages = [
            {"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": EXPLAIN_SHOT},
            {"role": "assistant", "content": EXPLAIN_SHOT_REPLY},
            {"role": "user", "content": explain_prompt(activating, negatives, self.cfg.threshold)},
        ]
        text, _ = self._ask(
            messages, temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens
        )
        return parse_explanation(text)

    def detect(
        self, explanation: str, texts: Sequence[Sequence[str]]
    ) -> tuple[list[bool], list[float] | None]:
        """Whether the latent fires in each token list, and P(fires) when logprobs are on."""
        messages = [
            {"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": DETECT_SHOT},
            {"role": "assistant", "content": DETECT_SHOT_REPLY},
            {"role": "user", "content": detect_prompt(explanation, texts)},
        ]
        params: dict = {"temperature": 0, "max_tokens": 4 * len(texts) + 16}
        if self.cfg.logprobs:
            params |= {"logprobs": True, "top_logprobs": 5}
        text, logprobs = self._ask(messages, **params)
        predictions = parse_predictions(text, len(texts))
        probs = parse_probabilities(logprobs, len(texts)) if self.cfg.logprobs else None
        return predictions, probs
