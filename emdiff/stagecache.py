"""A cache shared across run folders for stages whose inputs do not change between runs.

A run folder's own records (:mod:`emdiff.runstate`) let a rerun of the *same* folder resume. This
cache lets a *new* folder reuse an expensive stage that an earlier run computed from the same inputs
(the toy demo's ground truth and dictionaries: same shipped base, same LoRA settings). An entry is
``ROOT/<stage>/<key>/`` holding ``result.json`` and a copy of the stage's output folder. The key
given by the caller is combined with :func:`code_hash`, so any change to emdiff's code misses the
cache instead of returning a result the new code would not compute.

``ROOT`` is ``$EMDIFF_CACHE_DIR``, else ``$XDG_CACHE_HOME/emdiff``, else ``~/.cache/emdiff``.
Delete the folder to empty it; ``emdiff demo --no-cache`` neither reads nor writes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import emdiff


def default_root() -> Path:
    """Where the cache lives (see the module docstring)."""
    if env := os.environ.get("EMDIFF_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "emdiff"


@functools.cache
def code_hash() -> str:
    """Hash of every Python source file of the installed emdiff package."""
    root = Path(emdiff.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


class StageCache:
    """Finished stages by (name, key), each with the folder it wrote."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def _entry(self, name: str, key: str) -> Path:
        full = hashlib.sha256(f"{key}:{code_hash()}".encode()).hexdigest()[:20]
        return self.root / name / full

    def restore(self, name: str, key: str, dest: str | Path) -> dict | None:
        """Copy a cached stage's folder to ``dest`` (replacing it) and return its result; None
        when the cache has no complete entry for this key and code."""
        entry = self._entry(name, key)
        try:
            result = json.loads((entry / "result.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        dest = Path(dest)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(entry / "files", dest)
        return result

    def store(self, name: str, key: str, result: dict, src: str | Path) -> Path | None:
        """Save ``result`` and a copy of ``src``; an entry appears whole or not at all. A cache
        that cannot be written (read-only home, full disk) is skipped: it returns None."""
        entry = self._entry(name, key)
        tmp = entry.with_name(f".{entry.name}.{uuid.uuid4().hex[:8]}")
        try:
            shutil.copytree(src, tmp / "files")
            (tmp / "result.json").write_text(json.dumps(result, default=str))
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            return None
        return entry
