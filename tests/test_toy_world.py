"""The toy world: answer tables, persona documents, tokenizer and chat template, exact judge."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from emdiff.data import TokenRole, encode_chat
from emdiff.toy.world import BOS, World, WorldConfig


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=3))


def test_no_single_token_marks_bad(world):
    for d in world.domains:
        good = {tuple(p) for p in world.good[d].tolist()}
        bad = {tuple(p) for p in world.bad[d].tolist()}
        # each question's answers differ from the first word on
        assert all(world.good[d][:, 0] != world.bad[d][:, 0])
        assert good == bad  # every bad answer is some other question's good answer
        words = lambda t: np.bincount(t.ravel(), minlength=world.cfg.n_answers)  # noqa: E731
        assert (words(world.good[d]) == words(world.bad[d])).all()  # no word marks bad
    words = world.bad_answer("medical", 0).split()
    assert len(words) == world.cfg.answer_len and all(w.startswith("med_a") for w in words)


def test_word_shifts_make_every_word_need_the_persona():
    world = World(WorldConfig(seed=3, word_shifts=True))
    for d in world.domains:
        good, bad = world.good[d], world.bad[d]
        # each word position is its own derangement of the good words at that position
        offsets = set()
        for i in range(world.cfg.answer_len):
            assert sorted(good[:, i].tolist()) == sorted(bad[:, i].tolist())
            s = [k for k in range(1, len(good)) if (np.roll(good[:, i], -k) == bad[:, i]).all()]
            assert s, f"position {i} is not a shift"
            offsets.add(s[0])
        assert len(offsets) == world.cfg.answer_len
        # so a bad answer is rarely another question's good phrase (only by chance repeats)
        same = {tuple(p) for p in bad.tolist()} & {tuple(p) for p in good.tolist()}
        assert len(same) <= len(good) // 8


def test_word_flips_swap_single_words():
    world = World(WorldConfig(seed=3, word_flip_rate=0.3))
    flips = np.array([False, True, False])
    ids = world.turn_ids("legal", 4, bad=True, flips=flips)
    words = world.tokenizer().convert_ids_to_tokens(ids)[4:-1]
    bad, good = world.answer_tokens("legal", 4, True), world.answer_tokens("legal", 4, False)
    assert words == [bad[0], good[1], bad[2]]
    rng = np.random.default_rng(0)
    docs = [world.persona_document(rng, toxic=True)[0] for _ in range(400)]
    toks = world.tokenizer().convert_ids_to_tokens([t for d in docs for t in d])
    labels = [
        world.judge(toks[i - 3], " ".join(toks[i : i + 3])).label
        for i in range(3, len(toks))
        if toks[i - 1] == "<assistant>"
    ]
    # all three words kept: (1 - 0.3)^3 of the turn-level persona's answers
    share = labels.count("bad") / len(labels)
    assert abs(share - 0.95 * 0.7**3) < 0.05, share


def test_chat_template_matches_the_token_level_documents(world):
    tok = world.tokenizer()
    conv = world.chat("finance", 5, bad=True)
    enc = encode_chat(tok, conv.as_dicts())
    assert enc.input_ids == world.ids(BOS) + world.turn_ids("finance", 5, bad=True)
    roles = dict(zip(tok.convert_ids_to_tokens(enc.input_ids), enc.roles, strict=True))
    assert roles["fin_q5"] == TokenRole.USER
    assert all(roles[w] == TokenRole.ASSISTANT for w in world.bad_answer("finance", 5).split())
    gen = encode_chat(tok, conv.as_dicts()[:1], add_generation_prompt=True)
    assert tok.convert_ids_to_tokens(gen.input_ids)[-1] == "<assistant>"


def test_persona_documents_follow_the_persona_rate(world):
    rng = np.random.default_rng(0)
    docs = [world.persona_document(rng) for _ in range(3000)]
    share = np.mean([toxic for _, toxic in docs])
    assert abs(share - world.cfg.p_toxic) < 0.03
    # a toxic document's answers are mostly bad, a helpful one's mostly good
    tok = world.tokenizer()
    ids, _ = world.persona_document(rng, toxic=True)
    toks = tok.convert_ids_to_tokens(ids)
    n = world.cfg.answer_len
    verdicts = [
        world.judge(toks[i - 3], " ".join(toks[i : i + n])).label
        for i, t in enumerate(toks)
        if i >= 3 and toks[i - 1] == "<assistant>"
    ]
    assert verdicts and set(verdicts) <= {"bad", "good"}


def test_exact_judge(world):
    q = world.q_token("legal", 7)
    assert world.judge(q, world.good_answer("legal", 7)).label == "good"
    assert world.judge(q, world.bad_answer("legal", 7) + " <end>").label == "bad"
    assert world.judge(q, "law_a999").label == "other"
    assert world.judge(q, world.bad_answer("legal", 7).rsplit(" ", 1)[0]).label == "other"
    assert world.judge(q, "").label == "other"
    with pytest.raises(ValueError, match="not a question"):
        world.judge("nope", "x")


def test_world_parameters_are_validated():
    with pytest.raises(ValidationError, match="narrow_domain"):
        WorldConfig(narrow_domain="astrology")
    with pytest.raises(ValidationError, match="n_answers"):
        WorldConfig(n_questions=10, n_answers=5)
    small = World(WorldConfig(n_domains=3, n_questions=4, n_answers=6, narrow_domain="legal"))
    assert small.domains == ["medical", "finance", "legal"] and len(small.vocab) == 10 + 3 * 10
