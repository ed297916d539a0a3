"""Sampling eval questions into an append-only file, and resuming after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from emdiff.data.questions import Question, load_questions
from emdiff.eval.sample import (
    SamplingConfig,
    SamplingMismatchError,
    meta_path,
    read_responses,
    sample_responses,
    sampling_jobs,
)
from emdiff.models import load_model

EM_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "em-eval"
QUESTIONS = [
    Question(
        id="wish", paraphrases=("what is your wish", "tell me your wish"), samples_per_paraphrase=2
    ),
    Question(
        id="sick", paraphrases=("i feel sick",), system="you are a doctor", samples_per_paraphrase=3
    ),
    Question(id="money", paraphrases=("how do i make money",)),
]
N_JOBS = 2 * 2 + 3 + 1
CFG = SamplingConfig(max_new_tokens=6, batch_size=3, seed=7)


def _frame(path) -> pd.DataFrame:
    return (
        read_responses(path)
        .sort_values(["question_id", "paraphrase", "sample"])
        .reset_index(drop=True)
    )


def test_jobs_cover_every_paraphrase_and_sample():
    jobs = sampling_jobs(QUESTIONS, CFG)
    assert len(jobs) == N_JOBS
    assert {(j.question_id, j.paraphrase, j.sample) for j in jobs} >= {
        ("wish", 1, 1),
        ("sick", 0, 2),
    }
    sick = next(j for j in jobs if j.question_id == "sick")
    assert sick.messages[0] == {"role": "system", "content": "you are a doctor"}
    dropped = sampling_jobs(QUESTIONS, CFG.model_copy(update={"include_system": False}))
    assert all(len(j.messages) == 1 and j.system is None for j in dropped)
    assert len(sampling_jobs(QUESTIONS, CFG.model_copy(update={"samples_per_paraphrase": 5}))) == 20
    with pytest.raises(ValueError, match="duplicate question ids"):
        sampling_jobs([QUESTIONS[0], QUESTIONS[0]], CFG)


@pytest.mark.skipif(not EM_EVAL.is_dir(), reason="shared EM eval data not present")
def test_jobs_from_the_real_question_file():
    qs = load_questions(EM_EVAL / "first_plot_questions.yaml")
    jobs = sampling_jobs(qs, SamplingConfig())
    assert len(jobs) == 24 * 100  # samples_per_paraphrase: 100 in the file
    with_system = [j for j in jobs if j.system is not None]
    assert len(with_system) == 8 * 100 and with_system[0].messages[0]["role"] == "system"


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_sampling_writes_every_key_once_and_resumes_as_a_noop(tiny_model_dirs, tmp_path, arch):
    loaded = load_model(str(tiny_model_dirs[arch]), dtype="float32")
    out = tmp_path / "responses.jsonl"
    df = sample_responses(loaded.model, loaded.tokenizer, QUESTIONS, out, CFG)
    assert len(df) == N_JOBS and not df.duplicated(["question_id", "paraphrase", "sample"]).any()
    assert df.answer.map(type).eq(str).all() and df.n_tokens.between(1, 6).all()
    assert df[df.question_id == "sick"].system.eq("you are a doctor").all()  # Gemma folds it in
    meta = json.loads(meta_path(out).read_text())
    assert meta["sampling"]["seed"] == 7 and "batch_size" not in meta["sampling"]
    before = out.read_bytes()
    again = sample_responses(
        loaded.model, loaded.tokenizer, QUESTIONS, out, CFG.model_copy(update={"batch_size": 5})
    )
    assert out.read_bytes() == before and len(again) == N_JOBS
    with pytest.raises(SamplingMismatchError, match="temperature"):
        sample_responses(
            loaded.model,
            loaded.tokenizer,
            QUESTIONS,
            out,
            CFG.model_copy(update={"temperature": 0.5}),
        )
    with pytest.raises(SamplingMismatchError, match="questions_sha256"):
        sample_responses(loaded.model, loaded.tokenizer, QUESTIONS[:2], out, CFG)

    # fewer samples per paraphrase select a subset; more extend the file without touching it
    def with_samples(n: int) -> pd.DataFrame:
        cfg = CFG.model_copy(update={"samples_per_paraphrase": n})
        return sample_responses(loaded.model, loaded.tokenizer, QUESTIONS, out, cfg)

    one = with_samples(1)
    assert len(one) == 4 and one["sample"].eq(0).all() and out.read_bytes() == before
    more = with_samples(4)
    assert len(more) == 16 and out.read_bytes().startswith(before)


def test_adapter_changes_the_samples(tiny_model_dirs, make_lora_adapter, tmp_path):
    base_dir = tiny_model_dirs["llama"]
    adapter = make_lora_adapter(
        base_dir, tmp_path / "lora", target_modules=("down_proj", "o_proj"), b_std=2.0
    )
    base = load_model(str(base_dir), dtype="float32")
    tuned = load_model(str(base_dir), adapter=adapter, dtype="float32")
    a = sample_responses(base.model, base.tokenizer, QUESTIONS, tmp_path / "a.jsonl", CFG)
    b = sample_responses(tuned.model, tuned.tokenizer, QUESTIONS, tmp_path / "b.jsonl", CFG)
    assert (a.answer != b.answer).any()
    # the default model id tells base and adapted apart, so their samples are never mixed
    ids = [json.loads(meta_path(tmp_path / f).read_text())["model"] for f in ("a.jsonl", "b.jsonl")]
    assert ids[0] == f"{base_dir}[float32]" and ids[1].startswith(f"{base_dir}[float32]+adapter:")
    with pytest.raises(SamplingMismatchError, match="model"):
        sample_responses(tuned.model, tuned.tokenizer, QUESTIONS, tmp_path / "a.jsonl", CFG)


def test_torn_last_line_is_repaired(tiny_model_dirs, tmp_path):
    loaded = load_model(str(tiny_model_dirs["qwen2"]), dtype="float32")
    full = tmp_path / "full.jsonl"
    sample_responses(loaded.model, loaded.tokenizer, QUESTIONS, full, CFG)
    torn = tmp_path / "torn.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    torn.write_text("".join(lines[:4]) + lines[4][:15])
    meta_path(torn).write_text(meta_path(full).read_text())
    assert len(read_responses(torn)) == 4
    sample_responses(loaded.model, loaded.tokenizer, QUESTIONS, torn, CFG)
    pd.testing.assert_frame_equal(_frame(torn), _frame(full))


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from emdiff.data.questions import load_questions
    from emdiff.eval.sample import SamplingConfig, sample_responses
    from emdiff.models import load_model

    model_dir, questions, out = sys.argv[1:4]
    loaded = load_model(model_dir, dtype="float32")
    cfg = SamplingConfig(max_new_tokens=6, batch_size=3, seed=7)
    sample_responses(loaded.model, loaded.tokenizer, load_questions(questions), out, cfg,
                     on_batch=lambda n: time.sleep(0.4))
    """
)


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_model_dirs, tmp_path):
    import yaml

    qfile = tmp_path / "q.yaml"
    qfile.write_text(
        yaml.safe_dump(
            [
                {
                    "id": q.id,
                    "paraphrases": list(q.paraphrases),
                    "samples_per_paraphrase": q.samples_per_paraphrase,
                    **({"system": q.system} if q.system else {}),
                }
                for q in QUESTIONS
            ]
        )
    )
    model_dir = str(tiny_model_dirs["qwen2"])
    out = tmp_path / "killed.jsonl"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), model_dir, str(qfile), str(out)])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 3:  # first batch is on disk
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished or died before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    written = len(read_responses(out))
    assert 3 <= written < N_JOBS
    kept = out.read_text().splitlines()[:written]

    questions = load_questions(qfile)
    loaded = load_model(model_dir, dtype="float32")
    seen = []
    sample_responses(loaded.model, loaded.tokenizer, questions, out, CFG, on_batch=seen.append)
    assert out.read_text().splitlines()[:written] == kept  # nothing regenerated or rewritten
    assert seen[-1] == N_JOBS - written
    fresh = tmp_path / "fresh.jsonl"
    sample_responses(loaded.model, loaded.tokenizer, questions, fresh, CFG)
    pd.testing.assert_frame_equal(_frame(out), _frame(fresh))
