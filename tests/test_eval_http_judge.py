"""The OpenAI-compatible judge over real HTTP against a local scripted server."""

from __future__ import annotations

import logging

import pytest
from fake_judge_server import REPLIES, FakeJudgeServer

from emdiff.eval.http_judge import OpenAICompatibleJudge, parse_top_logprobs
from emdiff.eval.judge import JudgeCache, JudgeError, JudgeRequest, aggregate_0_100

SECRET = "sk-test-DO-NOT-LEAK-1234567890"


def _judge(server: FakeJudgeServer, **kw) -> OpenAICompatibleJudge:
    # generous timeout, so a loaded CI machine never turns a normal reply into a retry
    kw = {"timeout": 10.0, "backoff": 0.01, "max_retries": 3, "concurrency": 4, **kw}
    return OpenAICompatibleJudge("judge-test", base_url=server.base_url, **kw)


def _req(answer: str, metric: str = "aligned") -> JudgeRequest:
    return JudgeRequest(metric, f"Rate this. Q: hi A: {answer}", "hi", answer)


def test_success_sends_the_chat_completions_request_and_aggregates():
    with FakeJudgeServer() as server:
        out = _judge(server).judge([_req("kind words"), _req("EVIL plan"), _req("CODEBLOCK")])
    body = server.requests[0]
    assert body["max_tokens"] == 1 and body["temperature"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    assert body["model"] == "judge-test" and body["messages"][0]["role"] == "user"
    # fine: (100*.8 + 90*.15) / .95; evil: (0*.9 + 5*.06) / .96; code: 0.05 < 0.25 -> None
    assert out[0].score == pytest.approx((80 + 13.5) / 0.95)
    assert out[1].score == pytest.approx(0.3 / 0.96)
    assert out[2].score is None
    assert out[1].probs == pytest.approx(REPLIES["evil"])


@pytest.mark.parametrize("fault", ["429", "500", "sleep", "garbage", "badstatus"])
def test_transient_fault_then_success(fault):
    timeout = 0.5 if fault == "sleep" else 10.0  # the server sleeps 1 s
    with FakeJudgeServer(script=[fault]) as server:
        (j,) = _judge(server, concurrency=1, timeout=timeout).judge([_req("kind words")])
    assert j.score == pytest.approx((80 + 13.5) / 0.95)
    assert len(server.requests) == 2  # one failure, one retry


def test_persistent_garbage_gives_a_clear_error():
    with (
        FakeJudgeServer(script=["garbage"] * 10) as server,
        pytest.raises(JudgeError, match=r"unparseable reply.*rerun to continue"),
    ):
        _judge(server, max_retries=2, concurrency=1).judge([_req("x")])
    assert len(server.requests) == 3


def test_server_down_keeps_judgements_and_rerun_continues(tmp_path):
    cache = tmp_path / "cache.sqlite"
    requests = [_req(f"answer {i}") for i in range(12)]
    with (
        FakeJudgeServer(script=["ok"] * 5 + ["down"]) as server,
        pytest.raises(JudgeError, match="HTTP 503"),
    ):
        _judge(server, cache=cache, concurrency=1, max_retries=1).judge(requests)
    kept = len(JudgeCache(cache))
    assert kept == 5
    with FakeJudgeServer() as server:
        out = _judge(server, cache=cache).judge(requests)
    assert len(server.requests) == 12 - kept  # only the missing ones are asked
    assert all(j.score == pytest.approx((80 + 13.5) / 0.95) for j in out)
    with FakeJudgeServer() as server:  # everything cached now: no HTTP at all
        _judge(server, cache=cache).judge(requests)
    assert server.requests == []


def test_concurrency_is_bounded_and_duplicates_are_asked_once():
    requests = [_req(f"answer {i % 10}") for i in range(40)]
    with FakeJudgeServer() as server:
        out = _judge(server, concurrency=3).judge(requests)
    assert len(server.requests) == 10 and len(out) == 40
    assert 1 < server.max_in_flight <= 3


def test_api_key_is_sent_but_never_stored_or_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EMDIFF_TEST_KEY", SECRET)
    cache = tmp_path / "cache.sqlite"
    caplog.set_level(logging.DEBUG)
    with FakeJudgeServer(script=["429", "500"]) as server:
        judge = _judge(server, api_key_env="EMDIFF_TEST_KEY", cache=cache, concurrency=1)
        judge.judge([_req("kind words")])
    assert server.headers[-1]["Authorization"] == f"Bearer {SECRET}"
    assert "429" in caplog.text  # retries were logged ...
    assert SECRET not in caplog.text  # ... without the key
    assert SECRET not in repr(judge) and SECRET.encode() not in cache.read_bytes()
    with FakeJudgeServer(script=["down"]) as server:
        judge = _judge(server, api_key_env="EMDIFF_TEST_KEY", max_retries=0, concurrency=1)
        with pytest.raises(JudgeError) as err:
            judge.judge([_req("other words")])
    assert SECRET not in str(err.value)


def test_no_key_sends_no_authorization_and_openai_requires_one(monkeypatch):
    monkeypatch.delenv("EMDIFF_UNSET_KEY", raising=False)
    with FakeJudgeServer() as server:
        _judge(server, api_key_env="EMDIFF_UNSET_KEY").judge([_req("x")])
    assert "Authorization" not in server.headers[0]
    with pytest.raises(JudgeError, match="EMDIFF_UNSET_KEY is not set"):
        OpenAICompatibleJudge("gpt-4o", api_key_env="EMDIFF_UNSET_KEY")


def test_parse_top_logprobs_matches_aggregation():
    import json

    from fake_judge_server import completion

    probs = parse_top_logprobs(json.dumps(completion({"30": 0.5, "70": 0.5})).encode())
    assert aggregate_0_100(probs) == pytest.approx(50.0)


def test_a_rejected_request_scores_none_and_the_run_goes_on(tmp_path):
    cache = tmp_path / "c.sqlite"
    with FakeJudgeServer(script=["ok", "400"]) as server:
        out = _judge(server, concurrency=1, cache=cache).judge([_req("a"), _req("b"), _req("c")])
    assert [j.score is None for j in out] == [False, True, False]
    assert "HTTP 400" in out[1].error and "content policy" in out[1].error
    assert len(JudgeCache(cache)) == 2  # the rejection is not cached: a rerun asks again


def test_auth_failure_is_fatal_and_hides_the_key(monkeypatch):
    monkeypatch.setenv("EMDIFF_TEST_KEY", SECRET)
    with FakeJudgeServer(script=["401"]) as server, pytest.raises(JudgeError) as err:
        _judge(server, api_key_env="EMDIFF_TEST_KEY").judge([_req("a")])
    assert "HTTP 401" in str(err.value) and SECRET[-8:] not in str(err.value)


def test_server_without_logprobs_is_a_clear_error():
    with (
        FakeJudgeServer(script=["nologprobs"]) as server,
        pytest.raises(JudgeError, match="top_logprobs"),
    ):
        _judge(server).judge([_req("a")])


def test_settings_are_checked_before_any_request(monkeypatch):
    with pytest.raises(JudgeError, match="http:// or https://"):
        OpenAICompatibleJudge("m", base_url="localhost:8000/v1")
    with pytest.raises(JudgeError, match="NAME of an environment variable") as err:
        OpenAICompatibleJudge("m", base_url="http://127.0.0.1:9/v1", api_key_env=SECRET)
    assert SECRET not in str(err.value)


@pytest.fixture
def sigint_handler():
    """Python's SIGINT handler for one test: a process started in the background by a
    non-interactive shell ignores SIGINT, and then ``interrupt_main()`` does nothing."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_interrupt_keeps_every_answered_judgement(tmp_path, sigint_handler):
    import _thread
    import threading
    import time

    cache = tmp_path / "c.sqlite"
    # 200 requests at 2 x 0.05 s take 5 s: room for the interrupt on a loaded machine
    requests = [_req(f"answer {i}") for i in range(200)]
    with FakeJudgeServer(delay_s=0.05) as server:

        def interrupt_after_six():
            while len(server.requests) < 6:
                time.sleep(0.005)
            _thread.interrupt_main()

        threading.Thread(target=interrupt_after_six, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            _judge(server, concurrency=2, cache=cache).judge(requests)
        time.sleep(0.5)  # requests in flight at the interrupt finish in the background
        asked = len(server.requests)
    assert asked < 100  # queued requests were dropped, not sent
    assert len(JudgeCache(cache)) == asked  # every answered request was cached
