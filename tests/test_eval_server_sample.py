"""Sampling through an OpenAI-compatible server (a local fake one): the same rows as HF
sampling, resumed after an outage without asking twice, faults retried or refused in one line,
and the API key never written."""

from __future__ import annotations

import json

import pytest
from fake_judge_server import FakeJudgeServer, text_completion

from emdiff.data.questions import Question
from emdiff.eval.sample import COLUMNS, SamplingConfig, SamplingMismatchError
from emdiff.eval.server_sample import ServerConfig, ServerError, sample_from_server

QUESTIONS = [Question(id=f"q{i}", paraphrases=(f"question {i}", f"again {i}")) for i in range(3)]
CFG = SamplingConfig(max_new_tokens=12, samples_per_paraphrase=2, seed=5)


def answer(body: dict) -> dict:
    """Echo the question with the request's seed and limits (so rows can be checked)."""
    reply = text_completion(f"{body['messages'][-1]['content']} / {body['seed']}")
    reply["usage"] = {"completion_tokens": body["max_tokens"] - 2}
    return reply


def server_cfg(server: FakeJudgeServer, **kw) -> ServerConfig:
    return ServerConfig(base_url=server.base_url, model="served-lora", backoff=0.01, **kw)


def test_rows_and_request_settings(tmp_path):
    with FakeJudgeServer(responder=answer, delay_s=0) as server:
        df = sample_from_server(QUESTIONS, tmp_path / "r.jsonl", CFG, server_cfg(server))
    assert len(df) == 3 * 2 * 2 == len(server.requests) and list(df.columns) == list(COLUMNS)
    assert df["finished"].all() and (df["n_tokens"] == 10).all()
    body = server.requests[0]
    assert body["model"] == "served-lora" and body["max_tokens"] == 12 and body["temperature"] == 1
    first = df[(df.question_id == "q1") & (df.paraphrase == 1) & (df["sample"] == 0)].iloc[0]
    assert first.answer.startswith("again 1 / ")
    assert len({r["seed"] for r in server.requests}) == len(server.requests)  # one per job


def test_outage_keeps_what_arrived_and_resume_asks_only_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("EMDIFF_SERVER_KEY", "sk-server-secret")
    out = tmp_path / "r.jsonl"
    cfg_kw = {"concurrency": 1, "max_retries": 0, "api_key_env": "EMDIFF_SERVER_KEY"}
    script = ["ok"] * 5 + ["down"]
    with (
        FakeJudgeServer(script=script, responder=answer, delay_s=0) as server,
        pytest.raises(ServerError, match=r"kept in .*rerun to continue"),
    ):
        sample_from_server(QUESTIONS, out, CFG, server_cfg(server, **cfg_kw))
    assert len(out.read_text().splitlines()) == 5
    with FakeJudgeServer(responder=answer, delay_s=0) as server:
        df = sample_from_server(QUESTIONS, out, CFG, server_cfg(server, **cfg_kw))
    assert len(df) == 12 and len(server.requests) == 12 - 5
    assert all(h.get("Authorization") == "Bearer sk-server-secret" for h in server.headers)
    for f in tmp_path.iterdir():
        assert "sk-server-secret" not in f.read_text()
    hotter = CFG.model_copy(update={"temperature": 0.5})
    with pytest.raises(SamplingMismatchError, match="other settings"):
        sample_from_server(QUESTIONS, out, hotter, server_cfg(server))


def test_faults_are_retried_or_refused_in_one_line(tmp_path):
    with FakeJudgeServer(script=["429", "500", "garbage"], responder=answer, delay_s=0) as server:
        cfg = server_cfg(server, concurrency=1, max_retries=3, timeout=5)
        df = sample_from_server(QUESTIONS[:1], tmp_path / "a.jsonl", CFG, cfg)
    assert len(df) == 4 and len(server.requests) == 4 + 3
    with (
        FakeJudgeServer(script=["400"], responder=answer, delay_s=0) as server,
        pytest.raises(ServerError, match="refused question 'q0' paraphrase 0 sample 0"),
    ):
        cfg = server_cfg(server, concurrency=1)
        sample_from_server(QUESTIONS[:1], tmp_path / "b.jsonl", CFG, cfg)
    assert json.loads((tmp_path / "b.jsonl.meta.json").read_text())["model"] == "server:served-lora"


def test_rows_come_back_in_job_order_whatever_order_they_arrived(tmp_path):
    from emdiff.eval.sample import read_responses, responses_in_job_order, sampling_jobs

    with FakeJudgeServer(responder=answer, delay_s=0) as server:
        df = sample_from_server(QUESTIONS, tmp_path / "r.jsonl", CFG, server_cfg(server))
    jobs = sampling_jobs(QUESTIONS, CFG)
    assert [
        tuple(r) for r in df[["question_id", "paraphrase", "sample"]].itertuples(index=False)
    ] == [j[:3] for j in jobs]
    shuffled = read_responses(tmp_path / "r.jsonl").sample(frac=1, random_state=0)
    assert responses_in_job_order(shuffled, jobs).equals(df)
    with pytest.raises(RuntimeError, match="1 sampling jobs have no answer"):
        responses_in_job_order(shuffled.iloc[1:], jobs)
