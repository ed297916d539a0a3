"""POST to any OpenAI-compatible chat-completions endpoint, retrying what is worth retrying.

The transport shared by :class:`~emdiff.eval.http_judge.OpenAICompatibleJudge` and
:mod:`emdiff.autointerp`. 429, 5xx, timeouts, dropped connections and replies the caller's parser
calls unparseable (it raises :class:`Retryable`) are retried with exponential backoff and jitter,
honouring ``Retry-After``. A request the server refuses (400/413/422: content policy, context
length) raises :class:`Rejected`, for the caller to record and go on. The API key is read from an
environment variable at construction, sent only in the ``Authorization`` header, and kept out of
``repr``, errors and logs.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
REJECT_STATUS = frozenset({400, 413, 422})
"""The server refused this one request (content policy, too long): the caller goes on."""
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ChatError(RuntimeError):
    """The server gave no usable answer after every retry, or refused the key."""


class Rejected(Exception):
    """The server refused this one request (400/413/422); the message says why."""


class Retryable(Exception):
    """A failure worth another attempt; ``retry_after`` is the server's wish in seconds."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


class ChatClient:
    """Chat-completions requests over stdlib HTTP with retries.

    Args:
        model: model name sent to the server.
        base_url: server root including ``/v1`` (``http://localhost:8000/v1`` for vLLM).
        api_key_env: NAME of the environment variable holding the key; unset sends no
            ``Authorization`` header (fine for local servers), except that api.openai.com needs one.
        max_retries: retries per request after the first attempt.
        timeout: seconds per HTTP attempt.
        backoff: first retry delay in seconds; doubles each retry (with jitter), capped at 60 s.
        error: exception type raised for fatal failures (callers pass their own).
        who: name used in log lines (``judge``, ``autointerp``).
        resume_hint: sentence appended when giving up (what is kept, how to continue).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str | None = "OPENAI_API_KEY",
        max_retries: int = 6,
        timeout: float = 60.0,
        backoff: float = 1.0,
        error: type[Exception] = ChatError,
        who: str = "chat",
        resume_hint: str = "",
    ):
        if max_retries < 0 or timeout <= 0:
            raise ValueError("need max_retries >= 0 and timeout > 0")
        self.error, self.who, self.resume_hint = error, who, resume_hint
        if not base_url.startswith(("http://", "https://")):
            raise error(f"{who} base_url must start with http:// or https://, got {base_url!r}")
        if api_key_env and not ENV_NAME.fullmatch(api_key_env):
            raise error(
                "api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), "
                "not the key itself"
            )
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.max_retries, self.timeout, self.backoff = max_retries, timeout, backoff
        key = os.environ.get(api_key_env) if api_key_env else None
        self._headers = {"Content-Type": "application/json"}
        self._secret = key or None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        elif api_key_env and "api.openai.com" in self.url:
            raise error(f"environment variable {api_key_env} is not set; export the API key")

    def __repr__(self) -> str:  # no headers: they hold the key
        return f"ChatClient(model={self.model!r}, url={self.url!r})"

    def scrub(self, text: str) -> str:
        """Remove the key from text that came back from the server (some echo part of it)."""
        return text.replace(self._secret, "***") if self._secret else text

    def attempt(self, body: bytes, parse: Callable[[bytes], T]) -> T:
        """One POST; ``parse`` turns the reply body into the result (or raises
        :class:`Retryable`). Raises :class:`Retryable`, :class:`Rejected` or ``self.error``."""
        req = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} {e.reason}"
            if e.code in RETRY_STATUS:
                after = e.headers.get("Retry-After") if e.headers else None
                raise Retryable(reason, _seconds(after)) from None
            if e.code in (401, 403):  # the body may quote part of the key: never show it
                raise self.error(f"{self.url} answered {reason}: check the API key") from None
            detail = self.scrub(e.read()[:300].decode(errors="replace"))
            if e.code in REJECT_STATUS:
                raise Rejected(f"{reason}: {detail}") from None
            raise self.error(f"{self.url} answered {reason}: {detail}") from None
        except TimeoutError:
            raise Retryable(f"no reply within {self.timeout} s") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", None) or type(e).__name__
            raise Retryable(f"cannot connect or bad reply ({reason})") from None
        return parse(raw)

    def post(self, payload: dict[str, Any] | bytes, parse: Callable[[bytes], T]) -> T:
        """POST ``payload`` (``model`` is filled in when absent), retrying transient failures.

        Raises :class:`Rejected` when the server refuses this request, and ``self.error`` when the
        retries run out or the failure is not transient.
        """
        if isinstance(payload, dict):
            payload = json.dumps({"model": self.model, **payload}).encode()
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                return self.attempt(payload, parse)
            except Retryable as e:
                last = self.scrub(str(e))
                if attempt == self.max_retries:
                    break
                delay = min(60.0, self.backoff * 2**attempt) * (0.5 + random.random() / 2)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, 120.0))
                log.warning(
                    "%s request failed (%s); retry %d in %.1f s", self.who, last, attempt + 1, delay
                )
                time.sleep(delay)
        hint = f" {self.resume_hint}" if self.resume_hint else ""
        raise self.error(
            f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last}.{hint}"
        )


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
