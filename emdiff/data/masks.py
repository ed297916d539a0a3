"""Token roles: apply a chat template and mark every token as system, user, answer or template.

Statistics read only answer tokens by default, and fine-tuning puts its loss on them, so the role
of each token must be exact for every chat template (Qwen2, Gemma2, Llama, the toy). The method is
template-agnostic: render the conversation to text, find each message's content in the rendered
string in order, and give a token the role of the content its character span overlaps. A second
render with marker contents tells where each content must start, so content that also occurs in
the template (a role name, a date in a preamble) is not matched inside a header.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch


class TokenRole(IntEnum):
    """Who a token belongs to. TEMPLATE covers BOS, role headers and end-of-turn markers."""

    TEMPLATE = 0
    SYSTEM = 1
    USER = 2
    ASSISTANT = 3


def role_names(roles: Sequence[TokenRole | int]) -> str:
    """``"assistant"`` or ``"user, assistant"``: roles as a user wrote them, for messages."""
    return ", ".join(TokenRole(int(r)).name.lower() for r in roles) or "assistant"


_ROLE_OF = {"system": TokenRole.SYSTEM, "user": TokenRole.USER, "assistant": TokenRole.ASSISTANT}


@dataclass(frozen=True)
class EncodedChat:
    """A tokenised conversation with one role per token.

    ``special[i]`` is True where token ``i`` is a special token of the tokenizer (BOS, turn
    markers, EOS, pad; see :func:`special_token_ids`); None means no token is special.
    """

    input_ids: list[int]
    roles: list[int]
    special: list[bool] | None = None

    def __post_init__(self) -> None:
        if self.special is not None and len(self.special) != len(self.input_ids):
            raise ValueError(
                f"EncodedChat: special has {len(self.special)} flags for "
                f"{len(self.input_ids)} tokens; give one per token or None"
            )

    def mask(self, *roles: TokenRole) -> list[bool]:
        """True where the token's role is one of ``roles`` (default: answer tokens)."""
        wanted = {int(r) for r in roles} or {int(TokenRole.ASSISTANT)}
        return [r in wanted for r in self.roles]

    def loss_mask(self) -> list[bool]:
        """Answer tokens plus the template token right after each answer (its end-of-turn).

        Training on the end-of-turn token teaches the model to stop; statistics leave it out.
        """
        out = self.mask(TokenRole.ASSISTANT)
        for i in range(1, len(out)):
            if self.roles[i - 1] == TokenRole.ASSISTANT and self.roles[i] == TokenRole.TEMPLATE:
                out[i] = True
        return out


def _fold_system(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Merge a leading system message into the first user turn (for templates like Gemma's)."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0]["role"] == "system" and len(msgs) > 1 and msgs[1]["role"] == "user":
        sys_msg = msgs.pop(0)
        msgs[0]["content"] = sys_msg["content"] + "\n\n" + msgs[0]["content"]
        msgs[0]["_system"] = sys_msg["content"]
    return msgs


def render_chat(
    tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
) -> tuple[str, list[dict[str, str]]]:
    """Render with the tokenizer's chat template; fold the system prompt if the template refuses it.

    Returns the text and the messages as rendered (with a ``_system`` key where one was folded).
    """
    msgs = [dict(m) for m in messages]
    try:
        text = tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises TemplateError for "System role not supported"
        if not (msgs and msgs[0]["role"] == "system" and "system" in str(e).lower()):
            raise
        msgs = _fold_system(msgs)
        clean = [{"role": m["role"], "content": m["content"]} for m in msgs]
        text = tokenizer.apply_chat_template(
            clean, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    return text, msgs


def _template_prefixes(
    tokenizer, msgs: Sequence[Mapping[str, str]], add_generation_prompt: bool
) -> list[str] | None:
    """The template text just before each message's content (headers, preambles), or None.

    Found by rendering the same roles with unique marker contents. Knowing where each content
    must start stops a short content ("a", "user", "2023") from matching inside a header.
    """
    marks = [f"@@emdiff-content-{i}@@" for i in range(len(msgs))]
    probe = [{"role": m["role"], "content": mark} for m, mark in zip(msgs, marks, strict=True)]
    try:
        text = tokenizer.apply_chat_template(
            probe, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception:
        return None
    prefixes, pos = [], 0
    for mark in marks:
        at = text.find(mark, pos)
        if at < 0 or text.count(mark) != 1:
            return None
        prefixes.append(text[pos:at])
        pos = at + len(mark)
    return prefixes


def _locate(text: str, piece: str, cursor: int, anchored: bool) -> tuple[int, str]:
    """Where ``piece`` (or its stripped form, if the template trims) starts at or after cursor."""
    if anchored:  # the content must start right here, after optional whitespace
        if text.startswith(piece, cursor):
            return cursor, piece
        j = cursor
        while j < len(text) and text[j].isspace():
            j += 1
        if text.startswith(piece.strip(), j):
            return j, piece.strip()
    needle = piece if piece in text[cursor:] else piece.strip()
    return text.find(needle, cursor), needle


def _content_spans(
    text: str, msgs: Sequence[Mapping[str, str]], prefixes: Sequence[str] | None = None
) -> list[tuple[int, int, TokenRole]]:
    spans: list[tuple[int, int, TokenRole]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        pieces: list[tuple[str, TokenRole]] = []
        content = m["content"]
        if "_system" in m:  # folded system prompt: system part, then the user's own text
            sys_text = m["_system"]
            pieces = [(sys_text, TokenRole.SYSTEM), (content[len(sys_text) + 2 :], TokenRole.USER)]
        else:
            pieces = [(content, _ROLE_OF[m["role"]])]
        anchored = prefixes is not None and text.startswith(prefixes[i], cursor)
        if anchored:
            cursor += len(prefixes[i])
        else:
            prefixes = None  # the template depends on content; fall back to searching
        for piece, role in pieces:
            start, needle = _locate(text, piece, cursor, anchored)
            if not needle:
                continue
            if start < 0:
                raise ValueError(
                    f"message {i} ({m['role']}) does not appear verbatim in the rendered chat "
                    "template; the template rewrites content, so token roles cannot be assigned"
                )
            spans.append((start, start + len(needle), role))
            cursor = start + len(needle)
    return spans


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: its named and added special tokens, BOS, EOS, pad.

    The unknown token is left out (unless it is also BOS, EOS or pad): it stands for content the
    vocabulary lacks, so an answer word that became ``<unk>`` is still an answer position.
    """
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", None) or ()}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if (i := getattr(tokenizer, name, None)) is not None:
            ids.add(int(i))
    return ids


def encode_chat(
    tokenizer, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False
) -> EncodedChat:
    """Tokenise a conversation through its chat template and give every token a role.

    Needs a fast tokenizer (character offsets). The template's own special tokens (BOS, headers)
    are kept as rendered, so no extra BOS is added; ``special`` marks them.
    """
    text, msgs = render_chat(tokenizer, messages, add_generation_prompt)
    spans = _content_spans(text, msgs, _template_prefixes(tokenizer, msgs, add_generation_prompt))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    roles = []
    for s, e in enc["offset_mapping"]:
        role = TokenRole.TEMPLATE
        for a, b, r in spans:
            if s < b and e > a and e > s:
                role = r
                break
        roles.append(int(role))
    ids = list(enc["input_ids"])
    specials = special_token_ids(tokenizer)
    return EncodedChat(input_ids=ids, roles=roles, special=[i in specials for i in ids])


def pad_batch(
    rows: Sequence[Sequence[int]], pad_value: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged rows into a ``[B, T]`` tensor and its attention mask (1 = real token)."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not rows:
        raise ValueError("pad_batch needs at least one row; got an empty batch")
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_value, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        sl = slice(width - n, width) if side == "left" else slice(0, n)
        out[i, sl] = torch.as_tensor(list(r), dtype=torch.long)
        att[i, sl] = 1
    return out, att
