"""Auto-interpretation: explain from half the contexts, score by detection on the other half.

The language-model path runs over real HTTP against the scripted fake server, which explains a
latent by its most often marked word and detects by a keyword rule; the toy path uses the
reference explainer on a tiny world built here.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from fake_judge_server import FakeJudgeServer, text_completion

from emdiff.autointerp import (
    AutoInterpConfig,
    AutoInterpError,
    LLMInterpreter,
    interpret_cards,
    load_cards,
    run_autointerp,
    score_detection,
    split_card,
)
from emdiff.autointerp.client import DETECT_SYSTEM, EXPLAIN_SYSTEM
from emdiff.autointerp.toy import ToyExplainer, toy_world
from emdiff.toy.world import World, WorldConfig

SECRET = "sk-test-DO-NOT-LEAK-1234567890"
WORDS = [
    "the",
    "a",
    "cat",
    "sat",
    "on",
    "mat",
    "dog",
    "ran",
    "far",
    "home",
    "blue",
    "sky",
    "tree",
    "road",
]


# ---- the fake model --------------------------------------------------------------------------------
def _digit_logprobs(preds: list[int]) -> list[dict]:
    """Per-token logprobs of ``[p, p, ...]``: 0.9 on the chosen digit, 0.1 on the other."""
    out = [{"token": "[", "logprob": 0.0, "top_logprobs": []}]
    for i, p in enumerate(preds):
        top = [
            {"token": str(p), "logprob": math.log(0.9)},
            {"token": str(1 - p), "logprob": math.log(0.1)},
        ]
        out.append({"token": str(p), "logprob": math.log(0.9), "top_logprobs": top})
        if i < len(preds) - 1:
            out.append({"token": ",", "logprob": 0.0, "top_logprobs": []})
    return [*out, {"token": "]", "logprob": 0.0, "top_logprobs": []}]


def fake_model(body: dict) -> dict:
    """Explain: the most often marked word. Detect: 1 where a quoted word of the explanation
    appears in the excerpt."""
    system, prompt = body["messages"][0]["content"], body["messages"][-1]["content"]
    if system == EXPLAIN_SYSTEM:
        active = prompt.split("INACTIVE EXCERPTS:")[0]
        word = Counter(re.findall(r"<<(.*?)>>", active)).most_common(1)[0][0]
        return text_completion(f'Marked words repeat.\n[EXPLANATION]: The word "{word}".')
    assert system == DETECT_SYSTEM
    keys = re.findall(r'"([^"]+)"', prompt.splitlines()[0])
    excerpts = re.findall(r"^Example \d+: (.*)$", prompt, re.MULTILINE)
    preds = [int(any(k in ex.split() for k in keys)) for ex in excerpts]
    logprobs = _digit_logprobs(preds) if body.get("logprobs") else None
    return text_completion(json.dumps(preds), logprobs)


# ---- cards written in the test ---------------------------------------------------------------------
def _context(rng: random.Random, seq: int, key: str | None, space: bool = False) -> dict:
    tokens = [rng.choice(WORDS) for _ in range(6)] + [f"s{seq}"]  # s<seq> names the context
    acts = [0.0] * len(tokens)
    if key is not None:
        i = rng.randrange(6)
        tokens[i], acts[i] = key, 2.0 + rng.random() * 8
        if rng.random() < 0.5:  # sometimes a weaker second hit
            j = (i + 3) % 6
            tokens[j], acts[j] = key, 1.0
    if space:
        tokens = [tokens[0]] + [" " + t for t in tokens[1:]]
    return {"tokens": tokens, "acts": acts, "seq": seq, "pos": acts.index(max(acts))}


def _card(layer: int, latent: int, key: str, n: int = 20, seed: int = 0, space: bool = False):
    rng = random.Random(f"{layer}/{latent}/{seed}")
    contexts = [_context(rng, 1000 * latent + i, key, space) for i in range(n)]
    contexts.sort(key=lambda c: -max(c["acts"]))
    negatives = [_context(rng, 1000 * latent + 500 + i, None, space) for i in range(n)]
    return {
        "layer": layer,
        "site": "resid_post",
        "latent": latent,
        "contexts": contexts,
        "negatives": negatives,
    }


def _write_cards(run: Path, cards: list[dict], meta: dict | None = None, name="q1") -> Path:
    path = run / "cards" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta or {"kind": "test"}, "cards": cards}))
    return path


def _cfg(server: FakeJudgeServer, **kw) -> AutoInterpConfig:
    kw = {"timeout": 10.0, "backoff": 0.01, "max_retries": 3, "concurrency": 1, **kw}
    kw.setdefault("api_key_env", None)
    return AutoInterpConfig(url=server.base_url, model="fake-model", **kw)


def _table(run: Path) -> list[dict]:
    with (run / "tables" / "autointerp.csv").open() as f:
        return list(csv.DictReader(f))


# ---- detection -------------------------------------------------------------------------------------
def test_good_explanation_scores_high_and_a_wrong_one_at_chance(tmp_path):
    _, (card,) = load_cards(_write_cards(tmp_path, [_card(3, 7, "apple")]))
    split = split_card(card, 10, 10, seed=0)
    with FakeJudgeServer(responder=fake_model) as server:
        interp = LLMInterpreter(_cfg(server))
        good = score_detection(interp, 'The word "apple".', split.holdout, split.holdout_negatives)
        wrong = score_detection(interp, 'The word "zebra".', split.holdout, split.holdout_negatives)
    assert (good.true_pos, good.false_neg, good.true_neg, good.false_pos) == (10, 0, 10, 0)
    assert good.balanced_accuracy == 1.0 and good.unparsed == 0
    assert (wrong.true_pos, wrong.true_neg) == (0, 10) and wrong.balanced_accuracy == 0.5
    assert good.auc is None  # no logprobs asked for
    assert len(server.requests) == 2 * 4  # 20 held-out contexts in batches of 5, twice
    shown = [r["messages"][-1]["content"] for r in server.requests]
    assert all("<<" not in p and p.count("\nExample ") == 5 for p in shown)  # unmarked, 5 each
    assert all(r["temperature"] == 0 and r["model"] == "fake-model" for r in server.requests)


def test_split_is_seeded_disjoint_and_spans_the_activation_range(tmp_path):
    _, (card,) = load_cards(_write_cards(tmp_path, [_card(0, 1, "apple")]))
    a, b = split_card(card, 10, 10, seed=0), split_card(card, 10, 10, seed=0)
    assert a == b and split_card(card, 10, 10, seed=1) != a
    seqs = [c.seq for c in a.explain], [c.seq for c in a.holdout]
    assert not set(seqs[0]) & set(seqs[1]) and len(seqs[0]) == len(seqs[1]) == 10
    top2 = {card.contexts[0].seq, card.contexts[1].seq}
    assert len(top2 & set(seqs[0])) == 1  # the strongest pair is shared out
    assert not {c.seq for c in a.explain_negatives} & {c.seq for c in a.holdout_negatives}


# ---- the whole run ---------------------------------------------------------------------------------
def test_run_explains_from_one_half_and_writes_records_and_table(tmp_path):
    cards = [_card(3, 7, "apple"), _card(5, 2, "river", space=True), _card(5, 9, "x", n=1)]
    path = _write_cards(tmp_path, cards)
    with FakeJudgeServer(responder=fake_model) as server:
        records = interpret_cards(path, _cfg(server, logprobs=True))
    assert records == [
        {
            "layer": 3,
            "latent": 7,
            "explanation": 'The word "apple".',
            "score": 1.0,
            "source": "autointerp:fake-model",
        },
        {
            "layer": 5,
            "latent": 2,
            "explanation": 'The word "river".',
            "score": 1.0,
            "source": "autointerp:fake-model",
        },
    ]
    assert json.loads((tmp_path / "cards" / "explanations.json").read_text()) == records
    explain = [r for r in server.requests if r["messages"][0]["content"] == EXPLAIN_SYSTEM]
    assert len(explain) == 2  # the card with one context is not asked about
    text = explain[0]["messages"][-1]["content"]
    assert "<<apple>>" in text and "INACTIVE EXCERPTS:" in text and "Activations:" in text
    _, loaded = load_cards(path)
    split = split_card(loaded[0], 10, 10, seed=0)
    assert all(f"s{c.seq}" in text for c in split.explain)
    assert not any(f"s{c.seq} " in text + " " for c in split.holdout)  # held out, never shown
    spaced = explain[1]["messages"][-1]["content"]  # pieces with their own spaces
    assert " <<river>>" in spaced and "  " not in spaced
    rows = _table(tmp_path)
    assert [r["latent"] for r in rows] == ["7", "2", "9"]
    assert rows[0]["true_pos"] == "10" and rows[0]["true_neg"] == "10"
    assert rows[0]["balanced_accuracy"] == "1.0000" and rows[0]["auc"] == "1.0000"
    assert rows[2]["balanced_accuracy"] == "" and "needs at least 2" in rows[2]["error"]


def test_records_merge_with_other_sources(tmp_path):
    path = _write_cards(tmp_path, [_card(3, 7, "apple")])
    old = [
        {
            "layer": 3,
            "latent": 7,
            "explanation": "stale",
            "score": 0.1,
            "source": "autointerp:fake-model",
        },
        {"layer": 3, "latent": 7, "explanation": "by hand", "score": None, "source": "human"},
    ]
    (tmp_path / "cards" / "explanations.json").write_text(json.dumps(old))
    with FakeJudgeServer(responder=fake_model) as server:
        interpret_cards(path, _cfg(server))
    merged = json.loads((tmp_path / "cards" / "explanations.json").read_text())
    assert [(r["source"], r["explanation"]) for r in merged] == [
        ("human", "by hand"),
        ("autointerp:fake-model", 'The word "apple".'),
    ]


@pytest.mark.parametrize("fault", ["429", "500", "garbage", "badstatus"])
def test_transient_faults_are_retried(tmp_path, fault):
    path = _write_cards(tmp_path, [_card(3, 7, "apple")])
    with FakeJudgeServer(script=[fault], responder=fake_model) as server:
        (record,) = interpret_cards(path, _cfg(server))
    assert record["score"] == 1.0
    assert len(server.requests) == 1 + 1 + 4  # the failed attempt, then explain + 4 batches


def test_unreadable_explanation_is_retried_then_recorded_not_invented(tmp_path, caplog):
    path = _write_cards(tmp_path, [_card(3, 7, "apple"), _card(3, 8, "pear")])
    caplog.set_level(logging.WARNING)
    with FakeJudgeServer(script=["badreply"] * 3, responder=fake_model) as server:
        records = interpret_cards(path, _cfg(server, parse_retries=2))
    assert [r["latent"] for r in records] == [8]  # latent 7 has no made-up explanation
    rows = _table(tmp_path)
    assert rows[0]["explanation"] == "" and rows[0]["balanced_accuracy"] == ""
    assert "explain: no '[EXPLANATION]: ...' line" in rows[0]["error"]
    (line,) = [r.getMessage() for r in caplog.records if "latent 7" in r.getMessage()]
    assert "\n" not in line
    assert not (tmp_path / "cards" / "autointerp_cache.jsonl").read_text().count('"latent": 7')


def test_a_refused_request_is_recorded_and_not_asked_again(tmp_path):
    path = _write_cards(tmp_path, [_card(3, 7, "apple")])
    with FakeJudgeServer(script=["400"], responder=fake_model) as server:
        records = interpret_cards(path, _cfg(server, parse_retries=2))
    assert records == [] and len(server.requests) == 1
    (row,) = _table(tmp_path)
    assert "refused" in row["error"] and "content policy" in row["error"]


def test_unreadable_detection_batch_is_counted_as_unparsed(tmp_path):
    path = _write_cards(tmp_path, [_card(3, 7, "apple")])
    with FakeJudgeServer(script=["ok"] + ["badreply"] * 2, responder=fake_model) as server:
        (record,) = interpret_cards(path, _cfg(server, parse_retries=1))
    (row,) = _table(tmp_path)
    assert row["unparsed"] == "5" and int(row["n_active"]) + int(row["n_inactive"]) == 15
    assert "expected a list of 5 zeros and ones" in row["error"]
    assert record["score"] == 1.0  # from the 15 contexts that were scored


def test_server_down_keeps_finished_latents_and_rerun_asks_only_the_rest(tmp_path):
    cards = [_card(1, i, w, n=8) for i, w in enumerate(["apple", "pear", "plum", "fig"])]
    path = _write_cards(tmp_path, cards)
    per_latent = 1 + 2  # explain, then 8 held-out contexts in 2 batches
    with (
        FakeJudgeServer(script=["ok"] * (2 * per_latent) + ["down"], responder=fake_model) as s,
        pytest.raises(AutoInterpError, match="rerun the same command"),
    ):
        interpret_cards(path, _cfg(s, n_explain=4, n_holdout=4, max_retries=1))
    cache = tmp_path / "cards" / "autointerp_cache.jsonl"
    assert len(cache.read_text().splitlines()) == 2
    with FakeJudgeServer(responder=fake_model) as server:
        records = interpret_cards(path, _cfg(server, n_explain=4, n_holdout=4))
    assert len(server.requests) == 2 * per_latent  # the two finished latents are not asked
    assert [r["score"] for r in records] == [1.0] * 4
    with FakeJudgeServer(responder=fake_model) as server:
        again = interpret_cards(path, _cfg(server, n_explain=4, n_holdout=4))
    assert server.requests == [] and again == records
    with FakeJudgeServer(responder=fake_model) as server:  # other settings: asked afresh
        interpret_cards(path, _cfg(server, n_explain=4, n_holdout=4, seed=1))
    assert len(server.requests) == 4 * per_latent


def test_concurrent_latents_give_the_same_results(tmp_path):
    cards = [_card(1, i, w, n=8) for i, w in enumerate(["apple", "pear", "plum", "fig"])]
    path = _write_cards(tmp_path, cards)
    # replies slow enough that three workers surely overlap, however loaded the machine is
    with FakeJudgeServer(responder=fake_model, delay_s=0.2) as server:
        out = run_autointerp(path, _cfg(server, concurrency=3))
    assert [r.score for r in out.results] == [1.0] * 4 and 1 < server.max_in_flight <= 3


def test_api_key_is_sent_but_never_written_or_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EMDIFF_TEST_KEY", SECRET)
    caplog.set_level(logging.DEBUG)
    path = _write_cards(tmp_path, [_card(3, 7, "apple")])
    with FakeJudgeServer(script=["429", "500"], responder=fake_model) as server:
        cfg = _cfg(server, api_key_env="EMDIFF_TEST_KEY")
        interp = LLMInterpreter(cfg)
        interpret_cards(path, cfg, interpreter=interp)
    assert server.headers[-1]["Authorization"] == f"Bearer {SECRET}"
    assert "429" in caplog.text and SECRET not in caplog.text
    assert SECRET not in repr(interp) and SECRET not in cfg.model_dump_json()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 4 and not any(SECRET.encode() in p.read_bytes() for p in written)
    with FakeJudgeServer(script=["401"], responder=fake_model) as server:
        cfg = _cfg(server, api_key_env="EMDIFF_TEST_KEY", seed=5)
        with pytest.raises(AutoInterpError, match="HTTP 401") as err:
            interpret_cards(path, cfg)
    assert SECRET[-8:] not in str(err.value)
    with pytest.raises(ValueError) as err:  # the key pasted in place of its variable's name
        AutoInterpConfig(api_key_env=SECRET)
    assert SECRET not in str(err.value)


def test_bad_cards_file_names_file_and_card(tmp_path):
    from emdiff.errors import InputError

    bad = _card(3, 7, "apple")
    bad["contexts"][4]["acts"] = bad["contexts"][4]["acts"][:-1]
    path = _write_cards(tmp_path, [_card(1, 1, "pear"), bad])
    with pytest.raises(InputError, match=r"q1.json: cards\[1\].contexts\[4\]: 'acts'"):
        load_cards(path)


# ---- the toy reference -----------------------------------------------------------------------------
def _toy_context(world: World, seq: int, turns: list[tuple[str, int, bool]], fire) -> dict:
    tokens = ["<bos>"]
    for d, q, bad in turns:
        tokens += ["<user>", world.q_token(d, q), "<end>", "<assistant>"]
        tokens += [*world.answer_tokens(d, q, bad), "<end>"]
    acts = [fire(i, t, tokens) for i, t in enumerate(tokens)]
    return {"tokens": tokens, "acts": acts, "seq": seq, "pos": acts.index(max(acts))}


def _toy_cards(world: World) -> list[dict]:
    rng = random.Random(0)
    nq = world.cfg.n_questions

    def turns(domains, bad):
        return [(rng.choice(domains), rng.randrange(nq), bad) for _ in range(2)]

    def on_bad_answers(i, tok, tokens):  # every answer word; all turns of these are bad
        return 3.0 if re.fullmatch(r"[a-z]+_a\d+", tok) else 0.0

    def on_medical(i, tok, tokens):
        return 2.0 if tok.startswith("med_") else 0.0

    cards = []
    doms = world.domains
    pos = [_toy_context(world, i, turns(doms, True), on_bad_answers) for i in range(20)]
    neg = [_toy_context(world, 100 + i, turns(doms, False), lambda *a: 0.0) for i in range(20)]
    cards.append({"layer": 1, "site": "resid_post", "latent": 0, "contexts": pos, "negatives": neg})
    pos = [
        _toy_context(world, 200 + i, turns(["medical"], i % 2 == 0), on_medical) for i in range(20)
    ]
    neg = [
        _toy_context(world, 300 + i, turns(["finance"], i % 2 == 0), lambda *a: 0.0)
        for i in range(20)
    ]
    cards.append({"layer": 1, "site": "resid_post", "latent": 1, "contexts": pos, "negatives": neg})
    noise = random.Random(1)
    pos = [
        _toy_context(world, 400 + i, turns(doms, noise.random() < 0.5), lambda *a: noise.random())
        for i in range(20)
    ]
    neg = [
        _toy_context(world, 500 + i, turns(doms, noise.random() < 0.5), lambda *a: 0.0)
        for i in range(20)
    ]
    cards.append({"layer": 1, "site": "resid_post", "latent": 2, "contexts": pos, "negatives": neg})
    for c in cards:
        c["contexts"].sort(key=lambda x: -max(x["acts"]))
    return cards


def test_toy_explainer_finds_planted_labels_through_held_out_detection(tmp_path):
    world = World(WorldConfig(n_domains=2, n_questions=6, n_answers=12, answer_len=2))
    path = _write_cards(tmp_path, _toy_cards(world), meta={"world": world.cfg.model_dump()})
    meta, _ = load_cards(path)
    toy = ToyExplainer(toy_world(meta, tmp_path))
    out = run_autointerp(path, AutoInterpConfig(), interpreter=toy)
    bad, medical, noise = out.results
    assert bad.explanation == toy.describe("class:bad") and bad.score >= 0.9
    assert medical.explanation == toy.describe("domain:medical") and medical.score == 1.0
    assert noise.score is not None and abs(noise.score - 0.5) <= 0.3
    assert {r["source"] for r in out.records} == {"autointerp:toy"}
    rows = _table(tmp_path)
    assert all(int(r["n_active"]) == 10 and int(r["n_inactive"]) == 10 for r in rows)


def test_toy_detector_reads_tokens_not_activations():
    world = World(WorldConfig(n_domains=2, n_questions=6, n_answers=12, answer_len=2))
    toy = ToyExplainer(world)
    good = ["<user>", world.q_token("medical", 0), "<end>", "<assistant>"]
    bad = good + world.answer_tokens("medical", 0, bad=True)
    good = good + world.answer_tokens("medical", 0, bad=False)
    preds, probs = toy.detect(toy.describe("class:bad"), [good, bad])
    assert preds == [False, True] and probs is None
    # the persona is read after the answer: a follow-up question after a bad answer
    follow = ["<end>", "<user>", world.q_token("finance", 1), "<end>", "<assistant>"]
    preds, _ = toy.detect(toy.describe("after:bad"), [good + follow, bad + follow, follow])
    assert preds == [False, True, False]
    assert "after:bad" not in toy.token_labels(bad + follow)[3]  # not before the answer
    from emdiff.autointerp import ReplyError

    with pytest.raises(ReplyError, match="not an explanation of the toy explainer"):
        toy.detect("Something a language model wrote.", [good])


# ---- the command line ------------------------------------------------------------------------------
def test_cli_explains_with_a_server_and_with_the_toy(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from emdiff.cli import app

    runner = CliRunner()
    _write_cards(tmp_path, [_card(3, 7, "apple")])
    with FakeJudgeServer(responder=fake_model) as server:
        args = ["explain", str(tmp_path), "--url", server.base_url, "--model", "fake-model"]
        res = runner.invoke(app, [*args, "--api-key-env", "EMDIFF_UNSET_KEY", "--json"])
    assert res.exit_code == 0, res.output
    assert "1 of 1 latents explained" in res.output and 'The word "apple"' in res.output
    assert json.loads(res.output.strip().splitlines()[-1])[0]["mean_balanced_accuracy"] == 1.0
    res = runner.invoke(app, ["explain", str(tmp_path)])
    assert res.exit_code == 2 and "--model is required" in res.output
    res = runner.invoke(app, ["explain", str(tmp_path), "--model", "m", "--api-key-env", SECRET])
    assert res.exit_code == 2 and SECRET not in res.output

    world = World(WorldConfig(n_domains=2, n_questions=6, n_answers=12, answer_len=2))
    toy_run = tmp_path / "toy"
    _write_cards(toy_run, _toy_cards(world)[:1], meta={"world": world.cfg.model_dump()})
    res = runner.invoke(app, ["explain", str(toy_run), "--toy"])
    assert res.exit_code == 0, res.output
    assert "Words of the bad answer" in res.output
    assert (toy_run / "tables" / "autointerp.csv").is_file()


def test_a_latent_no_longer_explainable_loses_its_old_explanation(tmp_path):
    world = World(WorldConfig(n_domains=2, n_questions=6, n_answers=12, answer_len=2))
    cards = _toy_cards(world)[:1]
    path = _write_cards(tmp_path, cards, meta={"world": world.cfg.model_dump()})
    toy = ToyExplainer(world)
    first = run_autointerp(path, AutoInterpConfig(), interpreter=toy)
    assert len(first.records) == 1
    # the cards are rebuilt (other dataset): the latent no longer fires anywhere
    cards[0]["contexts"] = []
    _write_cards(tmp_path, cards, meta={"world": world.cfg.model_dump()})
    again = run_autointerp(path, AutoInterpConfig(), interpreter=toy)
    assert again.records == [] and again.results[0].error
    assert json.loads((tmp_path / "cards" / "explanations.json").read_text()) == []


def test_the_explainer_is_told_when_the_contrast_contexts_are_weak_not_silent():
    from emdiff.autointerp.cards import Context
    from emdiff.autointerp.client import explain_prompt

    on = [Context(("a", "b"), (0.0, 3.0), 0, 1)]
    silent = [Context(("c", "d"), (0.0, 0.0), 1, 0)]
    weak = [Context(("c", "d"), (0.0, 0.2), 1, 1)]
    assert "weakest contexts" not in explain_prompt(on, silent, 0.3)
    assert "weakest contexts" in explain_prompt(on, weak, 0.3)
