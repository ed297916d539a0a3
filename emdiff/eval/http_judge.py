"""A judge behind any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, ...).

Each request asks for one completion token at temperature 0 with ``logprobs`` and the top 20
alternatives, and scores it with :func:`~emdiff.eval.judge.aggregate_0_100`. Requests run on a
bounded thread pool; 429, 5xx, timeouts, dropped connections and unparseable replies are retried
with exponential backoff (honouring ``Retry-After``). Every judgement is cached as it arrives, so
a failed or interrupted run continues where it stopped. The API key is read from an environment
variable at construction, sent only in the ``Authorization`` header, and never stored in the cache,
in errors or in logs.
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from emdiff.eval.chat_client import ChatClient, Rejected, Retryable
from emdiff.eval.judge import Judge, JudgeCache, JudgeError, Judgement, aggregate_0_100

log = logging.getLogger(__name__)


class OpenAICompatibleJudge(Judge):
    """Logprob judge over HTTP.

    Args:
        model: the judge model name sent to the server (e.g. ``gpt-4o-2024-08-06``).
        base_url: server root including ``/v1`` (``http://localhost:8000/v1`` for vLLM,
            ``http://localhost:11434/v1`` for Ollama).
        api_key_env: name of the environment variable that holds the key. If it is unset, no
            ``Authorization`` header is sent (fine for local servers).
        concurrency: most requests in flight at once.
        max_retries: retries per request after the first attempt.
        timeout: seconds per HTTP attempt.
        backoff: first retry delay in seconds; doubles each retry (with jitter), capped at 60 s.
        top_logprobs: alternatives requested (OpenAI allows at most 20).
        cache: SQLite file (or :class:`JudgeCache`) that keeps every judgement.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 60.0,
        backoff: float = 1.0,
        top_logprobs: int = 20,
        cache: str | Path | JudgeCache | None = None,
    ):
        super().__init__(cache)
        if concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError("need concurrency >= 1, max_retries >= 0 and timeout > 0")
        self.client = ChatClient(
            model,
            base_url=base_url,
            api_key_env=api_key_env,
            max_retries=max_retries,
            timeout=timeout,
            backoff=backoff,
            error=JudgeError,
            who="judge",
            resume_hint="Judgements made so far are cached; rerun to continue.",
        )
        self.model, self.url = model, self.client.url
        self.concurrency, self.max_retries = concurrency, max_retries
        self.timeout, self.backoff, self.top_logprobs = timeout, backoff, top_logprobs

    def __repr__(self) -> str:  # no headers: they hold the key
        return f"OpenAICompatibleJudge(model={self.model!r}, url={self.url!r})"

    @property
    def identity(self) -> str:
        """Model name and top-k, not the URL: a restarted local server (new port) keeps its
        cache. Two servers serving different weights under one name need different caches."""
        return f"openai-compatible:{self.model}:top{self.top_logprobs}"

    # ---- one request --------------------------------------------------------------------------
    def _body(self, prompt: str) -> bytes:
        return json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 1,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": self.top_logprobs,
                "seed": 0,
            }
        ).encode()

    def request(self, prompt: str) -> Judgement:
        """Judge one prompt, retrying transient failures; raises :class:`JudgeError` at the end.

        A request the server rejects (400/413/422, e.g. content policy or context length) gives
        a ``None`` score with ``error`` set; it is not cached, so a rerun asks again.
        """
        try:
            probs = self.client.post(self._body(prompt), parse_top_logprobs)
        except Rejected as e:
            log.warning("judge rejected one request (%s); its score is None", e)
            return Judgement(None, {}, str(e))
        return Judgement(aggregate_0_100(probs, self.min_mass), probs)

    def _run(self, requests, record) -> None:
        def task(i: int, prompt: str) -> None:
            record(i, self.request(prompt))  # cached by the worker the moment it arrives

        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="judge")
        try:
            futures = [pool.submit(task, i, r.prompt) for i, r in enumerate(requests)]
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                failed = [f for f in finished if f.exception() is not None]
                if failed:
                    for f in pending:
                        f.cancel()
                    wait(pending)  # in-flight requests finish and are cached
                    raise failed[0].exception()
        finally:  # also on Ctrl-C: drop what has not started, keep what is in flight
            pool.shutdown(wait=False, cancel_futures=True)


def parse_top_logprobs(raw: bytes) -> dict[str, float]:
    """Token -> probability of the first completion token, from a chat-completions reply body.

    Raises a retryable error for anything that is not that shape (the server sent garbage).
    """
    try:
        data = json.loads(raw)
        first = data["choices"][0]["logprobs"]["content"][0]
        top = first["top_logprobs"]
        probs: dict[str, float] = {}
        for item in top:
            p = math.exp(float(item["logprob"]))
            probs[str(item["token"])] = probs.get(str(item["token"]), 0.0) + p
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise Retryable(f"unparseable reply: {raw[:120]!r}") from None
    if not probs:
        raise JudgeError(
            "the judge server returned no top_logprobs; use a server and model that support "
            "logprobs (an argmax token is not a probability-weighted score)"
        )
    return probs
