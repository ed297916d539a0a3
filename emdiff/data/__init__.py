"""Data: chat JSONL, eval question YAML, and token-role masks."""

from emdiff.data.chat import (
    ChatFormatError,
    Conversation,
    Message,
    iter_chat_jsonl,
    load_chat_jsonl,
    parse_conversation,
    write_chat_jsonl,
)
from emdiff.data.masks import EncodedChat, TokenRole, encode_chat, pad_batch, render_chat
from emdiff.data.questions import Question, QuestionFormatError, load_questions

__all__ = [
    "ChatFormatError",
    "Conversation",
    "EncodedChat",
    "Message",
    "Question",
    "QuestionFormatError",
    "TokenRole",
    "encode_chat",
    "iter_chat_jsonl",
    "load_chat_jsonl",
    "load_questions",
    "pad_batch",
    "parse_conversation",
    "render_chat",
    "write_chat_jsonl",
]
