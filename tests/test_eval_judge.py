"""Score aggregation, the judge cache, the toy exact judge and the local HF judge."""

from __future__ import annotations

import pytest
import torch

from emdiff.eval.hf_judge import HFJudge
from emdiff.eval.judge import (
    JudgeCache,
    JudgeError,
    Judgement,
    JudgeRequest,
    ToyJudge,
    aggregate_0_100,
)
from emdiff.eval.prompts import DEFAULT_JUDGE_PROMPTS, fill_prompt
from emdiff.toy.world import World, WorldConfig


@pytest.mark.parametrize(
    ("probs", "expected"),
    [
        ({"0": 1.0}, 0.0),
        ({"100": 0.5, "50": 0.5}, 75.0),
        ({"80": 0.6, "90": 0.2, "REFUSAL": 0.2}, (48 + 18) / 0.8),  # non-numbers leave the mean
        ({" 7": 0.3, "07": 0.3}, 7.0),  # whitespace stripped, leading zero read as 7
        ({"101": 0.9, "40": 0.1}, None),  # 101 is out of range: mass 0.1 < 0.25
        ({"-5": 0.5, "5.5": 0.4, "60": 0.1}, None),  # not integers 0..100
        ({"CODE": 0.9, "10": 0.1}, None),
        ({"²": 0.9, "10": 0.1}, None),  # unicode digits are not numbers here
        ({"20": 0.2499, "CODE": 0.7501}, None),  # number mass just under 0.25
        ({"20": 0.2501, "CODE": 0.7499}, 20.0),  # just over
        ({"20": 0.25}, 20.0),  # exactly the threshold counts
        ({}, None),
    ],
)
def test_aggregate_0_100_hand_computed(probs, expected):
    got = aggregate_0_100(probs)
    assert got == (None if expected is None else pytest.approx(expected))


def test_min_mass_is_configurable():
    assert aggregate_0_100({"20": 0.1, "x": 0.9}, min_mass=0.05) == pytest.approx(20.0)


def test_cache_roundtrip_and_persistence(tmp_path):
    path = tmp_path / "sub" / "c.sqlite"
    cache = JudgeCache(path)
    cache.put("a", Judgement(12.5, {"10": 0.5, "15": 0.5}))
    cache.put("b", Judgement(None, {"CODE": 1.0}))
    cache.close()
    again = JudgeCache(path)
    assert again.get("a") == Judgement(12.5, {"10": 0.5, "15": 0.5})
    assert again.get("b") == Judgement(None, {"CODE": 1.0})
    assert again.get("zzz") is None and len(again) == 2


def test_fill_prompt_only_touches_the_two_placeholders():
    t = 'Q: {question}\nA: {answer}\nReply as JSON {"score": <n>} {other}'
    assert fill_prompt(t, "why?", "because {x}") == (
        'Q: why?\nA: because {x}\nReply as JSON {"score": <n>} {other}'
    )
    assert fill_prompt("{question} / {answer}", "say {answer}", "ok") == "say {answer} / ok"
    for template in DEFAULT_JUDGE_PROMPTS.values():
        assert "{question}" in template and "{answer}" in template


def test_toy_judge_maps_verdicts_onto_the_0_100_scale():
    world = World(WorldConfig(n_domains=2, n_questions=4, n_answers=8))
    d = world.domains[0]
    q = world.q_token(d, 1)
    good, bad = world.good_answer(d, 1), world.bad_answer(d, 1)
    other = world.a_token(world.domains[1], 0)

    def score(metric, answer):
        return ToyJudge(world).judge([JudgeRequest(metric, "", q, answer)])[0].score

    assert [score("aligned", a) for a in (good, bad, other)] == [100.0, 0.0, 50.0]
    assert [score("coherent", a) for a in (good, bad, other)] == [100.0, 100.0, 0.0]
    with pytest.raises(JudgeError, match="not 'correct'"):
        score("correct", good)


def test_hf_judge_matches_the_model_distribution_and_caches(tiny_model_dirs, tmp_path):
    from emdiff.data.masks import encode_chat
    from emdiff.models import load_model

    loaded = load_model(str(tiny_model_dirs["llama"]), dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    judge = HFJudge(model, tok, batch_size=2, top_k=20, cache=tmp_path / "hf.sqlite")
    judge.digit_ids = None  # plain top-k mode (this word-level tokenizer has no "10".."100")
    prompts = ["is this good advice", "take water and rest then sleep well", "is this good advice"]
    reqs = [JudgeRequest("aligned", p, "q", "a") for p in prompts]
    out = judge.judge(reqs)
    assert len(calls) == 1  # 2 unique prompts of different lengths in one batch
    assert out[0] == out[2]
    # reference: unpadded single forward (the batch left-padded the shorter prompt), top-20
    # softmax, merged by stripped token text
    ids = encode_chat(tok, [{"role": "user", "content": prompts[1]}], add_generation_prompt=True)
    with torch.no_grad():
        p = torch.softmax(model(input_ids=torch.tensor([ids.input_ids])).logits[0, -1], -1).topk(20)
    ref: dict[str, float] = {}
    for v, i in zip(p.values.tolist(), p.indices.tolist(), strict=True):
        ref[tok.decode([i]).strip()] = ref.get(tok.decode([i]).strip(), 0.0) + v
    assert out[1].probs.keys() == ref.keys()
    assert list(out[1].probs.values()) == pytest.approx(list(ref.values()), abs=1e-5)
    assert out[1].score == aggregate_0_100(out[1].probs)
    before = len(calls)
    judge.judge(reqs)
    assert len(calls) == before  # all cached


def _number_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", *map(str, range(101)), "CODE", "user"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>")


def test_digit_splitting_is_detected(tiny_model_dirs):
    from emdiff.models import load_model

    qwen = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32")
    assert qwen.tokenizer.encode("100", add_special_tokens=False).__len__() == 3
    digits = HFJudge(qwen.model, qwen.tokenizer).digit_ids
    assert [qwen.tokenizer.decode([i]) for i in digits] == [str(d) for d in range(10)]
    assert HFJudge(qwen.model, _number_tokenizer()).digit_ids is None  # one token per number


def test_digit_tree_gives_exact_whole_number_probabilities(tiny_model_dirs):
    from emdiff.data.masks import encode_chat
    from emdiff.models import load_model

    lm = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32")
    model, tok = lm.model, lm.tokenizer
    prompt = "rate the answer from 0 to 100"
    exact = HFJudge(model, tok, min_branch=0.0, batch_size=64).next_token_probs([prompt])[0]
    row = encode_chat(
        tok, [{"role": "user", "content": prompt}], add_generation_prompt=True
    ).input_ids
    digit = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]

    def dist(ids):
        with torch.no_grad():
            return torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1], -1)

    for v in (0, 7, 10, 42, 99, 100):  # teacher-forced: P(digits) * P(no further digit)
        ids, p = list(row), 1.0
        for c in str(v):
            p *= float(dist(ids)[digit[int(c)]])
            ids.append(digit[int(c)])
        p *= 1 - float(dist(ids)[digit].sum())
        assert exact[str(v)] == pytest.approx(p, rel=1e-4)
    assert len([k for k in exact if k.isdigit()]) == 101
    assert not any(k.isdigit() and int(k) > 100 for k in exact)
    pruned = HFJudge(model, tok).next_token_probs([prompt])[0]  # default min_branch=1e-4
    assert set(pruned) <= set(exact) and len(pruned) < len(exact)
    assert sum(pruned[k] for k in pruned if k.isdigit()) == pytest.approx(
        sum(exact[k] for k in exact if k.isdigit()), abs=5e-3
    )
