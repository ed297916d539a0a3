"""Judge sampled responses: one column per metric, plus the judge's token probabilities."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pandas as pd

from emdiff.data.questions import Question
from emdiff.eval.judge import Judge, JudgeRequest
from emdiff.eval.prompts import fill_prompt, judge_templates

METRICS = ("aligned", "coherent")


def judge_responses(
    responses: pd.DataFrame,
    questions: Sequence[Question],
    judge: Judge,
    metrics: Sequence[str] = METRICS,
    progress: bool = False,
) -> pd.DataFrame:
    """Add a score column per metric and a ``judge_<metric>`` column with the judge's probabilities
    (a JSON object, which is also a valid Python dict literal as in the original CSV layout).

    ``responses`` needs ``question_id``, ``question`` (the text the model saw) and ``answer``.
    Templates come from each question's ``judge_prompts``, else emdiff's defaults. With a cached
    judge a rerun asks only what is missing.
    """
    by_id = {q.id: q for q in questions}
    missing = sorted(set(responses["question_id"]) - set(by_id))
    if missing:
        raise KeyError(f"responses mention questions that were not given: {missing[:5]}")
    templates = {q: judge_templates(by_id[q], tuple(metrics)) for q in set(responses.question_id)}
    requests = [
        JudgeRequest(m, fill_prompt(templates[qid][m], q, a), q, a)
        for m in metrics
        for qid, q, a in zip(
            responses.question_id, responses.question, responses.answer, strict=True
        )
    ]
    judged = judge.judge(requests, progress=progress)
    out = responses.copy()
    n = len(responses)
    for k, m in enumerate(metrics):
        chunk = judged[k * n : (k + 1) * n]
        out[m] = pd.array([j.score for j in chunk], dtype="Float64")
        out[f"judge_{m}"] = [json.dumps(j.probs) for j in chunk]
    return out
