"""Feature cards in, contexts out: reading ``RUN/cards/<name>.json``, the explain/held-out split,
and the text a model is shown.

A cards file is ``{"meta": {...}, "cards": [{"layer", "site", "latent", "contexts", "negatives",
...}]}``; each context is ``{"tokens": [str], "acts": [float], "seq": int, "pos": int}``. Contexts
come sorted by maximum activation; negatives are contexts where the latent does not fire.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, NamedTuple

from emdiff.errors import InputError


class Context(NamedTuple):
    """A window of tokens with the latent's activation on each."""

    tokens: tuple[str, ...]
    acts: tuple[float, ...]
    seq: int
    """Index of the sequence the window comes from."""
    pos: int
    """Position of the window's maximum inside that sequence."""

    @property
    def peak(self) -> float:
        return max(self.acts, default=0.0)


class Card(NamedTuple):
    """One latent: where it lives and its activating and non-activating contexts."""

    layer: int
    site: str
    latent: int
    contexts: tuple[Context, ...]
    negatives: tuple[Context, ...]


class Split(NamedTuple):
    """A card's contexts, split so that the held-out ones never reach the explainer."""

    explain: list[Context]
    """Activating contexts shown to the explainer."""
    explain_negatives: list[Context]
    """Non-activating contexts shown to the explainer as counterexamples."""
    holdout: list[Context]
    """Activating contexts the scorer must find."""
    holdout_negatives: list[Context]
    """Non-activating contexts mixed in with them."""


def _context(raw: Any, where: str) -> Context:
    if not isinstance(raw, dict):
        raise InputError(f"{where}: expected an object with tokens, acts, seq and pos")
    tokens, acts = raw.get("tokens"), raw.get("acts")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise InputError(f"{where}: 'tokens' must be a list of strings")
    if not isinstance(acts, list) or len(acts) != len(tokens):
        raise InputError(f"{where}: 'acts' must be a list of numbers as long as 'tokens'")
    try:
        values = tuple(float(a) for a in acts)
    except (TypeError, ValueError):
        raise InputError(f"{where}: 'acts' must hold numbers") from None
    if not all(math.isfinite(a) for a in values):
        raise InputError(f"{where}: 'acts' holds NaN or infinity")
    seq, pos = raw.get("seq", -1), raw.get("pos", -1)
    if not isinstance(seq, int) or not isinstance(pos, int):
        raise InputError(f"{where}: 'seq' and 'pos' must be integers")
    return Context(tuple(tokens), values, seq, pos)


def load_cards(path: str | Path) -> tuple[dict, list[Card]]:
    """The ``meta`` object and the cards of a cards file; bad input names the file and card."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("cards"), list):
        raise InputError(
            f'{path}: expected a JSON object with a "cards" list (a feature-cards file)'
        )
    cards = []
    for i, raw in enumerate(data["cards"]):
        where = f"{path}: cards[{i}]"
        if not isinstance(raw, dict):
            raise InputError(f"{where}: expected an object")
        for key in ("layer", "latent"):
            if not isinstance(raw.get(key), int):
                raise InputError(f"{where}: missing or non-integer {key!r}")
        ctxs = raw.get("contexts", [])
        negs = raw.get("negatives", [])
        if not isinstance(ctxs, list) or not isinstance(negs, list):
            raise InputError(f"{where}: 'contexts' and 'negatives' must be lists")
        contexts = [_context(c, f"{where}.contexts[{j}]") for j, c in enumerate(ctxs)]
        contexts.sort(key=lambda c: -c.peak)  # keep to the format even if a writer did not
        negatives = [_context(c, f"{where}.negatives[{j}]") for j, c in enumerate(negs)]
        site = str(raw.get("site", ""))
        cards.append(Card(raw["layer"], site, raw["latent"], tuple(contexts), tuple(negatives)))
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
    return meta, cards


def _halves(items: list[Context], rng: random.Random) -> tuple[list[Context], list[Context]]:
    """Walk ``items`` in pairs and send one of each pair (by coin) to each half, so both halves
    span the whole activation range."""
    first, second = [], []
    for i in range(0, len(items), 2):
        pair = items[i : i + 2]
        if len(pair) == 2 and rng.random() < 0.5:
            pair.reverse()
        first.append(pair[0])
        second.extend(pair[1:])
    return first, second


def split_card(card: Card, n_explain: int, n_holdout: int, seed: int) -> Split:
    """Deterministic (seeded per latent) explain / held-out halves of a card's contexts.

    Activating contexts are taken in pairs down the activation order; one of each pair goes to the
    explainer, the other is held out. Negatives are halved the same way. Each half keeps its
    strongest ``n_explain`` (``n_holdout``) contexts.
    """
    rng = random.Random(f"{seed}/{card.layer}/{card.site}/{card.latent}")
    explain, holdout = _halves(list(card.contexts), rng)
    neg_explain, neg_holdout = _halves(list(card.negatives), rng)
    return Split(
        explain[:n_explain], neg_explain[:n_explain], holdout[:n_holdout], neg_holdout[:n_holdout]
    )


# ---- what the model sees --------------------------------------------------------------------------
def _spaced(tokens: tuple[str, ...]) -> bool:
    """Whether tokens carry their own spaces (BPE pieces like ``" the"``), not whole words."""
    return any(t[:1].isspace() for t in tokens[1:])


def _clean(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def plain_text(tokens: tuple[str, ...] | list[str]) -> str:
    """The context as one line of text: pieces joined as they are, whole words with spaces."""
    tokens = tuple(tokens)
    sep = "" if _spaced(tokens) else " "
    return _clean(sep.join(tokens)).strip()


def marked(ctx: Context, threshold: float) -> tuple[str, list[tuple[str, float]]]:
    """The context with runs of tokens above ``threshold`` x its maximum in ``<< >>``, and those
    tokens with their activations."""
    cut = threshold * ctx.peak
    sep = "" if _spaced(ctx.tokens) else " "
    parts: list[str] = []
    hot: list[tuple[str, float]] = []
    run: list[str] = []
    for tok, act in zip(ctx.tokens, ctx.acts, strict=True):
        if ctx.peak > 0 and act > cut:
            run.append(tok)
            hot.append((tok, act))
            continue
        if run:
            parts.append("<<" + sep.join(run) + ">>")
            run = []
        parts.append(tok)
    if run:
        parts.append("<<" + sep.join(run) + ">>")
    if sep:
        return _clean(" ".join(parts)).strip(), hot
    text = "".join(
        parts
    )  # move a piece's leading space outside its marker: "<< the>>" -> " <<the>>"
    return _clean(text.replace("<<" + " ", " <<")).strip(), hot
