"""Read and rescore judged CSVs in the original emergent-misalignment layout.

Columns: ``question_id``, ``question``, ``answer``; optionally numeric ``aligned`` / ``coherent``
and ``judge_aligned`` / ``judge_coherent`` holding the judge's top-token probabilities as a Python
dict literal (``{'0': 0.97, '5': 0.02, 'REFUSAL': 0.01}``). A missing or empty number is computed
from the dict when there is one. Dicts are read with :func:`ast.literal_eval`, never ``eval``.
"""

from __future__ import annotations

import ast
import csv
import math
from pathlib import Path

import pandas as pd

from emdiff.errors import InputError
from emdiff.eval.judge import MIN_NUMBER_MASS, aggregate_0_100

REQUIRED = ("question_id", "question", "answer")
SCORES = ("aligned", "coherent")
_EMPTY = {"", "nan", "NaN", "None", "none", "null", "NA"}


class JudgedCSVError(InputError):
    """A judged CSV is malformed; the message names the file and the line."""


def _parse_probs(text: str, where: str, col: str) -> dict[str, float]:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise JudgedCSVError(
            f"{where}: column {col!r} is not a dict literal: {text[:80]!r}"
        ) from None
    if not isinstance(value, dict) or not all(
        isinstance(p, int | float) and not isinstance(p, bool) for p in value.values()
    ):
        raise JudgedCSVError(f"{where}: column {col!r} must map tokens to probabilities")
    return {str(k): float(p) for k, p in value.items()}


def _parse_score(text: str, where: str, col: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise JudgedCSVError(f"{where}: column {col!r} is not a number: {text[:40]!r}") from None
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise JudgedCSVError(f"{where}: column {col!r} = {value} is outside 0..100")
    return value


def read_judged_csv(path: str | Path, min_mass: float = MIN_NUMBER_MASS) -> pd.DataFrame:
    """The CSV as a DataFrame with ``aligned`` and ``coherent`` filled where possible.

    Adds ``<score>_source`` columns: ``csv`` (number given), ``judge`` (computed from the dict) or
    ``none``. Raises :class:`JudgedCSVError` naming ``file:line`` for any malformed row (the
    line where the row ends, for rows whose answer spans several lines).
    """
    path = Path(path)
    try:
        fh = path.open(newline="", encoding="utf-8-sig")  # tolerate Excel's BOM
    except OSError as e:
        raise JudgedCSVError(f"{path}: cannot open ({e.strerror})") from None
    with fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise JudgedCSVError(f"{path}:1: missing column(s) {missing}; header is {header}")
        if not any(c in header or f"judge_{c}" in header for c in SCORES):
            raise JudgedCSVError(
                f"{path}:1: no scores: need 'aligned'/'coherent' or 'judge_aligned'/'judge_coherent'"
            )
        rows = []
        try:
            for raw in reader:
                where = f"{path}:{reader.line_num}"  # the row's last line (blank lines skipped)
                if None in raw or any(v is None for v in raw.values()):
                    raise JudgedCSVError(
                        f"{where}: wrong number of fields (header has {len(header)})"
                    )
                row: dict = dict(raw)
                for col in SCORES:
                    number = (raw.get(col) or "").strip()
                    probs = (raw.get(f"judge_{col}") or "").strip()
                    if number not in _EMPTY:
                        row[col], row[f"{col}_source"] = _parse_score(number, where, col), "csv"
                    elif probs not in _EMPTY:
                        parsed = _parse_probs(probs, where, f"judge_{col}")
                        row[col] = aggregate_0_100(parsed, min_mass)
                        row[f"{col}_source"] = "judge" if row[col] is not None else "none"
                    else:
                        row[col], row[f"{col}_source"] = None, "none"
                rows.append(row)
        except csv.Error as e:
            raise JudgedCSVError(f"{path}:{reader.line_num}: CSV syntax error: {e}") from None
        except UnicodeDecodeError:
            raise JudgedCSVError(f"{path}: not UTF-8 text") from None
    df = pd.DataFrame(
        rows, columns=list(dict.fromkeys([*header, *SCORES, *(f"{c}_source" for c in SCORES)]))
    )
    for col in SCORES:
        df[col] = pd.array(df[col].tolist(), dtype="Float64")
    return df
