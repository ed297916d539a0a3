"""Token positions: each kind selects exactly the indices it names, by hand and through templates."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from emdiff.data import (
    POSITION_HELP,
    EncodedChat,
    Positions,
    TokenRole,
    encode_chat,
    special_token_ids,
)
from emdiff.errors import InputError
from emdiff.toy.world import World, WorldConfig

T, U, A = int(TokenRole.TEMPLATE), int(TokenRole.USER), int(TokenRole.ASSISTANT)
BOS, START, END, USER, ASSIST, NL = 1, 2, 3, 10, 11, 12

# A hand-built ChatML-like multi-turn chat: BOS, special turn markers, two answers.
# Positions 0-9 open turn 1 and the answer header, 10-12 answer 1, 13-21 turn 2 and the header,
# 22 answer 2, 23-24 the end.
TURN_1 = [(BOS, T), (START, T), (USER, T), (NL, T), (20, U), (21, U), (END, T)]
HEADER = [(START, T), (ASSIST, T), (NL, T)]
TURN_2 = [(END, T), (START, T), (USER, T), (NL, T), (22, U), (END, T)]
ROWS = [*TURN_1, *HEADER, (30, A), (31, A), (32, A), *TURN_2, *HEADER, (33, A), (END, T), (NL, T)]
SPECIAL_IDS = {BOS, START, END}
CHAT = EncodedChat([i for i, _ in ROWS], [r for _, r in ROWS], [i in SPECIAL_IDS for i, _ in ROWS])
SPECIAL_AT = [0, 1, 6, 7, 13, 14, 18, 19, 23]


def picked(pos: Positions | str, row, bos_token_id: int | None = None) -> list[int]:
    pos = Positions.parse(pos) if isinstance(pos, str) else pos
    return [i for i, m in enumerate(pos.mask(row, bos_token_id)) if m]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("answer", [10, 11, 12, 22]),
        ("answer_predicting", [9, 21]),
        ("last_prompt", [9, 21]),
        ("all", [i for i in range(len(ROWS)) if i not in SPECIAL_AT]),
        ("answer_first:1", [10, 22]),
        ("answer_first:2", [10, 11, 22]),
        ("answer_first:3", [10, 11, 12, 22]),
        ("answer_first:50", [10, 11, 12, 22]),  # k longer than every answer: the whole answer
        ("answer_after:1", [11, 12]),
        ("answer_after:2", [12]),
        ("answer_after:3", []),
        ("answer_after:50", []),
    ],
)
def test_hand_built_multi_turn(text, want):
    assert picked(text, CHAT) == want
    assert picked(text, CHAT, bos_token_id=BOS) == want
    assert picked(text + ",sinks", CHAT) == want  # sinks are dropped at run time, not here


def test_default_is_answer_and_matches_role_mask():
    assert Positions() == Positions.parse("answer")
    assert Positions().mask(CHAT) == CHAT.mask()


def test_answer_kinds_skip_special_tokens_inside_an_answer():
    chat = EncodedChat([5, 6, END, 7, 8], [T, A, A, A, T], [False, False, True, False, False])
    assert picked("answer", chat) == [1, 3]
    assert picked("answer_first:2", chat) == [1]
    assert picked("answer_after:1", chat) == [3]
    assert picked("all", chat) == [0, 1, 3, 4]


def test_answer_predicting_keeps_a_special_prompt_end_but_never_bos():
    # a template that ends the prompt with a special token (the toy's "<assistant>")
    chat = EncodedChat([BOS, 40, START, 41], [T, U, T, A], [True, False, True, False])
    assert picked("answer_predicting", chat) == [2]
    assert picked("answer", chat) == [3]
    # the token before the answer is BOS: by the special first token, or by bos_token_id
    first = EncodedChat([BOS, 41], [T, A], [True, False])
    assert picked("answer_predicting", first) == []
    bare = EncodedChat([BOS, 41], [T, A])
    assert picked("answer_predicting", bare) == [0]  # nothing says token 0 is BOS
    assert picked("answer_predicting", bare, bos_token_id=BOS) == []


def test_prompt_only_row_predicts_from_its_last_token():
    prompt = EncodedChat(CHAT.input_ids[:10], CHAT.roles[:10], CHAT.special[:10])  # ends "\n"
    assert picked("answer_predicting", prompt) == [9]
    for text in ("answer", "answer_first:2", "answer_after:1"):
        assert picked(text, prompt) == []
    assert picked("answer_predicting", EncodedChat([BOS], [T], [True])) == []
    assert picked("answer_predicting", EncodedChat([], [], [])) == []


def test_last_reads_the_final_token_of_a_row():
    prompt = EncodedChat(CHAT.input_ids[:10], CHAT.roles[:10], CHAT.special[:10])
    assert picked("last", prompt) == [9]
    assert picked("last", CHAT) == [len(CHAT.input_ids) - 1]
    assert picked("last", EncodedChat([BOS], [T], [True])) == []  # never BOS
    assert picked("last", EncodedChat([], [], [])) == []
    assert str(Positions.parse("last,sinks")) == "last,sinks"


def test_special_none_means_no_token_is_special():
    chat = EncodedChat([i for i, _ in ROWS], [r for _, r in ROWS])
    assert picked("all", chat) == list(range(len(ROWS)))
    assert picked("all", chat, bos_token_id=BOS) == list(range(1, len(ROWS)))
    assert picked("answer", chat) == [10, 11, 12, 22]
    with pytest.raises(ValueError, match="special has 1 flags for 2 tokens"):
        EncodedChat([1, 2], [T, T], [True])


def test_plain_id_rows():
    assert picked("all", [BOS, 5, 6, BOS, 7], bos_token_id=BOS) == [1, 2, 4]
    assert picked("all", (5, 6, 7)) == [0, 1, 2]
    for text in ("answer", "answer_predicting", "answer_first:1", "answer_after:1"):
        with pytest.raises(InputError, match=r"plain text rows have no answer tokens.*all"):
            Positions.parse(text).mask([BOS, 5, 6], bos_token_id=BOS)


@pytest.mark.parametrize(
    "text",
    ["answer", "answer_predicting", "all", "answer_first:4", "answer_after:1", "all,sinks"],
)
def test_parse_round_trips(text):
    pos = Positions.parse(text)
    assert str(pos) == text
    assert Positions.parse(str(pos)) == pos
    assert Positions.model_validate(pos.model_dump()) == pos


def test_parse_fields_and_aliases():
    assert Positions.parse(" Last_Prompt ") == Positions(kind="answer_predicting")
    assert Positions.parse("answer_first:8,sinks") == Positions(
        kind="answer_first", k=8, exclude_sinks=False
    )
    assert Positions.parse("answer_after : 2 , sinks") == Positions(
        kind="answer_after", k=2, exclude_sinks=False
    )
    assert all(k in POSITION_HELP for k in ("answer_predicting", "answer_first:K", ",sinks"))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "unknown kind ''"),
        ("answers", "unknown kind 'answers'"),
        ("answer_first", "answer_first needs k >= 1"),
        ("answer_after:0", "greater than or equal to 1"),
        ("answer_first:-2", "whole number"),
        ("answer_first:x", "whole number"),
        ("answer:3", "answer takes no k"),
        ("all:1", "all takes no k"),
        ("answer,", "unknown suffix"),
        ("answer,nosinks", "unknown suffix 'nosinks'"),
        ("answer,sinks,sinks", "unknown suffix"),
    ],
)
def test_parse_rejects_bad_strings(text, why):
    with pytest.raises(InputError, match=why) as e:
        Positions.parse(text)
    msg = str(e.value)
    assert "\n" not in msg and "answer_first:K" in msg and "last_prompt" in msg


def test_construction_checks_k():
    with pytest.raises(ValidationError, match="answer_first needs k >= 1"):
        Positions(kind="answer_first")
    with pytest.raises(ValidationError, match="answer takes no k"):
        Positions(kind="answer", k=2)
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        Positions(kind="answer_after", k=0)
    with pytest.raises(ValidationError, match="extra"):
        Positions(kind="all", sinks=True)
    with pytest.raises(ValidationError, match="frozen"):
        Positions().kind = "all"  # type: ignore[misc]


# ---- through real chat templates ------------------------------------------------------------

MSGS = [
    {"role": "user", "content": "what is the dose"},
    {"role": "assistant", "content": "take one pill with water"},
    {"role": "user", "content": "why"},
    {"role": "assistant", "content": "it is safe zzz"},  # "zzz" is <unk> on word-level vocabs
]
LAST_PROMPT_TOKEN = {"qwen2": "\n", "gemma2": "model", "llama": "assistant"}


@pytest.fixture(scope="module")
def tokenizers(tiny_model_dirs):
    return {a: AutoTokenizer.from_pretrained(p) for a, p in tiny_model_dirs.items()}


@pytest.mark.parametrize("arch", list(LAST_PROMPT_TOKEN))
def test_special_flags_on_tiny_tokenizers(tokenizers, arch):
    tok = tokenizers[arch]
    start, end = (
        ("<start_of_turn>", "<end_of_turn>") if arch == "gemma2" else ("<|im_start|>", "<|im_end|>")
    )
    specials = special_token_ids(tok)
    assert {tok.convert_ids_to_tokens(i) for i in specials} == {"<bos>", "<pad>", start, end}
    assert tok.unk_token_id not in specials and tok.eos_token_id == tok.convert_tokens_to_ids(end)
    enc = encode_chat(tok, MSGS)
    assert enc.special == [i in specials for i in enc.input_ids]
    named = [
        tok.convert_ids_to_tokens(t) for t, s in zip(enc.input_ids, enc.special, strict=True) if s
    ]
    bos = [] if arch == "qwen2" else ["<bos>"]  # the qwen2 template adds no BOS
    assert named == bos + [start, end] * len(MSGS)
    assert (enc.input_ids[0] == tok.bos_token_id) == (arch != "qwen2")


@pytest.mark.parametrize("arch", list(LAST_PROMPT_TOKEN))
def test_kinds_through_tiny_templates(tokenizers, arch):
    tok = tokenizers[arch]
    enc = encode_chat(tok, MSGS)
    starts = [i for i, r in enumerate(enc.roles) if r == A and enc.roles[i - 1] != A]
    assert len(starts) == 2

    pred = picked("answer_predicting", enc, tok.bos_token_id)
    assert pred == [s - 1 for s in starts]
    assert {tok.decode([enc.input_ids[i]]) for i in pred} == {LAST_PROMPT_TOKEN[arch]}

    # the prompt with its generation header ends on the same token, after the same prefix
    prompt = encode_chat(tok, MSGS[:1], add_generation_prompt=True)
    assert picked("answer_predicting", prompt, tok.bos_token_id) == [len(prompt.input_ids) - 1]
    assert prompt.input_ids == enc.input_ids[: pred[0] + 1]

    selected = picked("all", enc, tok.bos_token_id)
    specials = special_token_ids(tok)
    assert selected == [i for i, t in enumerate(enc.input_ids) if t not in specials]
    assert tok.unk_token_id in [enc.input_ids[i] for i in selected] or arch == "qwen2"

    answer = picked("answer", enc, tok.bos_token_id)
    assert answer == [i for i, m in enumerate(enc.mask()) if m]
    first = picked("answer_first:2", enc)
    after = picked("answer_after:2", enc)
    assert first == [s + j for s in starts for j in (0, 1)]
    assert sorted(first + after) == answer and not set(first) & set(after)
    assert picked("answer_first:1000", enc) == answer and picked("answer_after:1000", enc) == []


def test_toy_tokenizer():
    world = World(WorldConfig(n_domains=2, n_questions=4, n_answers=8))
    tok = world.tokenizer()
    specials = special_token_ids(tok)
    assert {tok.convert_ids_to_tokens(i) for i in specials} == {
        "<pad>",
        "<bos>",
        "<eos>",
        "<end>",
        "<system>",
        "<user>",
        "<assistant>",
    }
    chat = world.chat(world.domains[0], 1, bad=True)
    enc = encode_chat(tok, [m.model_dump() for m in chat.messages])
    assert tok.convert_ids_to_tokens(enc.input_ids) == [
        "<bos>",
        "<user>",
        world.q_token(world.domains[0], 1),
        "<end>",
        "<assistant>",
        *world.bad_answer(world.domains[0], 1).split(),
        "<end>",
    ]
    assert enc.special == [True, True, False, True, True, False, False, False, True]
    assert picked("answer", enc) == [5, 6, 7]
    assert picked("answer_predicting", enc) == [4]  # "<assistant>": special, but the prompt's end
    assert picked("all", enc) == [2, 5, 6, 7]
    doc, _ = world.persona_document(np.random.default_rng(0))
    assert picked("all", doc, tok.bos_token_id) == list(range(1, len(doc)))
