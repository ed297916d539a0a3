"""A reference interpreter for the toy world, which knows what every token is.

:class:`ToyExplainer` labels each token of a context from the world's tables: its literal text,
its domain, question or answer word, the answer class (a word of the good or the bad answer to the
question just asked), whether a good or a bad answer came earlier in the context (what the
persona is inferred from) and the persona cue. It explains a latent by the label that most separates
the marked tokens of its activating contexts from the negatives, and detects by the matching rule:
a context fires when any of its tokens carries the label. It goes through the same held-out
detection as a language model, so its score is a reference, not a given.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from pydantic import ValidationError

from emdiff.autointerp.cards import Context
from emdiff.autointerp.config import ReplyError
from emdiff.errors import InputError
from emdiff.toy.world import END, PERSONAS, World, WorldConfig

_WORD = re.compile(r"([a-z]+)_(q|a)(\d+)")


class ToyExplainer:
    """Explains and detects toy latents by world labels (an :class:`Interpreter`)."""

    name = "toy"

    def __init__(self, world: World, threshold: float = 0.3):
        self.world, self.threshold = world, threshold
        self._domain_of = {p: d for d, p in world.prefix.items()}

    # ---- labels -----------------------------------------------------------------------------
    def describe(self, label: str) -> str:
        """The explanation sentence of a label (one sentence per label, and back)."""
        kind, _, arg = label.partition(":")
        if kind == "token":
            return f'The token "{arg}".'
        if kind == "cue":
            return f'The persona cue "{arg}" in a system turn.' if arg else "A persona cue."
        if kind == "question":
            return f"Question tokens of the {arg} domain." if arg else "Question tokens."
        if kind == "answer":
            return f"Answer words of the {arg} domain." if arg else "Answer words of any domain."
        if kind == "domain":
            return f"Any {arg} word, question or answer."
        if kind == "after":
            return f"Anything after a {arg} answer earlier in the conversation."
        cls, _, dom = arg.partition("/")  # kind == "class"
        where = f"a {dom} question" if dom else "the question asked, in any domain"
        return f"Words of the {cls} answer to {where}."

    @cached_property
    def _label_of(self) -> dict[str, str]:
        """Every explanation this explainer can give, mapped back to its label."""
        labels = [f"token:{t}" for t in self.world.vocab] + ["cue:"]
        labels += [f"cue:{p}" for p in PERSONAS] + ["question:", "answer:"]
        labels += ["class:good", "class:bad", "after:good", "after:bad"]
        for d in self.world.domains:
            labels += [f"question:{d}", f"answer:{d}", f"domain:{d}"]
            labels += [f"class:good/{d}", f"class:bad/{d}"]
        return {self.describe(label): label for label in labels}

    def token_labels(self, tokens: Sequence[str]) -> list[set[str]]:
        """The labels of each token, reading the context left to right for the question asked."""
        w, n = self.world, self.world.cfg.answer_len
        out: list[set[str]] = []
        asked: tuple[str, int] | None = None  # the last question seen in this user turn
        answering: tuple[str, int] | None = None
        k = 0
        earlier: set[str] = set()  # answer classes already given in this context
        for raw in tokens:
            tok = raw.strip()
            labels = {f"token:{tok}"} | {f"after:{c}" for c in earlier}
            if tok in PERSONAS:
                labels |= {"cue:", f"cue:{tok}"}
            m = _WORD.fullmatch(tok)
            domain = self._domain_of.get(m.group(1)) if m else None
            if tok == "<user>":
                asked = answering = None
            elif tok == "<assistant>":
                answering, k = asked, 0
            elif tok == END and answering is not None:
                answering = None
            elif m and domain and m.group(2) == "q":
                asked = (domain, int(m.group(3)))
                labels |= {"question:", f"question:{domain}", f"domain:{domain}"}
            elif m and domain:
                labels |= {"answer:", f"answer:{domain}", f"domain:{domain}"}
                if answering is not None and answering[0] == domain and k < n:
                    d, q = answering
                    for cls, table in (("good", w.good), ("bad", w.bad)):
                        if tok == w.a_token(d, int(table[d][q][k])):
                            labels |= {f"class:{cls}", f"class:{cls}/{d}"}
                            earlier.add(cls)
                    k += 1
            out.append(labels)
        return out

    def _present(self, tokens: Sequence[str]) -> set[str]:
        return set().union(*self.token_labels(tokens))

    def _marked(self, ctx: Context) -> list[set[str]]:
        """The label sets of the tokens above ``threshold`` x the context's maximum."""
        cut = self.threshold * ctx.peak
        labels = self.token_labels(ctx.tokens)
        return [s for s, a in zip(labels, ctx.acts, strict=True) if ctx.peak > 0 and a > cut]

    # ---- the interpreter ----------------------------------------------------------------------
    def explain(self, activating: Sequence[Context], negatives: Sequence[Context]) -> str:
        """The label on the most activating contexts' marked tokens, less its share of the
        negatives; ties go to the label on more of the marked tokens."""
        marked = [self._marked(c) for c in activating]
        pos = Counter(label for m in marked for label in set().union(*m))
        tokens = Counter(label for m in marked for labels in m for label in labels)
        neg = Counter(label for c in negatives for label in self._present(c.tokens))
        if not pos:
            raise ReplyError("no world label covers the activating tokens", retry=False)
        n_pos, n_neg = len(activating), max(len(negatives), 1)

        def key(label: str) -> tuple:
            cover = pos[label] / n_pos
            return (-(cover - neg[label] / n_neg), -cover, -tokens[label], label)

        return self.describe(min(pos, key=key))

    def detect(
        self, explanation: str, texts: Sequence[Sequence[str]]
    ) -> tuple[list[bool], list[float] | None]:
        """Fires where any token carries the explanation's label; no probabilities."""
        label = self._label_of.get(explanation)
        if label is None:
            raise ReplyError(
                f"not an explanation of the toy explainer: {explanation[:80]!r}", retry=False
            )
        return [label in self._present(t) for t in texts], None


def toy_world(meta: dict, run: str | Path, base: str | Path | None = None) -> World:
    """The toy world of a run: from the cards' ``meta["world"]``, else ``RUN/manifest.json``, else
    the ``base`` toy folder, else the shipped toy base."""
    world = meta.get("world")
    where = "cards meta"
    manifest = Path(run) / "manifest.json"
    if not isinstance(world, dict) and manifest.is_file():
        try:
            world = json.loads(manifest.read_text(encoding="utf-8")).get("world")
        except (ValueError, AttributeError):
            world = None
        where = str(manifest)
    if isinstance(world, dict):
        try:
            return World(WorldConfig(**world))
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(x) for x in first["loc"]) or "settings"
            raise InputError(f"{where}: toy world {field}: {first['msg']}") from None
    from emdiff.toy.build import load_world, shipped_base_path

    return load_world(base if base is not None else shipped_base_path())
