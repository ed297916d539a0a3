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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from emdiff.errors import InputError
from emdiff.eval.judge import MIN_NUMBER_MASS, aggregate_0_100
from emdiff.readers import decode_utf8, read_bytes

REQUIRED = ("question_id", "question", "answer")
SCORES = ("aligned", "coherent")
_EMPTY = {"", "nan", "NaN", "None", "none", "null", "NA"}


class JudgedFileError(InputError):
    """A judged-response file (.csv, .jsonl, .json, .parquet) is malformed; names file and row."""


class JudgedCSVError(JudgedFileError):
    """A judged CSV is malformed; the message names the file and the line."""


def is_missing(value: Any) -> bool:
    """A missing score: None, NaN, ``<NA>``, or an empty / placeholder string (``"None"``, ...)."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip() in _EMPTY


def _parse_probs(value: Any, where: str, col: str, error=JudgedCSVError) -> dict[str, float]:
    if isinstance(value, str):
        text = value
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise error(f"{where}: column {col!r} is not a dict literal: {text[:80]!r}") from None
    if not isinstance(value, dict) or not all(
        isinstance(p, int | float) and not isinstance(p, bool) for p in value.values()
    ):
        raise error(f"{where}: column {col!r} must map tokens to probabilities")
    return {str(k): float(p) for k, p in value.items()}


def parse_score(value: Any, where: str, col: str, error=JudgedCSVError) -> float:
    """A score in 0..100 from a number or its text; anything else raises ``error`` naming
    ``where`` (``file:line`` or ``file: row i``) and the column."""
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise error(f"{where}: column {col!r} is not a number: {value[:40]!r}") from None
    elif isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    ):
        number = float(value)
    else:
        raise error(f"{where}: column {col!r} is not a number: {str(value)[:40]!r}")
    if not math.isfinite(number) or not 0 <= number <= 100:
        raise error(f"{where}: column {col!r} = {number} is outside 0..100")
    return number


def score_fields(
    raw: Mapping[str, Any], where: str, min_mass: float, source: str, error=JudgedCSVError
) -> dict:
    """``raw`` with ``aligned`` / ``coherent`` parsed (or computed from ``judge_<score>``) and
    ``<score>_source`` set to ``source`` (number given), ``judge`` or ``none``."""
    row = dict(raw)
    for col in SCORES:
        number, probs = raw.get(col), raw.get(f"judge_{col}")
        if not is_missing(number):
            row[col], row[f"{col}_source"] = parse_score(number, where, col, error), source
        elif not is_missing(probs):
            parsed = _parse_probs(probs, where, f"judge_{col}", error)
            row[col] = aggregate_0_100(parsed, min_mass)
            row[f"{col}_source"] = "judge" if row[col] is not None else "none"
        else:
            row[col], row[f"{col}_source"] = None, "none"
    return row


def numeric_scores(values: pd.Series, col: str, where: str = "judged responses") -> pd.Series:
    """``values`` as Float64 scores: missing ones (see :func:`is_missing`) become ``<NA>``, and
    a value that is not a number in 0..100 raises :class:`JudgedFileError` naming its row. This
    replaces ``pd.to_numeric(errors="coerce")``, which turns ``"5 (very bad)"`` into a silent NaN."""
    if is_numeric_dtype(values) and not is_bool_dtype(values):
        out = values.astype("Float64")
    else:
        out = pd.Series(
            pd.array(
                [
                    None
                    if is_missing(v)
                    else parse_score(v, f"{where}: row {i}", col, JudgedFileError)
                    for i, v in zip(values.index, values, strict=True)
                ],
                dtype="Float64",
            ),
            index=values.index,
        )
    bad = ((out < 0) | (out > 100)).fillna(False)
    if bad.any():
        i = bad[bad].index[0]
        raise JudgedFileError(f"{where}: row {i}: column {col!r} = {out[i]} is outside 0..100")
    return out


def read_judged_csv(path: str | Path, min_mass: float = MIN_NUMBER_MASS) -> pd.DataFrame:
    """The CSV as a DataFrame with ``aligned`` and ``coherent`` filled where possible.

    Adds ``<score>_source`` columns: ``csv`` (number given), ``judge`` (computed from the dict) or
    ``none``. Raises :class:`JudgedCSVError` naming ``file:line`` for any malformed row (the
    line where the row ends, for rows whose answer spans several lines).
    """
    path = Path(path)
    try:
        return _read_csv(path, min_mass)
    except UnicodeDecodeError:
        decode_utf8(read_bytes(path, JudgedCSVError), path, JudgedCSVError)  # names the byte
        raise


def _read_csv(path: Path, min_mass: float) -> pd.DataFrame:
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
        for c in SCORES:
            if c not in header and f"judge_{c}" not in header:
                raise JudgedCSVError(
                    f"{path}:1: no scores for {c!r}: need an {c!r} or a 'judge_{c}' column; "
                    f"header is {header}"
                )
        rows = []
        try:
            for raw in reader:
                where = f"{path}:{reader.line_num}"  # the row's last line (blank lines skipped)
                if None in raw or any(v is None for v in raw.values()):
                    raise JudgedCSVError(
                        f"{where}: wrong number of fields (header has {len(header)})"
                    )
                rows.append(score_fields(raw, where, min_mass, "csv"))
        except csv.Error as e:
            raise JudgedCSVError(f"{path}:{reader.line_num}: CSV syntax error: {e}") from None
    if not rows:
        raise JudgedCSVError(f"{path}: no rows below the header: nothing to score")
    df = pd.DataFrame(
        rows, columns=list(dict.fromkeys([*header, *SCORES, *(f"{c}_source" for c in SCORES)]))
    )
    for col in SCORES:
        df[col] = pd.array(df[col].tolist(), dtype="Float64")
    return df
