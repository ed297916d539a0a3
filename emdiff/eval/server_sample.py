"""Sampling through an OpenAI-compatible chat-completions server (vLLM's, as the EM and CLR
repositories use) instead of HF generate.

Same jobs, same JSONL rows and the same resume rule as :func:`emdiff.eval.sample.sample_responses`:
every answer is appended (and fsynced) as it arrives, a rerun asks only for the jobs missing from
the file, and a file sampled with other settings is refused. Requests run on a bounded thread
pool through :class:`~emdiff.eval.chat_client.ChatClient` (retries, ``Retry-After``, the key only
from an environment variable). Each request carries a seed derived from the run's seed and the
job, so a server that honours ``seed`` (vLLM does) gives the same answers on a rerun.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from emdiff.data.questions import Question
from emdiff.errors import ServiceError
from emdiff.eval.chat_client import ChatClient, Rejected, Retryable
from emdiff.eval.sample import (
    COLUMNS,
    KEY,
    Job,
    SamplingConfig,
    _batch_seed,
    _check_meta,
    _drop_partial_line,
    _sha,
    read_responses,
    responses_in_job_order,
    sampling_jobs,
)


class ServerError(ServiceError):
    """The server gave no usable answer; what was sampled before stays in the file."""


class ServerConfig(BaseModel):
    """Where the answers come from: an OpenAI-compatible server and the model name it serves."""

    base_url: str
    """Server root with ``/v1`` (``http://localhost:8000/v1`` for ``vllm serve``)."""
    model: str
    """The served model name (for a LoRA under vLLM, the name given to ``--lora-modules``)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the key (None: no key, a local server)."""
    concurrency: int = Field(16, ge=1)
    max_retries: int = Field(6, ge=0)
    timeout: float = Field(300.0, gt=0)
    backoff: float = Field(1.0, gt=0)
    """First retry delay in seconds (doubles each retry)."""


def _parse(raw: bytes) -> tuple[str, int | None, bool]:
    """Answer text, completion tokens (None when the server does not say) and whether it
    stopped by itself; a reply that is not chat-completions JSON is retried."""
    try:
        body = json.loads(raw)
        choice = body["choices"][0]
        text = choice["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise Retryable(f"not a chat-completions reply: {raw[:120]!r}") from None
    if not isinstance(text, str):
        raise Retryable("the reply has no text")
    usage = body.get("usage") or {}
    tokens = usage.get("completion_tokens")
    return text, tokens if isinstance(tokens, int) else None, choice.get("finish_reason") == "stop"


def _ask(client: ChatClient, job: Job, cfg: SamplingConfig) -> dict:
    payload = {
        "messages": job.messages,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "max_tokens": cfg.max_new_tokens,
        "seed": _batch_seed(cfg.seed, job),
    }
    try:
        text, tokens, finished = client.post(payload, _parse)
    except Rejected as e:
        where = f"question {job.question_id!r} paraphrase {job.paraphrase} sample {job.sample}"
        raise ServerError(f"{client.url} refused {where}: {e}") from None
    return dict(zip(COLUMNS, (*job[:5], text, tokens, finished), strict=True))


def sample_from_server(
    questions: Sequence[Question],
    out: str | Path,
    cfg: SamplingConfig,
    server: ServerConfig,
    *,
    progress: bool = False,
) -> pd.DataFrame:
    """Sample every job missing from ``out`` (JSONL) from ``server``; return the responses to
    exactly these jobs, in the layout of :func:`~emdiff.eval.sample.sample_responses`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    identity = {
        "model": f"server:{server.model}",  # not its URL: a restarted server may move
        "sampling": cfg.model_dump(exclude={"batch_size", "samples_per_paraphrase"}),
        "questions_sha256": _sha([[q.id, q.system, list(q.paraphrases)] for q in questions]),
    }
    _check_meta(out, identity)
    _drop_partial_line(out)
    done = {tuple(r) for r in read_responses(out)[list(KEY)].itertuples(index=False)}
    jobs = sampling_jobs(questions, cfg)
    todo = [j for j in jobs if j[:3] not in done]
    client = ChatClient(
        server.model,
        base_url=server.base_url,
        api_key_env=server.api_key_env,
        max_retries=server.max_retries,
        timeout=server.timeout,
        backoff=server.backoff,
        error=ServerError,
        who="sampling",
        resume_hint=f"The answers received are kept in {out}; rerun to continue.",
    )
    bar = tqdm(total=len(todo), desc="sample (server)", unit="answer", disable=not progress)
    with out.open("a") as fh, ThreadPoolExecutor(server.concurrency) as pool:
        pending = {pool.submit(_ask, client, job, cfg) for job in todo[: 2 * server.concurrency]}
        queue = iter(todo[2 * server.concurrency :])
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    fh.write(json.dumps(fut.result()) + "\n")
                    fh.flush()
                    os.fsync(fh.fileno())
                    bar.update(1)
                    nxt = next(queue, None)
                    if nxt is not None:
                        pending.add(pool.submit(_ask, client, nxt, cfg))
        finally:
            for fut in pending:
                fut.cancel()
            bar.close()
    return responses_in_job_order(read_responses(out), jobs)
