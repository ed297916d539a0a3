"""Data: chat JSONL, eval question YAML, token-role masks and token-position choices."""

from emdiff.lazy import lazy_exports

_WHERE = {
    **dict.fromkeys(
        [
            "ChatFormatError",
            "Conversation",
            "Message",
            "iter_chat_jsonl",
            "load_chat_jsonl",
            "parse_conversation",
            "write_chat_jsonl",
        ],
        "chat",
    ),
    **dict.fromkeys(
        [
            "EncodedChat",
            "TokenRole",
            "encode_chat",
            "pad_batch",
            "render_chat",
            "special_token_ids",
        ],
        "masks",
    ),
    **dict.fromkeys(["POSITION_HELP", "Positions"], "positions"),
    **dict.fromkeys(["Question", "QuestionFormatError", "load_questions"], "questions"),
}
__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
