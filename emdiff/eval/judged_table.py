"""Read judged responses from any of the formats emdiff accepts, with the same rules for each.

``.csv`` (the original EM layout, :func:`~emdiff.eval.judged_csv.read_judged_csv`), ``.jsonl`` (one
object per line), ``.json`` (an array of objects, or pandas' column layout) and ``.parquet``. In
every format a score is a number in 0..100 (or its text); a missing score (null, NaN, empty) stays
missing, as the judge leaves it for refusals, and is computed from ``judge_<score>`` probabilities
when those are given. Anything else, such as ``"aligned": "5 (very bad)"``, is an error naming the
file, the line (or 0-based row for .json and .parquet) and the column. No row is dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from emdiff.eval.judge import MIN_NUMBER_MASS
from emdiff.eval.judged_csv import (
    SCORES,
    JudgedFileError,
    is_missing,
    read_judged_csv,
    score_fields,
)
from emdiff.readers import read_text

FORMATS = (".csv", ".jsonl", ".json", ".parquet")


def _jsonl_records(path: Path) -> list[tuple[str, dict]]:
    out = []
    for lineno, line in enumerate(read_text(path, JudgedFileError).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise JudgedFileError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise JudgedFileError(f"{path}:{lineno}: expected a JSON object per line")
        out.append((f"{path}:{lineno}", record))
    return out


def _json_records(path: Path) -> list[tuple[str, dict]]:
    text = read_text(path, JudgedFileError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise JudgedFileError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict):  # pandas' default layout: {column: {row: value}}
        try:
            data = pd.DataFrame(data).to_dict("records")
        except ValueError as e:
            raise JudgedFileError(f"{path}: not a table of columns ({e})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise JudgedFileError(f"{path}: expected an array of objects, one per response")
    return [(f"{path}: row {i}", r) for i, r in enumerate(data)]


def _parquet_records(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise JudgedFileError(f"{path}: no such file")
    try:
        df = pd.read_parquet(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise JudgedFileError(f"{path}: truncated or corrupt parquet file ({first})") from None
    return [(f"{path}: row {i}", r) for i, r in enumerate(df.to_dict("records"))]


def read_judged(
    path: str | Path,
    required: tuple[str, ...] = ("question", "answer", *SCORES),
    min_mass: float = MIN_NUMBER_MASS,
) -> pd.DataFrame:
    """Judged responses from ``path`` (.csv, .jsonl, .json or .parquet) as a DataFrame whose
    ``aligned`` / ``coherent`` are Float64 (``<NA>`` when missing), with ``<score>_source``.

    Raises :class:`~emdiff.eval.judged_csv.JudgedFileError` naming the file (and line or row,
    and column) for: an unknown suffix, an unreadable or non-UTF-8 file, no rows, a ``required``
    column absent from the file or from a row, a ``question`` / ``answer`` that is not text, and a
    score that is not a number in 0..100."""
    path = Path(path)
    if path.suffix == ".csv":
        df = read_judged_csv(path, min_mass)
        return _check_columns(df, path, required)
    readers = {".jsonl": _jsonl_records, ".json": _json_records, ".parquet": _parquet_records}
    if path.suffix not in readers:
        raise JudgedFileError(f"{path}: judged responses must be one of {', '.join(FORMATS)}")
    records = readers[path.suffix](path)
    if not records:
        raise JudgedFileError(f"{path}: no responses in the file: nothing to read")
    columns = list(dict.fromkeys(k for _, r in records for k in r))
    given = columns + [c for c in SCORES if f"judge_{c}" in columns]  # computed from the probs
    _check_columns(pd.DataFrame(columns=list(dict.fromkeys(given))), path, required)
    rows = []
    for where, record in records:
        for col in required:
            if col not in SCORES and col not in record:
                raise JudgedFileError(f"{where}: missing {col!r}")
        for col in ("question", "answer"):
            if col in required and not isinstance(record.get(col), str):
                value = record.get(col)
                shown = "missing" if is_missing(value) else f"{type(value).__name__} {value!r:.40}"
                raise JudgedFileError(f"{where}: column {col!r} must be text, got {shown}")
        rows.append(score_fields(record, where, min_mass, "file", JudgedFileError))
    order = list(dict.fromkeys([*columns, *SCORES, *(f"{c}_source" for c in SCORES)]))
    df = pd.DataFrame(rows, columns=order)
    for col in SCORES:
        df[col] = pd.array(df[col].tolist(), dtype="Float64")
    return df


def _check_columns(df: pd.DataFrame, path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise JudgedFileError(
            f"{path}: missing column(s) {missing}; it has {[str(c) for c in df.columns]}"
        )
    return df
