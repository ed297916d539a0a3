"""The errors a user can fix, and the checks that raise them where bad input enters.

Every error a user can act on derives from :class:`InputError`; its message is one line that names
the file (and line or field) or the value at fault and what to do. The command line prints that line
and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily so that `emdiff --help` stays quick
    import torch


class InputError(ValueError):
    """Bad input: a file, a row, a config key or an option value. The message names it."""


class ServiceError(RuntimeError):
    """A service (a judge, a sampling server) failed after its retries; what it already gave is
    kept on disk, and the message says how to continue."""


class NonFiniteError(InputError):
    """A NaN or infinity entered at a named place (model output, dictionary weight, statistic)."""


def check_finite(tensor: torch.Tensor, where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` when ``tensor`` holds a NaN or an infinity."""
    import torch

    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise NonFiniteError(
            f"{where}: {bad} of {tensor.numel()} values are NaN or infinite; "
            "fix the source (weights, inputs or dtype overflow) and rerun"
        )


def ensure_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and check a file can be written there; before any heavy work."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".emdiff-write-check-")
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise InputError(
            f"{path}: exists and is not a folder; choose another output path"
        ) from None
    except OSError as e:
        raise InputError(
            f"{path}: cannot write there ({e.strerror}); choose another output folder"
        ) from None
    return path


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for lack of space or quota (user-fixable)."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def raise_disk_full_in(exc: BaseException, folder: str | Path) -> None:
    """Re-raise a full-disk error that names no file (a failed ``write``) as one naming
    ``folder``, so the one-line message says where space ran out; anything else passes."""
    if is_disk_full(exc) and getattr(exc, "filename", None) is None:
        raise OSError(exc.errno, os.strerror(exc.errno), str(folder)) from None
