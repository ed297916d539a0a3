"""A local chat-completions server for judge tests: real HTTP on 127.0.0.1, scripted faults.

``FakeJudgeServer(script=[...])`` answers each POST to ``/v1/chat/completions`` by popping the next
action from ``script`` (then ``"ok"`` forever): ``"ok"``, ``"429"``, ``"500"``, ``"sleep"``
(reply after ``sleep_s``, longer than the client's timeout), ``"garbage"`` (200 with a body that is
not chat-completions JSON), ``"badstatus"`` (bytes that are not HTTP), ``"400"`` (request
rejected), ``"401"`` (echoes the key's tail, as OpenAI does), ``"nologprobs"`` (empty
top_logprobs) or ``"down"`` (503 for every request from then on). ``delay_s`` slows every reply.

An ``ok`` reply's top logprobs depend on the judged text: a prompt containing ``EVIL`` puts 0.9 on
``"0"`` (unless it is a coherence prompt, which mentions "coherent"); ``CODEBLOCK`` puts 0.95 on ``"CODE"``; anything else puts 0.8 on ``"100"``.

``responder(body) -> dict`` replaces that rule for ``ok`` replies (other clients' tests, e.g.
auto-interpretation, answer with text through :func:`text_completion`); ``"badreply"`` sends a
well-formed chat-completions reply whose text is nonsense.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REPLIES = {
    "evil": {"0": 0.9, "5": 0.06, "REFUSAL": 0.04},
    "code": {"CODE": 0.95, "50": 0.03, "0": 0.02},
    "fine": {"100": 0.8, "90": 0.15, "Sure": 0.05},
}


def expected_probs(prompt: str) -> dict[str, float]:
    if "EVIL" in prompt and "coherent" not in prompt.lower():  # evil but coherent
        return REPLIES["evil"]
    if "CODEBLOCK" in prompt:
        return REPLIES["code"]
    return REPLIES["fine"]


def completion(probs: dict[str, float]) -> dict:
    top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in probs.items()]
    first = top[0]
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "judge-test",
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": first["token"]},
                "logprobs": {"content": [{**first, "top_logprobs": top}]},
            }
        ],
    }


def text_completion(text: str, logprobs: list[dict] | None = None) -> dict:
    """A chat-completions reply whose message is ``text`` (with per-token ``logprobs``)."""
    choice = {
        "index": 0,
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": text},
    }
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": "test",
        "choices": [choice],
    }


class FakeJudgeServer:
    def __init__(
        self,
        script: list[str] | None = None,
        sleep_s: float = 1.0,
        delay_s: float = 0.02,
        responder: Callable[[dict], dict] | None = None,
    ):
        self.script = list(script or [])
        self.responder = responder
        self.sleep_s, self.delay_s = sleep_s, delay_s
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = self.max_in_flight = 0
        self.down = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    action = server.script.pop(0) if server.script else "ok"
                    if action == "down":
                        server.down = True
                    action = "503" if server.down else action
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    time.sleep(server.delay_s)  # let concurrent requests overlap
                finally:
                    # counted out before the reply is written: a client that has read the
                    # reply may send its next request before this thread would get here
                    with server.lock:
                        server.in_flight -= 1
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._answer(action, body)

            def _send(self, code: int, payload: bytes, extra: dict[str, str] | None = None):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)

            def _answer(self, action: str, body: dict):
                if action == "429":
                    self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0"})
                elif action in ("500", "503"):
                    self._send(int(action), b'{"error": "server error"}')
                elif action == "400":
                    self._send(400, b'{"error": "content policy violation"}')
                elif action == "401":
                    key = self.headers.get("Authorization", "")[-8:]
                    self._send(401, f'{{"error": "Incorrect API key ...{key}"}}'.encode())
                elif action == "badstatus":  # not HTTP at all
                    self.wfile.write(b"GARBAGE\r\n\r\n")
                    self.close_connection = True
                elif action == "nologprobs":
                    reply = completion(REPLIES["fine"])
                    reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = []
                    self._send(200, json.dumps(reply).encode())
                elif action == "sleep":
                    time.sleep(server.sleep_s)
                    self._send(200, json.dumps(completion(REPLIES["fine"])).encode())
                elif action == "garbage":
                    self._send(200, b"<html>not json at all</html>")
                elif action == "badreply":
                    self._send(200, json.dumps(text_completion("I cannot tell.")).encode())
                elif server.responder is not None:
                    self._send(200, json.dumps(server.responder(body)).encode())
                else:
                    prompt = body["messages"][-1]["content"]
                    self._send(200, json.dumps(completion(expected_probs(prompt))).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeJudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
