"""Checks before a model or an adapter is loaded: the device, the path, the weight files.

Each failure is a :class:`ModelLoadError` (an :class:`~emdiff.errors.InputError`) that names the
option or the path, instead of a hub-lookup error about a mistyped folder, a CUDA assertion deep in
``from_pretrained``, or a ``SafetensorError`` that names no file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from emdiff.errors import InputError
from emdiff.readers import check_safetensors_files


class ModelLoadError(InputError):
    """A model or adapter cannot be loaded as given: path, device or weight file; names which."""


def check_device(device: str) -> None:
    """Refuse a device that is not there (``cuda`` without a visible GPU, ``cuda:3`` of two)."""
    if device in ("cpu", "auto"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(
            f"device={device!r} is not a device; use cpu, cuda, cuda:N, mps or auto"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(
                f"device={device!r}: no CUDA device is visible (torch.cuda.is_available() is "
                "False: a CPU-only torch build, no driver, or CUDA_VISIBLE_DEVICES is empty); "
                "use device 'cpu' or 'auto'"
            )
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ModelLoadError(
                f"device={device!r}: only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1})"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device={device!r}: MPS is not available here; use 'cpu'")


def looks_like_path(name: str | Path) -> bool:
    """True for names that can only be a local path: a hub id is ``name`` or ``org/name``."""
    s = str(name)
    return (
        isinstance(name, Path)
        or s in (".", "..")
        or s.startswith(("/", "./", "../", "~", ".\\"))
        or s.count("/") > 1
        or "\\" in s
    )


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_source(
    name: str | Path, what: str, marker: str, weights: tuple[str, ...] = ()
) -> Path | None:
    """The local folder ``name`` after checking it (exists, holds ``marker`` and, when given, one
    of the ``weights`` files, every ``*.safetensors`` header intact), or None for a hub id. A name
    that can only be a path and does not exist raises instead of being sent to the hub."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: is a file; pass the {what} folder (with {marker})")
        if not (path / marker).is_file():
            raise ModelLoadError(f"{path}: has no {marker}, so it is not a {what} folder")
        if weights and not any((path / w).is_file() for w in weights):
            raise ModelLoadError(
                f"{path}: has {marker} but no {' or '.join(weights)}; copy the {what}'s weight "
                "file into this folder"
            )
        check_safetensors_files(path, ModelLoadError)
        return path
    if looks_like_path(name):
        raise ModelLoadError(
            f"{name}: no such {what} folder (and not a hub id, which reads 'org/name')"
        )
    return None


def load_failed(name: str | Path, what: str, local: Path | None, e: Exception) -> ModelLoadError:
    """The error for a ``from_pretrained`` that failed on ``name``, with its first line."""
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if local is not None:
        return ModelLoadError(f"{local}: cannot load the {what}: {detail}")
    return ModelLoadError(
        f"{name}: not a local folder, and loading it as a hub id failed: {detail}"
    )


def check_tokenizer(tokenizer, source: str | Path) -> None:
    """Refuse a tokenizer that turns text into no tokens: what transformers builds for a folder
    without tokenizer files, which would otherwise select no token anywhere, silently."""
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        raise ModelLoadError(
            f"{source}: the tokenizer encodes text to no tokens (no tokenizer.json, "
            "tokenizer.model or vocab files here?); copy the base model's tokenizer files into it"
        )
