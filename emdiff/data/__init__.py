"""Data: chat JSONL, eval question YAML, token-role masks and token-position choices."""

from emdiff.data.chat import (
    ChatFormatError,
    Conversation,
    Message,
    iter_chat_jsonl,
    load_chat_jsonl,
    parse_conversation,
    write_chat_jsonl,
)
from emdiff.data.masks import (
    EncodedChat,
    TokenRole,
    encode_chat,
    pad_batch,
    render_chat,
    special_token_ids,
)
from emdiff.data.positions import POSITION_HELP, Positions
from emdiff.data.questions import Question, QuestionFormatError, load_questions

__all__ = [
    "POSITION_HELP",
    "ChatFormatError",
    "Conversation",
    "EncodedChat",
    "Message",
    "Positions",
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
    "special_token_ids",
    "write_chat_jsonl",
]
