"""Feature-card files and the explanations file they share with auto-interpretation.

A run keeps its cards under ``RUN/cards/``: ``<name>.json`` (one per :class:`FeatureCards`
result, ``{"meta": {...}, "cards": [...]}``) and ``explanations.json``, a JSON list of records::

    {"layer": int, "latent": int, "explanation": str, "score": float | null, "source": str}

Whoever explains latents (auto-interpretation, a Neuronpedia import, a person) adds records with
:func:`write_explanations`, which merges: a record replaces the one with the same layer, latent
and source. A card shows the best record of its (layer, latent) as
``{"text", "score", "source"}``: the highest score, unscored ones below any score, the later
record on a tie. :func:`attach_explanations` writes that into a cards file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from emdiff.atomicio import write_text_atomic
from emdiff.errors import InputError
from emdiff.readers import read_json, read_text

EXPLANATIONS = "explanations.json"
"""File name of the explanations, beside the cards files."""

CARD_KEYS = (
    "layer",
    "site",
    "latent",
    "contexts",
    "negatives",
    "histogram",
    "logits",
    "stats",
    "explanation",
)


class Explanation(BaseModel):
    """One explanation of one latent (a record of ``explanations.json``; other keys are
    ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    layer: int = Field(ge=0)
    latent: int = Field(ge=0)
    explanation: str = Field(min_length=1)
    score: float | None = None
    """How well the explanation predicts the latent (higher is better), None when unscored."""
    source: str = Field(min_length=1)
    """Who wrote it: ``autointerp <model>``, ``neuronpedia <model>/<source>``, a name."""

    @field_validator("score")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number or null")
        return v

    def for_card(self) -> dict:
        """The card's ``explanation`` field."""
        return {"text": self.explanation, "score": self.score, "source": self.source}


def cards_folder(run: str | Path) -> Path:
    return Path(run) / "cards"


def explanations_path(run: str | Path) -> Path:
    """``RUN/cards/explanations.json``."""
    return cards_folder(run) / EXPLANATIONS


def cards_files(run: str | Path) -> list[Path]:
    """Every cards file of a run (``RUN/cards/*.json`` but the explanations), sorted."""
    folder = cards_folder(run)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.json") if p.name != EXPLANATIONS)


def _problem(e: ValidationError) -> str:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


def read_explanations(path: str | Path) -> list[Explanation]:
    """The records of an explanations file; a bad one fails naming the file and its index."""
    path = Path(path)
    try:
        rows = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise InputError(f"{path}: expected a JSON list of explanation records")
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(Explanation.model_validate(row))
        except ValidationError as e:
            raise InputError(f"{path}: record {i}: {_problem(e)}") from None
    return out


def write_explanations(
    path: str | Path,
    records: Iterable[Explanation],
    stale: Iterable[tuple[int, int, str]] = (),
) -> Path:
    """Merge ``records`` into the explanations file at ``path`` (created when missing),
    replacing those with the same layer, latent and source; ``stale`` (layer, latent, source)
    keys are dropped (a latent the same source could not explain from the current cards)."""
    path = Path(path)
    old = read_explanations(path) if path.exists() else []
    merged = {(e.layer, e.latent, e.source): e for e in old}
    for key in stale:
        merged.pop(key, None)
    for e in records:
        merged.pop((e.layer, e.latent, e.source), None)
        merged[(e.layer, e.latent, e.source)] = e
    rows = [e.model_dump() for e in merged.values()]
    return write_text_atomic(path, json.dumps(rows, indent=1, ensure_ascii=False) + "\n")


def best_explanations(records: Iterable[Explanation]) -> dict[tuple[int, int], Explanation]:
    """Per (layer, latent): the highest-scored record, unscored below any score, later on ties."""
    best: dict[tuple[int, int], Explanation] = {}

    def key(e: Explanation) -> tuple[bool, float]:
        return (e.score is not None, e.score or 0.0)

    for e in records:
        k = (e.layer, e.latent)
        if k not in best or key(e) >= key(best[k]):
            best[k] = e
    return best


def apply_explanations(doc: dict, records: Sequence[Explanation]) -> int:
    """Set each card's ``explanation`` in ``doc`` (a loaded cards file) from ``records``; cards
    without a record keep theirs. Returns how many cards got one."""
    best = best_explanations(records)
    n = 0
    for card in doc["cards"]:
        e = best.get((int(card["layer"]), int(card["latent"])))
        if e is not None:
            card["explanation"] = e.for_card()
            n += 1
    return n


def load_cards(path: str | Path) -> dict:
    """A cards file, checked for the keys every card has; a bad one names the file and card."""
    path = Path(path)
    doc = read_json(path)
    cards = doc.get("cards")
    if not isinstance(cards, list) or not isinstance(doc.get("meta"), dict):
        raise InputError(f"{path}: not a cards file (needs 'meta' and a 'cards' list)")
    for i, card in enumerate(cards):
        missing = [k for k in CARD_KEYS if not isinstance(card, dict) or k not in card]
        if missing:
            raise InputError(f"{path}: card {i}: missing {', '.join(missing)}")
    return doc


def save_cards(doc: dict, path: str | Path) -> Path:
    """Write a cards file (UTF-8, tokens as they are)."""
    return write_text_atomic(Path(path), json.dumps(doc, ensure_ascii=False))


def attach_explanations(
    cards_path: str | Path, explanations: Sequence[Explanation] | str | Path | None = None
) -> int:
    """Write the best explanation of each card into the cards file at ``cards_path``, from
    ``explanations`` (records, or an explanations file; default: the ``explanations.json``
    beside it). Returns how many cards got one; no file means none."""
    cards_path = Path(cards_path)
    if explanations is None:
        explanations = cards_path.with_name(EXPLANATIONS)
    if isinstance(explanations, str | Path):
        if not Path(explanations).exists():
            return 0
        explanations = read_explanations(explanations)
    doc = load_cards(cards_path)
    n = apply_explanations(doc, explanations)
    save_cards(doc, cards_path)
    return n
