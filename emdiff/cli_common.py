"""What every ``emdiff`` command shares: the error boundary, the up-front checks, option types.

A user-fixable problem ends a command with one line, ``error: <what and where>``, on stderr and
exit status 2; an interrupt with exit status 130. Anything else is a bug and keeps its traceback.
Commands check their options here before any model is loaded, so a typo costs seconds, not the
minutes a model takes to load.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from emdiff.errors import InputError, ServiceError, ensure_writable, is_disk_full

INTERRUPTED = "interrupted; rerun the same command to resume"
OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

# ---- shared option types -------------------------------------------------------------------------
Model = Annotated[str, typer.Option(help="Model folder or hub id (owner/name).")]
Adapter = Annotated[str | None, typer.Option(help="PEFT adapter folder or hub id.")]
Dtype = Annotated[str, typer.Option(help="auto, bfloat16, float16 or float32.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object as the last line.")]
Dictionary = Annotated[
    Path, typer.Option(help="Dictionary folder or file (SAELens, Gemma Scope, ...).")
]
Layer = Annotated[
    int | None, typer.Option(help="Decoder layer (default: the one the dictionary records).")
]
Out = Annotated[Path, typer.Option(help="Run folder for tables, plots and statistics.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Sequences per forward pass.")]
Top = Annotated[int, typer.Option(min=1, help="Rows of the ranking to print.")]
Site = Annotated[
    str | None,
    typer.Option(
        help="Hook site: resid_pre, attn_out, resid_mid, mlp_out or resid_post "
        "(default: the site the dictionary records)."
    ),
]
Positions = Annotated[
    str,
    typer.Option(
        help="Token positions: answer, answer_predicting, all, answer_first:K, answer_after:K, "
        "last; append ,sinks to keep attention sinks."
    ),
]


def default_of(model: type, field: str):
    """A config field's default, so the CLI never restates it."""
    return model.model_fields[field].default


# ---- failing with one line -----------------------------------------------------------------------
def one_line(message: object) -> str:
    """``message`` with its line breaks and runs of spaces folded into single spaces."""
    return " ".join(str(message).split())


def fail(message: object) -> NoReturn:
    """Print ``error: <message>`` on stderr and end the command with exit status 2."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(2)


def _decoding_file(exc: BaseException) -> str | None:
    """The file a ``UnicodeDecodeError`` came from: the innermost open text file in the traceback,
    else a local called ``path`` (or the like) holding a path."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, io.TextIOWrapper) and isinstance(value.name, str):
                return value.name
    for frame in reversed(frames):
        for key in ("path", "file", "filename", "filepath_or_buffer"):
            value = frame.f_locals.get(key)
            if isinstance(value, str | os.PathLike):
                return str(value)
    return None


def explain(exc: BaseException) -> str | None:
    """The one-line message for a user-fixable exception; None for a bug."""
    if isinstance(exc, InputError | ServiceError):
        return one_line(exc)
    if isinstance(exc, UnicodeDecodeError):
        bad = exc.object[exc.start : exc.start + 1].hex()
        what = f"not UTF-8 text (byte 0x{bad}: {exc.reason}); save it as UTF-8"
        name = _decoding_file(exc)
        return f"{name}: {what}" if name else f"an input file is {what}"
    if is_disk_full(exc):
        where = exc.filename or "the output folder"
        return (
            f"{where}: {exc.strerror}; free space or choose another --out, then rerun the same "
            "command (emdiff run: with --resume); the finished stages are kept"
        )
    if isinstance(exc, OS_ERRORS):
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return one_line(exc)
    return None


@contextmanager
def value_errors() -> Iterator[None]:
    """Report a plain ``ValueError`` from the wrapped library calls as one ``error:`` line.

    Some library functions still raise ``ValueError``, not :class:`InputError`, for bad input (a
    missing column, an empty dataset, a statistics folder made with another model). A
    ``UnicodeDecodeError`` (also a ``ValueError``) goes on to the boundary, which names the file.
    """
    try:
        yield
    except UnicodeDecodeError:
        raise
    except ValueError as e:
        fail(e)


class ErrorBoundary(TyperGroup):
    """The top-level group: turns user-fixable exceptions from any command into one line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            typer.echo(f"\n{INTERRUPTED}", err=True)
            raise typer.Exit(130) from None
        except (InputError, ServiceError, UnicodeDecodeError, OSError) as e:
            message = explain(e)
            if message is None:  # an OS error no user can fix: a bug, keep its traceback
                raise
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None


# ---- checks before anything is loaded ------------------------------------------------------------
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_file(option: str, path: Path) -> Path:
    """An input file that must exist."""
    if not path.exists():
        fail(f"{option} {path}: no such file")
    if path.is_dir():
        fail(f"{option} {path}: is a folder, not a file")
    return path


def check_exists(option: str, path: Path) -> Path:
    """An input that may be a file or a folder."""
    if not path.exists():
        fail(f"{option} {path}: no such file or folder")
    return path


def check_toy_base(option: str, path: Path | None) -> Path:
    """A toy model folder (``emdiff toy build`` output); None means the shipped one."""
    from emdiff.toy.build import TOY_META, shipped_base_path

    if path is None:
        return shipped_base_path()
    if not path.is_dir():
        fail(f"{option} {path}: no such folder")
    if not (path / TOY_META).is_file():
        fail(
            f"{option} {path}: not a toy model folder (no {TOY_META}); make one with emdiff toy build"
        )
    return path


def check_model(option: str, value: str, marker: str = "config.json", what: str = "model") -> str:
    """A local folder holding ``marker``, or a string that can only be a hub id ``owner/name``."""
    path = Path(value).expanduser()
    if path.exists():
        if not path.is_dir():
            fail(f"{option} {value}: is a file; pass the {what} folder")
        if not (path / marker).is_file():
            fail(
                f"{option} {value}: no {marker} in this folder; pass the folder that "
                f"save_pretrained wrote"
            )
        return str(path) if value.startswith("~") else value
    if not _HUB_ID.fullmatch(value) or ".." in value or "--" in value:
        fail(f"{option} {value}: no such folder, and not a hub id (owner/name)")
    return value


def check_adapter(option: str, value: str | None) -> str | None:
    """A PEFT adapter folder (with ``adapter_config.json``) or hub id; None passes."""
    if value is None:
        return None
    return check_model(option, value, marker="adapter_config.json", what="adapter")


def check_dtype(dtype: str, option: str = "--dtype") -> str:
    from emdiff.models.load import DTYPES

    if dtype != "auto" and dtype.lower().removeprefix("torch.") not in DTYPES:
        fail(f"{option} {dtype}: use auto, bfloat16, float16 or float32")
    return dtype


def check_device(device: str, option: str = "--device") -> str:
    """``cpu``, ``auto``, or a CUDA device that this machine can see."""
    import torch

    if device in ("cpu", "auto"):
        return device
    cuda = re.fullmatch(r"cuda(?::(\d+))?", device)
    if cuda is None:
        fail(f"{option} {device}: use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        fail(f"{option} {device}: no CUDA device is visible here; use --device cpu")
    n = torch.cuda.device_count()
    if cuda.group(1) is not None and int(cuda.group(1)) >= n:
        fail(f"{option} {device}: only {n} CUDA device(s) are visible (cuda:0 to cuda:{n - 1})")
    return device


def check_choice(option: str, value: str, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        fail(f"{option} {value}: use one of {', '.join(choices)}")
    return value


def check_out(path: Path, option: str = "--out") -> Path:
    """An output folder: created, and checked writable, before any heavy work."""
    try:
        return ensure_writable(path)
    except InputError as e:
        fail(f"{option} {e}")


def check_out_file(path: Path | None, option: str) -> Path | None:
    """An output file: not a folder, and its folder writable; None passes."""
    if path is None:
        return None
    if path.is_dir():
        fail(f"{option} {path}: is a folder; give a file name")
    check_out(path.parent, option)
    return path


def parse_ks(option: str, text: str) -> list[int]:
    """Comma-separated whole numbers >= 1 (``5,10,20``)."""
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        fail(f"{option} {text}: use comma-separated whole numbers >= 1, e.g. 5,10,20")
    return ks


def check_labels(label_a: str, label_b: str) -> None:
    """--label-a / --label-b name output files: distinct, and no path separators."""
    for option, label in (("--label-a", label_a), ("--label-b", label_b)):
        if not label or label in (".", "..") or any(c in label for c in "/\\\0"):
            fail(f"{option} {label!r}: used in file names; use letters, digits, - or _")
    if label_a == label_b:
        fail(f"--label-a and --label-b are both {label_a!r}; give the rankings different labels")


def config(cls: type, options: dict[str, str] | None = None, **values: Any):
    """Build a pydantic config from option values; a rejected value fails naming its option."""
    from pydantic import ValidationError

    try:
        return cls(**values)
    except ValidationError as e:
        options = options or {}
        parts = []
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            name = options.get(field, "--" + field.replace("_", "-")) if field else ""
            msg = str(err["msg"]).removeprefix("Value error, ")
            shown = f"{name} {err['input']}: {msg}" if field else msg
            parts.append(shown)
        fail("; ".join(parts))
