"""What a pipeline stage reads, named by content: file and folder fingerprints, and dictionaries
given as a SAELens-style release id resolved in a local cache.

A fingerprint is the SHA-256 of a file's bytes; a file over ``FULL_HASH_LIMIT`` (model shards of
many GB) is fingerprinted by its size and its first and last ``SAMPLE`` bytes, which any rewrite
of weights changes in practice; a folder is the hash of its files' relative paths and
fingerprints. A name that is not a local path (a hub id) is its own fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from emdiff.errors import InputError

FULL_HASH_LIMIT = 256 * 2**20
SAMPLE = 4 * 2**20
HUB_ORGS = {"gemma-scope": "google"}
"""Release prefix -> hub organisation, for releases named after their repository."""


@functools.cache
def _file_print(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: fh.read(2**20), b""):
                h.update(chunk)
        else:
            h.update(f"sampled:{size}:".encode())
            h.update(fh.read(SAMPLE))
            fh.seek(size - SAMPLE)
            h.update(fh.read(SAMPLE))
    return h.hexdigest()[:16]


def fingerprint(value: str | Path) -> str:
    """Content fingerprint of a file or folder; a non-path (hub id) is returned as it is."""
    path = Path(value)
    if path.is_file():
        st = path.stat()
        return _file_print(str(path.resolve()), st.st_size, st.st_mtime_ns)
    if path.is_dir():
        h = hashlib.sha256()
        for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(f"{p.relative_to(path)}:{fingerprint(p)};".encode())
        return h.hexdigest()[:16]
    return str(value)


def hub_cache() -> Path:
    """The Hugging Face hub cache folder (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or the default)."""
    if env := os.environ.get("HF_HUB_CACHE"):
        return Path(env)
    home = os.environ.get("HF_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "huggingface") / "hub"


def _repo_names(release: str) -> list[str]:
    """Hub repository folder names a release may live under (``models--org--name``)."""
    if "/" in release:
        org, name = release.split("/", 1)
        return [f"models--{org}--{name}"]
    org = next((o for prefix, o in HUB_ORGS.items() if release.startswith(prefix)), None)
    return [f"models--{org}--{release}"] if org else []


def resolve_release(release: str, sae_id: str, cache_dir: str | Path | None) -> Path:
    """The local folder of ``sae_id`` inside ``release``: ``cache_dir/<release>/<sae_id>``, or a
    hub cache snapshot ``cache_dir/models--org--name/snapshots/*/<sae_id>``. Nothing is
    downloaded; a miss names every place looked at."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else hub_cache()
    tried = [root / release / sae_id]
    for repo in _repo_names(release):
        snaps = sorted((root / repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
        tried += [s / sae_id for s in reversed(snaps)] or [root / repo / "snapshots/*" / sae_id]
    for p in tried:
        if p.is_dir():
            return p
    raise InputError(
        f"dictionary release {release!r} sae_id {sae_id!r}: not in the local cache (looked at "
        f"{', '.join(map(str, tried))}); download it there (huggingface-cli download) or give path"
    )
