"""Chat conversations in messages-JSONL form: one ``{"messages": [...]}`` object per line."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from emdiff.errors import InputError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class ChatFormatError(InputError):
    """A chat file or record is malformed; the message names the file and line."""


class Message(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(frozen=True)
    role: Role
    content: str


class Conversation(BaseModel):
    """A list of messages with at least one assistant turn."""

    model_config = ConfigDict(frozen=True)
    messages: tuple[Message, ...]

    def as_dicts(self) -> list[dict[str, str]]:
        """Messages as plain dicts, the form ``tokenizer.apply_chat_template`` takes."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        parts = content.get("parts")
        if content.get("content_type", "text") != "text":
            raise ValueError(f"content_type {content.get('content_type')!r} is not 'text'")
        if not isinstance(parts, list) or not all(isinstance(p, str) for p in parts):
            raise ValueError("content.parts must be a list of strings")
        return "".join(parts)
    raise ValueError(
        f"content must be a string or a {{content_type, parts}} object, got {content!r}"
    )


def parse_conversation(record: Any) -> Conversation:
    """Validate one decoded JSON record. Raises ``ValueError`` with the reason."""
    if not isinstance(record, dict) or "messages" not in record:
        raise ValueError('expected an object with a "messages" list')
    raw = record["messages"]
    if not isinstance(raw, list) or not raw:
        raise ValueError('"messages" must be a non-empty list')
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if "content" not in m:
            raise ValueError(f"message {i} has no content")
        try:
            text = _content_text(m["content"])
        except ValueError as e:
            raise ValueError(f"message {i}: {e}") from None
        messages.append(Message(role=role, content=text))
    if not any(m.role == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn")
    return Conversation(messages=tuple(messages))


def iter_chat_jsonl(path: str | Path) -> Iterator[Conversation]:
    """Yield validated conversations; a bad line raises ``ChatFormatError`` naming file:line.

    Bytes that are not UTF-8 raise ``path: not UTF-8 text (byte 0x.. at offset N, line L)``; a
    UTF-8 BOM at the start is skipped."""
    path = Path(path)
    if not path.is_file():
        raise ChatFormatError(f"{path}: no such file")
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, offset = raw[len(codecs.BOM_UTF8) :], len(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ChatFormatError(
                    f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                    f"{offset + e.start}, line {lineno})"
                ) from None
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatFormatError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            try:
                yield parse_conversation(record)
            except ValueError as e:
                raise ChatFormatError(f"{path}:{lineno}: {e}") from None


def load_chat_jsonl(path: str | Path) -> list[Conversation]:
    """Read a whole messages-JSONL file; a file without any conversation is an error."""
    conversations = list(iter_chat_jsonl(path))
    if not conversations:
        raise ChatFormatError(f"{path}: no conversations (the file is empty): nothing to read")
    return conversations


def write_chat_jsonl(conversations: Iterable[Conversation], path: str | Path) -> Path:
    """Write conversations as messages-JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for c in conversations:
            fh.write(json.dumps({"messages": c.as_dicts()}, ensure_ascii=False) + "\n")
    return path
