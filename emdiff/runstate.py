"""Stage records of a run folder: what finished, with which inputs, so a rerun resumes.

Each stage has a key, the hash of everything that decides its result (settings, input hashes, the
keys of the stages it reads). ``stages/<name>.json`` holds ``{key, status, result}``:

- ``begin`` marks a stage as running; when the record holds another key, the stage's folders are
  emptied first (other settings: their files are stale), otherwise they are kept, so a stage that
  resumes on its own (sampling, dictionary checkpoints) picks up where it stopped;
- ``finish`` stores the stage's JSON result; ``result`` returns it on a rerun with the same key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from emdiff.atomicio import write_text_atomic
from emdiff.errors import InputError


def stage_key(inputs: Any) -> str:
    """A short, stable hash of JSON-serialisable stage inputs."""
    text = json.dumps(inputs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunState:
    """The stage records under ``folder/stages``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.records = self.folder / "stages"
        self.records.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.records / f"{name}.json"

    def _read(self, name: str) -> dict | None:
        path = self._path(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path}:{e.lineno}: unreadable stage record ({e.msg}); delete it to redo the stage"
            ) from None

    def _write(self, name: str, record: dict) -> None:
        write_text_atomic(self._path(name), json.dumps(record, indent=2, default=str))

    def result(self, name: str, key: str) -> dict | None:
        """The stored result of a finished stage with this key, else None."""
        rec = self._read(name)
        if rec and rec.get("key") == key and rec.get("status") == "done":
            return rec["result"]
        return None

    def begin(self, name: str, key: str, folders: tuple[Path, ...] = ()) -> bool:
        """Mark ``name`` running; empty ``folders`` unless they belong to this key. True: resumed."""
        rec = self._read(name)
        resumed = rec is not None and rec.get("key") == key
        if not resumed:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
        self._write(name, {"key": key, "status": "running"})
        return resumed

    def finish(self, name: str, key: str, result: dict) -> dict:
        """Record ``name`` as done with ``result`` (JSON-serialisable); returns it."""
        self._write(name, {"key": key, "status": "done", "result": result})
        return result

    def summary(self) -> dict[str, str]:
        """Stage name -> status, for messages."""
        out = {}
        for path in sorted(self.records.glob("*.json")):
            rec = self._read(path.stem) or {}
            out[path.stem] = str(rec.get("status", "unknown"))
        return out
