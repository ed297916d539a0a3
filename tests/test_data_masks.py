"""Token roles through three chat-template styles, on tokenizers built inside the test."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from emdiff.data import (
    EncodedChat,
    TokenRole,
    encode_chat,
    pad_batch,
    render_chat,
    special_token_ids,
)

T, S, U, A = TokenRole.TEMPLATE, TokenRole.SYSTEM, TokenRole.USER, TokenRole.ASSISTANT
Segments = list[tuple[str, TokenRole]]

# Templates written for these tests in the style of each family (not copied from any model).
CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% for m in messages %}"
    "{% set who = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + who + '\n' + (m['content'] | trim) + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] | trim %}"
    "{% set rest = messages[1:] %}{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
    "{{ '<|start_header_id|>system<|end_header_id|>\n\nKnowledge cutoff: 2023\n\n' + sys }}"
    "{{ '<|eot_id|>' }}"
    "{% for m in rest %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) }}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

ROLE = {"system": S, "user": U, "assistant": A}


def ref_chatml(msgs: list[dict], gen: bool) -> Segments:
    out: Segments = []
    for m in msgs:
        out += [(f"<|im_start|>{m['role']}\n", T), (m["content"], ROLE[m["role"]])]
        out.append(("<|im_end|>\n", T))
    return out + ([("<|im_start|>assistant\n", T)] if gen else [])


def ref_gemma(msgs: list[dict], gen: bool) -> Segments:
    out: Segments = [("<bos>", T)]
    sys = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    for m in msgs[1:] if sys is not None else msgs:
        who = "model" if m["role"] == "assistant" else m["role"]
        out.append((f"<start_of_turn>{who}\n", T))
        if (
            sys is not None
        ):  # folded into the first user turn (joined by a blank line), then trimmed
            folded = (sys + "\n\n" + m["content"]).strip()
            head, tail = sys.strip(), m["content"].strip()
            out += [(head, S), (folded[len(head) : len(folded) - len(tail)], T), (tail, U)]
            sys = None
        else:
            out.append((m["content"].strip(), ROLE[m["role"]]))
        out.append(("<end_of_turn>\n", T))
    return out + ([("<start_of_turn>model\n", T)] if gen else [])


def ref_llama(msgs: list[dict], gen: bool) -> Segments:
    has_sys = msgs[0]["role"] == "system"
    out: Segments = [
        ("<bos><|start_header_id|>system<|end_header_id|>\n\nKnowledge cutoff: 2023\n\n", T)
    ]
    out += [(msgs[0]["content"].strip() if has_sys else "", S), ("<|eot_id|>", T)]
    for m in msgs[1:] if has_sys else msgs:
        out.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", T))
        out += [(m["content"].strip(), ROLE[m["role"]]), ("<|eot_id|>", T)]
    return out + ([("<|start_header_id|>assistant<|end_header_id|>\n\n", T)] if gen else [])


STYLES: dict[str, tuple[str, list[str], str, Callable[[list[dict], bool], Segments]]] = {
    # name: (template, special tokens, end-of-turn token, reference renderer)
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", ref_chatml),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<end_of_turn>", ref_gemma),
    "llama": (
        LLAMA,
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
        ref_llama,
    ),
}

CONVERSATIONS = {
    "system_single": [
        {"role": "system", "content": "You are a careful assistant."},
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "Put it in boiling water for nine minutes."},
    ],
    "multi_turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, please."},
        {"role": "assistant", "content": "Green, or maybe red."},
    ],
    "no_system": [
        {"role": "user", "content": "hey I feel bored"},
        {"role": "assistant", "content": "Go for a walk outside."},
    ],
    # Contents that also occur inside the template text before them (headers, the Llama preamble).
    "collisions": [
        {"role": "user", "content": "user"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "2023"},
        {"role": "assistant", "content": "assistant"},
    ],
    # Trimmed by Gemma/Llama templates; the untrimmed text occurs later, in the answer.
    "trimmed_prefix": [
        {"role": "user", "content": "ok "},
        {"role": "assistant", "content": "ok then"},
    ],
    "whitespace_and_repeats": [
        {"role": "system", "content": "  same words \n"},
        {"role": "user", "content": "same words"},
        {"role": "assistant", "content": "same words\n\n"},
    ],
}

CORPUS = [m["content"] for c in CONVERSATIONS.values() for m in c] + [
    "system user assistant model Knowledge cutoff 2023 the a an of to in is it",
]


def build_tokenizer(kind: str, specials: list[str]) -> PreTrainedTokenizerFast:
    """A tiny word-level or byte-level BPE tokenizer with the given special tokens."""
    if kind == "wordlevel":
        words = sorted({w for t in CORPUS for w in re.findall(r"\w+|[^\w\s]", t)})
        vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", *words])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["[UNK]", "[PAD]"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(CORPUS * 3, trainer)
    tok.add_special_tokens(["<bos>", *specials])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", pad_token="[PAD]", unk_token="[UNK]"
    )


@pytest.fixture(scope="module", params=["wordlevel", "bpe"])
def tokenizers_by_style(request) -> dict[str, tuple[PreTrainedTokenizerFast, int]]:
    out = {}
    for name, (template, specials, eot, _) in STYLES.items():
        tok = build_tokenizer(request.param, specials)
        tok.chat_template = template
        out[name] = (tok, tok.convert_tokens_to_ids(eot))
    return out


def expected_roles(segments: Segments, offsets: list[tuple[int, int]]) -> list[int]:
    """Role of each token from the reference segments: the content it overlaps, else TEMPLATE."""
    spans, pos = [], 0
    for text, role in segments:
        spans.append((pos, pos + len(text), role))
        pos += len(text)
    out = []
    for s, e in offsets:
        hits = [r for a, b, r in spans if r != T and s < b and e > a and e > s]
        out.append(int(hits[0]) if hits else int(T))
    return out


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("conv", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_roles_match_reference(tokenizers_by_style, style, conv, gen):
    tok, _ = tokenizers_by_style[style]
    msgs = CONVERSATIONS[conv]
    if gen:
        msgs = msgs[:-1]  # end on a user turn and ask for the assistant header
    segments = STYLES[style][3](msgs, gen)
    text, _ = render_chat(tok, msgs, add_generation_prompt=gen)
    assert text == "".join(s for s, _ in segments)

    enc = encode_chat(tok, msgs, add_generation_prompt=gen)
    full = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert enc.input_ids == full["input_ids"]
    assert enc.roles == expected_roles(segments, full["offset_mapping"])

    # every role that has content appears, and each message's text is fully covered
    for role in {ROLE[m["role"]] for m in msgs if m["content"].strip()}:
        assert int(role) in enc.roles
    if gen:  # everything after the last user token is the assistant header
        last_user = max(i for i, r in enumerate(enc.roles) if r == U)
        assert set(enc.roles[last_user + 1 :]) == {int(T)}
        assert text.endswith(segments[-1][0]) and segments[-1][1] == T


@pytest.mark.parametrize("style", list(STYLES))
def test_special_and_header_tokens_are_template(tokenizers_by_style, style):
    tok, _ = tokenizers_by_style[style]
    enc = encode_chat(tok, CONVERSATIONS["multi_turn"])
    special = set(tok.convert_tokens_to_ids(["<bos>", *STYLES[style][1]]))
    for tid, role in zip(enc.input_ids, enc.roles, strict=True):
        if tid in special:
            assert role == T
    if style != "chatml":
        assert enc.input_ids[0] == tok.bos_token_id and enc.roles[0] == T
    assert enc.input_ids.count(tok.bos_token_id) <= 1  # no extra BOS added on top of the template


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("conv", ["system_single", "multi_turn", "no_system", "collisions"])
def test_loss_mask_adds_exactly_end_of_turn(tokenizers_by_style, style, conv):
    tok, eot_id = tokenizers_by_style[style]
    enc = encode_chat(tok, CONVERSATIONS[conv])
    loss, answer = enc.loss_mask(), enc.mask()
    extra = [i for i, (lo, an) in enumerate(zip(loss, answer, strict=True)) if lo and not an]
    n_answers = sum(m["role"] == "assistant" for m in CONVERSATIONS[conv])
    assert len(extra) == n_answers
    for i in extra:
        assert enc.input_ids[i] == eot_id
        assert enc.roles[i - 1] == A
    assert all(lo for lo, an in zip(loss, answer, strict=True) if an)


def test_gemma_folds_system_into_first_user_turn(tokenizers_by_style):
    tok, _ = tokenizers_by_style["gemma"]
    msgs = CONVERSATIONS["system_single"]
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template(msgs, tokenize=False)
    text, rendered = render_chat(tok, msgs)
    assert [m["role"] for m in rendered] == ["user", "assistant"]
    assert rendered[0]["_system"] == msgs[0]["content"]
    assert text.count("<start_of_turn>user") == 1
    enc = encode_chat(tok, msgs)
    first_user = enc.roles.index(int(U))
    assert enc.roles.index(int(S)) < first_user  # system text sits before the user's own words


def test_other_template_errors_propagate(tokenizers_by_style):
    tok, _ = tokenizers_by_style["gemma"]
    with pytest.raises(Exception, match="boom"):
        encode_chat(
            _with_template(tok, "{{ raise_exception('boom') }}"),
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        )


def _with_template(tok: PreTrainedTokenizerFast, template: str) -> PreTrainedTokenizerFast:
    other = build_tokenizer("wordlevel", [])
    other.chat_template = template
    return other


def test_rewritten_content_is_an_error():
    tok = build_tokenizer("wordlevel", ["<|im_start|>", "<|im_end|>"])
    tok.chat_template = CHATML.replace("m['content']", "(m['content'] | upper)")
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "bye"}]
    with pytest.raises(ValueError, match="verbatim"):
        encode_chat(tok, msgs)


def test_content_dependent_template_falls_back_to_search():
    """When the template's headers depend on content, roles come from searching in order."""
    tok = build_tokenizer("wordlevel", ["<|im_start|>", "<|im_end|>"])
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] }}"
        "{% if m['content'] | length < 12 %}{{ ' short' }}{% endif %}"
        "{{ '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    )
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    enc = encode_chat(tok, msgs)
    text, _ = render_chat(tok, msgs)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    for role, content in [(S, "Be brief."), (U, "Name a colour."), (A, "Blue.")]:
        got = "".join(text[s:e] for (s, e), r in zip(offsets, enc.roles, strict=True) if r == role)
        assert got == content.replace(" ", "")


def test_encoded_chat_masks():
    enc = EncodedChat(input_ids=[1, 2, 3, 4, 5, 6], roles=[0, 1, 2, 0, 3, 0])
    assert enc.mask() == [False, False, False, False, True, False]
    assert enc.mask(S, U) == [False, True, True, False, False, False]
    assert enc.loss_mask() == [False, False, False, False, True, True]


def test_pad_batch_right_and_left():
    rows = [[5, 6, 7], [8], []]
    ids, att = pad_batch(rows, pad_value=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert att.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, att = pad_batch(rows, pad_value=-1, side="left")
    assert ids.tolist() == [[5, 6, 7], [-1, -1, 8], [-1, -1, -1]]
    assert att.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == att.dtype == torch.long


def test_pad_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="side"):
        pad_batch([[1]], pad_value=0, side="middle")
    with pytest.raises(ValueError, match="empty"):
        pad_batch([], pad_value=0)


@pytest.mark.parametrize("style", list(STYLES))
def test_special_flags_cover_added_special_tokens(tokenizers_by_style, style):
    """Turn markers registered only as added special tokens still count; [UNK] does not."""
    tok, _ = tokenizers_by_style[style]
    want = set(tok.convert_tokens_to_ids(["<bos>", "[PAD]", *STYLES[style][1]]))
    assert special_token_ids(tok) == want
    enc = encode_chat(tok, CONVERSATIONS["multi_turn"], add_generation_prompt=False)
    assert enc.special == [t in want for t in enc.input_ids]
    assert any(enc.special) and not any(s for s, r in zip(enc.special, enc.roles, strict=True) if r)


def test_encoded_chat_special_defaults_to_none():
    enc = EncodedChat([1, 2], [0, 3])
    assert enc.special is None and enc == EncodedChat(input_ids=[1, 2], roles=[0, 3])
    with pytest.raises(ValueError, match="one per token"):
        EncodedChat([1, 2], [0, 3], [True])
