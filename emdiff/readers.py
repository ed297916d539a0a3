"""Read input files so that any problem is an :class:`~emdiff.errors.InputError` naming the file.

Each reader takes the error class to raise (a subclass of ``InputError`` such as
``DictionaryFormatError``), so callers keep their own error type:

- :func:`read_text` / :func:`decode_utf8`: UTF-8 text; otherwise
  ``path: not UTF-8 text (byte 0xff at offset 57, line 3)``.
- :func:`read_json`: a JSON document, with ``path:line`` on a syntax error.
- :func:`load_safetensors`, :func:`load_npz`, :func:`load_state_dict`: tensors, where a truncated
  or corrupt file says so and names the file, and a NaN or infinity names the file and the tensor.
- :func:`check_safetensors_files`: the headers of every ``*.safetensors`` in a folder (a model or
  an adapter), which is where a truncated download shows.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from emdiff.errors import InputError, check_finite


def decode_utf8(data: bytes, path: str | Path, error: type[InputError] = InputError) -> str:
    """``data`` as text; a UTF-8 BOM is dropped. Bad bytes raise ``error`` with offset and line."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line})"
        ) from None


def read_bytes(path: str | Path, error: type[InputError] = InputError) -> bytes:
    """The file's bytes; a missing or unreadable file raises ``error`` naming it."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None


def read_text(path: str | Path, error: type[InputError] = InputError) -> str:
    """The file as UTF-8 text (see :func:`decode_utf8`)."""
    return decode_utf8(read_bytes(path, error), path, error)


def read_json(path: str | Path, error: type[InputError] = InputError) -> dict:
    """A JSON object from ``path``; syntax errors name ``path:line``."""
    try:
        value = json.loads(read_text(path, error))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def require(cfg: dict, key: str, path: str | Path, why: str, error: type[InputError]):
    """``cfg[key]``, or ``error`` saying the key is missing (``path: missing required key 'k'
    (topk architecture)``). For keys that have no publisher default: guessing one would give a
    wrong result silently."""
    if cfg.get(key) is None:
        raise error(f"{path}: missing required key {key!r} ({why})")
    return cfg[key]


def check_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """Raise :class:`~emdiff.errors.NonFiniteError` naming the file and tensor holding a NaN/inf."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            check_finite(t, f"{path}: tensor {name!r}")
    return tensors


def _corrupt(path: Path, kind: str, e: Exception, error: type[InputError]) -> InputError:
    detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return error(f"{path}: truncated or corrupt {kind} file ({detail[:160]}); download it again")


def load_safetensors(
    path: str | Path,
    error: type[InputError] = InputError,
    *,
    device: str = "cpu",
    finite: bool = True,
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; truncation, corruption and (``finite``) NaN/inf raise."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, "safetensors", e, error) from None
    return check_tensors(tensors, path) if finite else tensors


def load_npz(path: str | Path, error: type[InputError] = InputError) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` (never unpickled); a truncated or corrupt archive raises."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    if not zipfile.is_zipfile(path):  # else numpy reads any other bytes as a refused pickle
        raise error(f"{path}: truncated or corrupt npz file (not a zip archive); download it again")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k].copy() for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise _corrupt(path, "npz", e, error) from None
    except ValueError as e:  # object arrays (pickles), or a damaged array header
        raise error(f"{path}: not a plain-array npz file ({e})") from None
    for k, a in arrays.items():
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            check_finite(torch.from_numpy(a), f"{path}: array {k!r}")
    return arrays


def load_state_dict(path: str | Path, error: type[InputError] = InputError) -> dict:
    """A ``torch.save``'d state dict read with ``weights_only=True``; anything else raises."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise error(f"{path}: not a weights-only state dict ({first[:160]})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise _corrupt(path, "torch checkpoint", e, error) from None
    if not isinstance(state, dict):
        raise error(f"{path}: expected a state dict, got {type(state).__name__}")
    return check_tensors(state, path)


def check_safetensors_files(folder: str | Path, error: type[InputError] = InputError) -> None:
    """Open the header of every ``*.safetensors`` in ``folder``: a truncated or corrupt file raises
    naming it (safetensors checks that the header covers the whole file). Reads no tensor data."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise _corrupt(f, "safetensors", e, error) from None
