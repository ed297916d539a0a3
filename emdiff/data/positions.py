"""Which token positions a statistic reads: a small, exact selector over encoded chats.

An *answer* is a maximal contiguous run of ASSISTANT tokens, so a multi-turn chat has several.
No kind ever selects BOS; every kind but ``answer_predicting`` and ``last`` also skips special
tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from emdiff.data.masks import EncodedChat, TokenRole
from emdiff.errors import InputError

Kind = Literal["answer", "answer_predicting", "all", "answer_first", "answer_after", "last"]
_WITH_K = ("answer_first", "answer_after")
_ALIASES = {"last_prompt": "answer_predicting"}
FORMS = "answer, answer_predicting (or last_prompt), all, answer_first:K, answer_after:K, last"

POSITION_HELP = """\
answer              every answer (assistant) token [default]
answer_predicting   the last prompt token before each answer, whose prediction is the answer's
                    first token (alias last_prompt); a prompt-only row gives its last token
all                 every token that is not special (template markers, BOS, EOS, pad);
                    on plain token-id rows (no chat template) every token but BOS
answer_first:K      the first K tokens of each answer
answer_after:K      the answer tokens after the first K of each answer
last                the last token of each row: on a chat that ends in a generation prompt,
                    where the model decides its next answer (after reading the turns before)
append ,sinks       keep attention-sink tokens (by default the stats pass drops them by norm)"""


class Positions(BaseModel):
    """A choice of token positions; ``Positions.parse("answer_first:8")``, ``str()`` gives it back.

    Syntax: ``KIND[:K][,sinks]`` with KIND one of answer, answer_predicting (alias last_prompt),
    all, answer_first, answer_after, last; ``:K`` (an integer >= 1) only and always for answer_first /
    answer_after; ``,sinks`` sets ``exclude_sinks=False``. ``exclude_sinks`` is applied by the
    stats pass at run time (norm-based), not by :meth:`mask`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Kind = "answer"
    k: int | None = Field(None, ge=1)
    exclude_sinks: bool = True

    @model_validator(mode="after")
    def _k_matches_kind(self) -> Positions:
        if self.kind in _WITH_K and self.k is None:
            raise ValueError(f"{self.kind} needs k >= 1 (written {self.kind}:8)")
        if self.kind not in _WITH_K and self.k is not None:
            raise ValueError(
                f"{self.kind} takes no k (got {self.k}); only {' and '.join(_WITH_K)} do"
            )
        return self

    def __str__(self) -> str:
        return (
            self.kind
            + (f":{self.k}" if self.k is not None else "")
            + ("" if self.exclude_sinks else ",sinks")
        )

    @classmethod
    def parse(cls, text: str) -> Positions:
        """Read ``KIND[:K][,sinks]``; raise :class:`InputError` naming the valid forms."""
        body, comma, flag = str(text).strip().lower().partition(",")
        name, colon, num = (p.strip() for p in body.partition(":"))
        name = _ALIASES.get(name, name)

        def bad(why: str) -> InputError:
            return InputError(f"positions {text!r}: {why}; valid: {FORMS}, each optionally ,sinks")

        if comma and flag.strip() != "sinks":
            raise bad(f"unknown suffix {flag.strip()!r}")
        if name not in get_args(Kind):
            raise bad(f"unknown kind {name!r}")
        if colon and not num.isdigit():
            raise bad(f"K must be a whole number >= 1, got {num!r}")
        try:
            return cls(kind=name, k=int(num) if colon else None, exclude_sinks=not comma)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            why = err["msg"].removeprefix("Value error, ")
            raise bad(f"{where}: {why}" if where else why) from None

    def mask(self, row: EncodedChat | Sequence[int], bos_token_id: int | None = None) -> list[bool]:
        """True at the selected positions of ``row``.

        BOS is ``bos_token_id`` when given, else a special first token. Plain id rows (no roles)
        allow only ``all``: every token but BOS.
        """
        if not isinstance(row, EncodedChat):
            if self.kind != "all":
                raise InputError(
                    f"positions {self}: plain text rows have no answer tokens; use positions all"
                )
            return [t != bos_token_id for t in row]
        ids, n = row.input_ids, len(row.input_ids)
        special = row.special if row.special is not None else [False] * n
        bos = [t == bos_token_id for t in ids]
        if n and special[0]:
            bos[0] = True
        if self.kind == "all":
            return [not (s or b) for s, b in zip(special, bos, strict=True)]
        out = [False] * n
        if self.kind == "last":
            if n:
                out[-1] = not bos[-1]
            return out
        runs = _answer_runs(row.roles)
        if self.kind == "answer_predicting":
            picks = [a - 1 for a, _ in runs if a > 0] if runs else [n - 1] * (n > 0)
            for i in picks:
                out[i] = not bos[i]
            return out
        for a, b in runs:
            if self.kind == "answer_first":
                b = min(b, a + self.k)  # type: ignore[operator]
            elif self.kind == "answer_after":
                a = min(b, a + self.k)  # type: ignore[operator]
            for i in range(a, b):
                out[i] = not (special[i] or bos[i])
        return out


def _answer_runs(roles: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each maximal run of ASSISTANT tokens."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, r in enumerate([*roles, -1]):
        if r == TokenRole.ASSISTANT and start is None:
            start = i
        elif r != TokenRole.ASSISTANT and start is not None:
            runs.append((start, i))
            start = None
    return runs
