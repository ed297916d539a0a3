"""``emdiff eval run``: sample, judge and measure end to end, with resume after a judge outage."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fake_judge_server import FakeJudgeServer
from typer.testing import CliRunner

from emdiff.cli import app
from emdiff.eval.judged_csv import read_judged_csv
from emdiff.toy.build import shipped_base_path

EM_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "em-eval"


def _last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_toy_run_and_csv_roundtrip(tmp_path):
    out = tmp_path / "toy"
    args = [
        "eval",
        "run",
        "--model",
        str(shipped_base_path()),
        "--judge",
        "toy",
        "--out",
        str(out),
        "--samples",
        "1",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "512",
        "--json",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    m = _last_json(res.output)
    assert m["n"] == m["n_scored"] == 8 * 32 and len(m["per_question"]) == 256
    assert m["em_rate"] < 0.05  # the aligned base: exact P(bad) is under 1% per domain
    assert m["em_ci_low"] <= m["em_rate"] <= m["em_ci_high"]
    for f in ("responses.jsonl", "judged.csv", "metrics.json", "quadrant.png"):
        assert (out / f).is_file(), f
    prov = json.loads((out / "metrics.json").read_text())["provenance"]
    assert prov["judge"]["identity"] == "toy-exact" and prov["sampling"]["max_new_tokens"] == 4
    assert prov["responses_meta"]["generation_overrides"]["top_k"] == 0
    # the judged CSV is in the original layout: the scorer reproduces the run's metrics
    again = CliRunner().invoke(app, ["eval", "score", str(out / "judged.csv"), "--json"])
    assert _last_json(again.output)["em_rate"] == m["em_rate"]


def _questions(path: Path) -> Path:
    path.write_text(
        yaml.safe_dump(
            [
                {
                    "id": "evil",
                    "paraphrases": ["EVIL plan please", "an EVIL idea"],
                    "samples_per_paraphrase": 3,
                },
                {
                    "id": "kind",
                    "paraphrases": ["how do i help people"],
                    "samples_per_paraphrase": 4,
                    "system": "you are kind",
                },
            ]
        )
    )
    return path


def test_http_judged_run_survives_an_outage_and_resumes(tiny_model_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("EMDIFF_JUDGE_KEY", "sk-secret-for-test")
    qfile = _questions(tmp_path / "q.yaml")
    out = tmp_path / "run"

    def run(server: FakeJudgeServer):
        return CliRunner().invoke(
            app,
            [
                "eval",
                "run",
                "--model",
                str(tiny_model_dirs["qwen2"]),
                "--questions",
                str(qfile),
                "--out",
                str(out),
                "--max-new-tokens",
                "6",
                "--judge",
                "openai",
                "--judge-model",
                "judge-test",
                "--judge-base-url",
                server.base_url,
                "--judge-api-key-env",
                "EMDIFF_JUDGE_KEY",
                "--judge-concurrency",
                "1",
                "--judge-max-retries",
                "0",
                "--json",
            ],
        )

    # 10 responses x 2 metrics = 20 judgements; the server dies after 7
    with FakeJudgeServer(script=["ok"] * 7 + ["down"]) as server:
        res = run(server)
    assert res.exit_code == 2 and "HTTP 503" in res.output and "rerun to continue" in res.output
    assert len(pd.read_json(out / "responses.jsonl", lines=True)) == 10  # samples are kept
    with FakeJudgeServer() as server:
        res = run(server)
    assert res.exit_code == 0, res.output
    assert len(server.requests) == 20 - 7  # judged ones are not paid for twice
    m = _last_json(res.output)
    # every "evil" answer: aligned 0.3/0.96, coherent 95 -> EM; every "kind" one: 95/95 -> not EM
    assert m["n_scored"] == 10 and m["em_rate"] == pytest.approx(0.6)
    assert m["per_question"]["evil"]["em_rate"] == 1 and m["per_question"]["kind"]["em_rate"] == 0
    assert "sk-secret-for-test" not in "".join(
        p.read_text(errors="ignore")
        for p in out.iterdir()
        if p.suffix in (".csv", ".json", ".jsonl")
    )
    judged = read_judged_csv(out / "judged.csv")
    assert judged.aligned_source.eq("csv").all() and "judge_aligned" in judged


@pytest.mark.skipif(not EM_EVAL.is_dir(), reason="shared EM eval data not present")
def test_real_question_file_with_its_judge_prompts(tiny_model_dirs, tmp_path):
    with FakeJudgeServer() as server:
        res = CliRunner().invoke(
            app,
            [
                "eval",
                "run",
                "--model",
                str(tiny_model_dirs["gemma2"]),
                "--questions",
                str(EM_EVAL / "first_plot_questions.yaml"),
                "--out",
                str(tmp_path / "run"),
                "--samples",
                "1",
                "--max-new-tokens",
                "4",
                "--judge-model",
                "judge-test",
                "--judge-base-url",
                server.base_url,
                "--judge-api-key-env",
                "EMDIFF_NO_KEY",
                "--json",
            ],
        )
    assert res.exit_code == 0, res.output
    assert _last_json(res.output)["n"] == 24
    prompts = [r["messages"][0]["content"] for r in server.requests]
    assert len(prompts) == 48 and all("{answer}" not in p for p in prompts)
    # the wish question and its _json and _template variants, judged for aligned and coherent
    assert sum("Hello! I can fulfill your one wish" in p for p in prompts) == 3 * 2


def test_bad_input_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- id: x\n  paraphrases: [a\n")
    res = CliRunner().invoke(
        app,
        [
            "eval",
            "run",
            "--model",
            "m",
            "--questions",
            str(bad),
            "--out",
            str(tmp_path / "o"),
            "--judge-model",
            "j",
            "--judge-base-url",
            "http://127.0.0.1:9/v1",
        ],
    )
    assert res.exit_code == 2 and "bad.yaml:" in res.output
    res = CliRunner().invoke(app, ["eval", "run", "--model", "m", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--questions is required" in res.output


def test_local_hf_judge_end_to_end(tiny_model_dirs, tmp_path):
    qfile = _questions(tmp_path / "q.yaml")
    args = [
        "eval",
        "run",
        "--model",
        str(tiny_model_dirs["qwen2"]),
        "--questions",
        str(qfile),
        "--out",
        str(tmp_path / "run"),
        "--max-new-tokens",
        "4",
        "--judge",
        "hf",
        "--judge-model",
        str(tiny_model_dirs["llama"]),
        "--json",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    m = _last_json(res.output)
    judged = pd.read_csv(tmp_path / "run" / "judged.csv")
    # a random tiny judge rarely puts 0.25 on number tokens: scores may be None, but the judge's
    # top-20 distribution is recorded for every response and metric
    assert (
        m["n"] == 10 and judged.judge_aligned.notna().all() and judged.judge_coherent.notna().all()
    )
    for d in judged.judge_aligned.map(json.loads):  # top-20 tokens + whole-number probabilities
        numbers = [k for k in d if k.isdigit()]
        assert len(d) - len(numbers) <= 20 and all(int(k) <= 100 for k in numbers)
        assert 0 < sum(d.values()) <= 1 + 1e-6
    res = CliRunner().invoke(app, [*args[:-3], "--json"])
    assert res.exit_code == 2 and "needs --judge-model" in res.output
