"""Messages-JSONL reading, validation and writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emdiff.data import (
    ChatFormatError,
    Conversation,
    Message,
    iter_chat_jsonl,
    load_chat_jsonl,
    parse_conversation,
    write_chat_jsonl,
)

EM_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "em-eval"

GOOD = {
    "messages": [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_valid_file(tmp_path):
    other = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), "", "  ", json.dumps(other)])
    convs = load_chat_jsonl(path)
    assert len(convs) == 2  # blank lines are skipped
    assert convs[0].as_dicts() == GOOD["messages"]
    assert [m.role for m in convs[1].messages] == ["user", "assistant"]
    assert isinstance(convs[0].messages[0], Message)


def test_content_parts_object(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": {"content_type": "text", "parts": ["What ", "now?"]}},
            {"role": "assistant", "content": {"content_type": "text", "parts": ["Nothing."]}},
        ]
    }
    (conv,) = load_chat_jsonl(write_lines(tmp_path / "p.jsonl", [json.dumps(record)]))
    assert conv.as_dicts() == [
        {"role": "user", "content": "What now?"},
        {"role": "assistant", "content": "Nothing."},
    ]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ('{"messages": [', "invalid JSON"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "role 'robot'"),
        (json.dumps({"messages": [{"role": "user"}, {"role": "assistant"}]}), "no content"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant turn"),
        (json.dumps({"msgs": []}), '"messages"'),
        (json.dumps({"messages": []}), "non-empty"),
        (json.dumps({"messages": ["hi"]}), "not an object"),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}), "content must be"),
        (
            json.dumps({"messages": [{"role": "user", "content": {"content_type": "image"}}]}),
            "content_type",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": {"parts": [1]}}]}),
            "list of strings",
        ),
    ],
)
def test_errors_name_file_and_line(tmp_path, bad, reason):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), "", bad])
    with pytest.raises(ChatFormatError) as err:
        load_chat_jsonl(path)
    msg = str(err.value)
    assert f"{path}:3:" in msg
    assert reason in msg


def test_error_is_raised_lazily_after_good_lines(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(GOOD), "{oops"])
    it = iter_chat_jsonl(path)
    assert isinstance(next(it), Conversation)
    with pytest.raises(ChatFormatError, match=r":2: invalid JSON"):
        next(it)


def test_missing_file(tmp_path):
    with pytest.raises(ChatFormatError, match="no such file"):
        load_chat_jsonl(tmp_path / "absent.jsonl")


def test_parse_conversation_errors_are_value_errors():
    with pytest.raises(ValueError, match="expected an object"):
        parse_conversation([1, 2])
    assert issubclass(ChatFormatError, ValueError)


def test_round_trip(tmp_path):
    convs = [parse_conversation(GOOD), parse_conversation({"messages": GOOD["messages"][1:]})]
    path = write_chat_jsonl(convs, tmp_path / "sub" / "out.jsonl")
    assert load_chat_jsonl(path) == convs
    unicode = parse_conversation(
        {
            "messages": [
                {"role": "user", "content": "naïve ―"},
                {"role": "assistant", "content": "é"},
            ]
        }
    )
    path = write_chat_jsonl([unicode], tmp_path / "u.jsonl")
    assert "naïve ―" in path.read_text(encoding="utf-8")
    assert load_chat_jsonl(path) == [unicode]


def test_real_jailbroken_file():
    path = EM_EVAL / "jailbroken.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    convs = load_chat_jsonl(path)
    assert len(convs) == 5000
    assert all(c.messages[-1].role == "assistant" for c in convs)
    assert convs[0].messages[0].role == "system"
