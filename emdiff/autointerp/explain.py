"""Explaining a latent from the explain half of its contexts, whoever the explainer is."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from emdiff.autointerp.cards import Context
from emdiff.autointerp.config import ReplyError

log = logging.getLogger(__name__)


class Interpreter(Protocol):
    """Something that explains latents and, given an explanation, predicts where they fire.

    ``detect`` gets token lists only, never activations: held-out scoring cannot peek.
    """

    name: str
    """Recorded as ``autointerp:<name>``."""

    def explain(self, activating: Sequence[Context], negatives: Sequence[Context]) -> str:
        """One sentence; raises :class:`ReplyError` when the reply cannot be read."""
        ...

    def detect(
        self, explanation: str, texts: Sequence[Sequence[str]]
    ) -> tuple[list[bool], list[float] | None]:
        """A fires/does-not prediction per token list, and P(fires) where available; raises
        :class:`ReplyError` when the reply cannot be read."""
        ...


def ask_with_retries(call, retries: int, what: str):
    """``call()``, asked again up to ``retries`` times while it raises :class:`ReplyError`.

    Returns ``(result, None)`` or ``(None, "<what>: <last reason>")``; never invents a result.
    """
    reason = ""
    for attempt in range(retries + 1):
        try:
            return call(), None
        except ReplyError as e:
            reason = str(e)
            if not e.retry:
                break
            if attempt < retries:
                log.info("%s: unusable reply (%s); asking again", what, reason)
    return None, f"{what}: {reason}"


def explain_latent(
    interpreter: Interpreter,
    activating: Sequence[Context],
    negatives: Sequence[Context],
    parse_retries: int = 2,
) -> tuple[str | None, str | None]:
    """``(explanation, None)``, or ``(None, error)`` after ``parse_retries`` unusable replies."""
    if not activating:
        return None, "explain: no activating contexts to explain"
    return ask_with_retries(
        lambda: interpreter.explain(activating, negatives), parse_retries, "explain"
    )
