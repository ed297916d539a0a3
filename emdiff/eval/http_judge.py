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

import http.client
import json
import logging
import math
import os
import random
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from emdiff.eval.judge import Judge, JudgeCache, JudgeError, Judgement, aggregate_0_100

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
REJECT_STATUS = frozenset({400, 413, 422})
"""The server refused this one request (content policy, too long): score None, run goes on."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class _Rejected(Exception):
    pass


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


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
        if not base_url.startswith(("http://", "https://")):
            raise JudgeError(
                f"judge base_url must start with http:// or https://, got {base_url!r}"
            )
        if api_key_env and not _ENV_NAME.fullmatch(api_key_env):
            raise JudgeError(
                "api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                "not the key itself"
            )
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.concurrency, self.max_retries = concurrency, max_retries
        self.timeout, self.backoff, self.top_logprobs = timeout, backoff, top_logprobs
        key = os.environ.get(api_key_env) if api_key_env else None
        self._headers = {"Content-Type": "application/json"}
        self._secret = key or None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        elif api_key_env and "api.openai.com" in self.url:
            raise JudgeError(f"environment variable {api_key_env} is not set; export the API key")

    def __repr__(self) -> str:  # no headers: they hold the key
        return f"OpenAICompatibleJudge(model={self.model!r}, url={self.url!r})"

    @property
    def identity(self) -> str:
        """Model name and top-k, not the URL: a restarted local server (new port) keeps its
        cache. Two servers serving different weights under one name need different caches."""
        return f"openai-compatible:{self.model}:top{self.top_logprobs}"

    def _scrub(self, text: str) -> str:
        """Remove the key from text that came back from the server (some echo part of it)."""
        return text.replace(self._secret, "***") if self._secret else text

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

    def _attempt(self, body: bytes) -> dict[str, float]:
        req = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} {e.reason}"
            if e.code in RETRY_STATUS:
                after = e.headers.get("Retry-After") if e.headers else None
                raise _Retryable(reason, _seconds(after)) from None
            if e.code in (401, 403):  # the body may quote part of the key: never show it
                raise JudgeError(f"{self.url} answered {reason}: check the API key") from None
            detail = self._scrub(e.read()[:300].decode(errors="replace"))
            if e.code in REJECT_STATUS:
                raise _Rejected(f"{reason}: {detail}") from None
            raise JudgeError(f"{self.url} answered {reason}: {detail}") from None
        except TimeoutError:
            raise _Retryable(f"no reply within {self.timeout} s") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", None) or type(e).__name__
            raise _Retryable(f"cannot connect or bad reply ({reason})") from None
        return parse_top_logprobs(raw)

    def request(self, prompt: str) -> Judgement:
        """Judge one prompt, retrying transient failures; raises :class:`JudgeError` at the end.

        A request the server rejects (400/413/422, e.g. content policy or context length) gives
        a ``None`` score with ``error`` set; it is not cached, so a rerun asks again.
        """
        body = self._body(prompt)
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                probs = self._attempt(body)
                return Judgement(aggregate_0_100(probs, self.min_mass), probs)
            except _Rejected as e:
                log.warning("judge rejected one request (%s); its score is None", e)
                return Judgement(None, {}, str(e))
            except _Retryable as e:
                last = str(e)
                if attempt == self.max_retries:
                    break
                delay = min(60.0, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, 120.0))
                log.warning(
                    "judge request failed (%s); retry %d in %.1f s", last, attempt + 1, delay
                )
                time.sleep(delay)
        raise JudgeError(
            f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last}. "
            "Judgements made so far are cached; rerun to continue."
        )

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


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


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
        raise _Retryable(f"unparseable reply: {raw[:120]!r}") from None
    if not probs:
        raise JudgeError(
            "the judge server returned no top_logprobs; use a server and model that support "
            "logprobs (an argmax token is not a probability-weighted score)"
        )
    return probs
