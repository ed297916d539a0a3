"""Explain and score every latent of a cards file, resumably, and write the results.

Reads ``RUN/cards/<name>.json``. Writes ``RUN/cards/explanations.json`` (records ``{"layer",
"latent", "explanation", "score", "source"}``, merged with what is there: a record with the same
layer, latent and source is replaced) and ``RUN/tables/autointerp.csv`` (detection counts per
latent, merged the same way). Each finished latent is appended to
``RUN/cards/autointerp_cache.jsonl`` the moment it is done, so an interrupted or failed run
continues where it stopped; a latent that failed is not cached and is asked again on a rerun.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm

from emdiff.analyses.cards_io import Explanation, write_explanations
from emdiff.atomicio import write_text_atomic
from emdiff.autointerp.cards import Card, load_cards, split_card
from emdiff.autointerp.config import AutoInterpConfig
from emdiff.autointerp.detect import Detection, score_detection
from emdiff.autointerp.explain import Interpreter, explain_latent
from emdiff.errors import ensure_writable

log = logging.getLogger(__name__)

EXPLANATIONS = "explanations.json"
CACHE = "autointerp_cache.jsonl"
TABLE = "autointerp.csv"
COLUMNS = (
    "cards",
    "layer",
    "site",
    "latent",
    "source",
    "explanation",
    "n_active",
    "n_inactive",
    "true_pos",
    "false_neg",
    "true_neg",
    "false_pos",
    "unparsed",
    "balanced_accuracy",
    "auc",
    "error",
)


class LatentResult(NamedTuple):
    """What auto-interpretation made of one latent."""

    layer: int
    site: str
    latent: int
    source: str
    """``autointerp:<model>``."""
    explanation: str | None
    """None when the explainer's replies could not be read."""
    detection: Detection | None
    """Held-out detection counts and scores; None when there was nothing to score."""
    error: str | None
    """One line saying what failed, or None."""

    @property
    def score(self) -> float | None:
        return self.detection.balanced_accuracy if self.detection else None

    @property
    def finished(self) -> bool:
        """Explained and scored: cached, never asked again."""
        return self.explanation is not None and self.score is not None

    def record(self) -> dict:
        """The ``explanations.json`` record."""
        score = None if self.score is None else round(self.score, 4)
        return {
            "layer": self.layer,
            "latent": self.latent,
            "explanation": self.explanation,
            "score": score,
            "source": self.source,
        }


class AutoInterpRun(NamedTuple):
    """Everything one call of :func:`run_autointerp` produced."""

    records: list[dict]
    """The records written to ``explanations.json`` (explained latents only)."""
    results: list[LatentResult]
    """One per card, failures included."""
    explanations: Path
    table: Path


# ---- one latent ---------------------------------------------------------------------------------
def interpret_card(interpreter: Interpreter, card: Card, cfg: AutoInterpConfig) -> LatentResult:
    """Split the card, explain from one half, score by detection on the other."""
    source = f"autointerp:{interpreter.name}"

    def result(explanation=None, detection=None, error=None) -> LatentResult:
        return LatentResult(
            card.layer, card.site, card.latent, source, explanation, detection, error
        )

    split = split_card(card, cfg.n_explain, cfg.n_holdout, cfg.seed)
    if not split.explain or not split.holdout or not split.holdout_negatives:
        return result(
            error=f"needs at least 2 activating and 2 non-activating contexts, has "
            f"{len(card.contexts)} and {len(card.negatives)}"
        )
    explanation, error = explain_latent(
        interpreter, split.explain, split.explain_negatives, cfg.parse_retries
    )
    if explanation is None:
        return result(error=error)
    detection = score_detection(
        interpreter,
        explanation,
        split.holdout,
        split.holdout_negatives,
        batch_size=cfg.batch_size,
        seed=f"{cfg.seed}/{card.layer}/{card.site}/{card.latent}",
        parse_retries=cfg.parse_retries,
    )
    if detection.balanced_accuracy is None:
        error = detection.error or "detection: nothing scored"
    elif detection.unparsed:
        error = f"{detection.unparsed} held-out contexts unscored ({detection.error})"
    return result(explanation, detection, error)


# ---- the cache ----------------------------------------------------------------------------------
def cache_key(source: str, cfg: AutoInterpConfig, card: Card) -> str:
    """Hash of the interpreter, the scoring settings and the card's contexts."""
    blob = json.dumps([source, cfg.scoring_identity(), card], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class ResultCache:
    """Finished latents, one JSON line each, appended as they finish (thread-safe)."""

    def __init__(self, path: Path):
        self.path, self._lock = path, threading.Lock()
        self._done: dict[str, LatentResult] = {}
        if path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            for n, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                    det = Detection(**row["detection"]) if row.get("detection") else None
                    fields = {k: row[k] for k in LatentResult._fields if k != "detection"}
                    self._done[row["key"]] = LatentResult(**fields, detection=det)
                except (ValueError, KeyError, TypeError):  # a line cut short by an interrupt
                    log.warning("%s:%d: unreadable cache line skipped", path, n)

    def get(self, key: str) -> LatentResult | None:
        return self._done.get(key)

    def put(self, key: str, result: LatentResult) -> None:
        row = {"key": key, **result._asdict()}
        row["detection"] = result.detection._asdict() if result.detection else None
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        self._done[key] = result


# ---- writing ------------------------------------------------------------------------------------
def _row(cards: str, r: LatentResult) -> dict:
    d = r.detection
    counts = {
        "n_active": d.n_active if d else "",
        "n_inactive": d.n_inactive if d else "",
        "true_pos": d.true_pos if d else "",
        "false_neg": d.false_neg if d else "",
        "true_neg": d.true_neg if d else "",
        "false_pos": d.false_pos if d else "",
        "unparsed": d.unparsed if d else "",
        "balanced_accuracy": "" if r.score is None else f"{r.score:.4f}",
        "auc": "" if d is None or d.auc is None else f"{d.auc:.4f}",
    }
    return {
        "cards": cards,
        "layer": r.layer,
        "site": r.site,
        "latent": r.latent,
        "source": r.source,
        "explanation": r.explanation or "",
        **counts,
        "error": r.error or "",
    }


def merge_table(path: Path, cards: str, results: list[LatentResult]) -> None:
    """Write the per-latent detection table, keeping other rows already in ``path``."""
    rows = [_row(cards, r) for r in results]
    new = {(str(r["layer"]), r["site"], str(r["latent"]), r["source"]) for r in rows}
    old = []
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as f:
            old = [
                r
                for r in csv.DictReader(f)
                if (r.get("layer"), r.get("site"), r.get("latent"), r.get("source")) not in new
            ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(old + rows)
    write_text_atomic(path, buf.getvalue())


# ---- the run ------------------------------------------------------------------------------------
def run_autointerp(
    cards_path: str | Path,
    cfg: AutoInterpConfig,
    *,
    interpreter: Interpreter | None = None,
    progress: bool = False,
) -> AutoInterpRun:
    """Explain and score every card of ``cards_path`` with ``interpreter`` (by default the chat
    model of ``cfg``); see the module docstring for what is written where."""
    from emdiff.autointerp.client import LLMInterpreter

    cards_path = Path(cards_path)
    _, cards = load_cards(cards_path)
    cards_dir, run = cards_path.parent, cards_path.parent.parent
    ensure_writable(cards_dir)
    ensure_writable(run / "tables")
    interp = interpreter if interpreter is not None else LLMInterpreter(cfg)
    source = f"autointerp:{interp.name}"
    cache = ResultCache(cards_dir / CACHE)
    keys = [cache_key(source, cfg, c) for c in cards]
    results: dict[int, LatentResult] = {}
    for i, k in enumerate(keys):
        hit = cache.get(k)
        if hit is not None:
            results[i] = hit
    todo = [i for i in range(len(cards)) if i not in results]
    bar = tqdm(total=len(todo), desc="explain", unit="latent", disable=not progress, leave=False)

    def task(i: int) -> None:
        r = interpret_card(interp, cards[i], cfg)
        if r.finished:
            cache.put(keys[i], r)
        elif r.error:
            log.warning("layer %d latent %d: %s", r.layer, r.latent, r.error)
        results[i] = r
        bar.update(1)

    try:
        _run_all(task, todo, cfg.concurrency)
    finally:
        bar.close()
    ordered = [results[i] for i in range(len(cards))]
    records = [r.record() for r in ordered if r.explanation is not None]
    failed = [(r.layer, r.latent, r.source) for r in ordered if r.explanation is None]
    write_explanations(
        cards_dir / EXPLANATIONS, [Explanation(**rec) for rec in records], stale=failed
    )
    table = run / "tables" / TABLE
    merge_table(table, cards_path.name, ordered)
    return AutoInterpRun(records, ordered, cards_dir / EXPLANATIONS, table)


def _run_all(task, todo: list[int], concurrency: int) -> None:
    """``task(i)`` for each ``i``; the first fatal error stops the rest (in-flight ones finish and
    are cached); an interrupt drops what has not started."""
    if concurrency == 1:
        for i in todo:
            task(i)
        return
    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="autointerp")
    try:
        pending = {pool.submit(task, i) for i in todo}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            failed = [f for f in finished if f.exception() is not None]
            if failed:
                for f in pending:
                    f.cancel()
                wait(pending)
                raise failed[0].exception()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def interpret_cards(
    cards_path: str | Path,
    cfg: AutoInterpConfig,
    *,
    interpreter: Interpreter | None = None,
    progress: bool = False,
) -> list[dict]:
    """Explain and score every latent of a cards file; returns the records written to
    ``RUN/cards/explanations.json`` (see :func:`run_autointerp`)."""
    return run_autointerp(cards_path, cfg, interpreter=interpreter, progress=progress).records
