"""A scripted OpenAI-compatible chat server on 127.0.0.1, standard library only.

    with FakeOpenAI(["first answer", ("status", 429, 0), "second answer"]) as srv:
        client = OpenAI(base_url=srv.base_url, api_key="test")
        ...
        srv.requests      # every request body received, in arrival order
        srv.max_in_flight # the most requests it was answering at once

The script is a list of actions consumed in arrival order, or a callable
(request_json -> action). An action is:
    "text"                               a normal chat.completion answer
    ("status", code[, retry_after])      an OpenAI-style error body with that HTTP status
    ("slow", seconds, "text")            the answer, after a delay
    ("truncated",)                       HTTP 200 with a cut-off (invalid) JSON body
    ("drop",)                            close the connection without answering
    {...}                                this JSON object as the HTTP 200 body, verbatim
When a list runs out the server answers 500 "fake script exhausted".
Usage counts whitespace-separated words, so tests can predict it.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

Action = Any
Script = Callable[[dict], Action] | list | str


def completion_body(request: dict, text: str) -> dict:
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
    n = int(request.get("n") or 1)
    completion_words = len(text.split()) * n
    return {
        "id": f"chatcmpl-fake-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "fake-model"),
        "choices": [{"index": i, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": text}} for i in range(n)],
        "usage": {"prompt_tokens": prompt_words, "completion_tokens": completion_words,
                  "total_tokens": prompt_words + completion_words},
    }


class FakeOpenAI:
    def __init__(self, script: Script = "ok", model: str = "fake-model"):
        self.script = script
        self.model = model
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._remaining = list(script) if isinstance(script, list) else None
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True  # slow handlers must not block shutdown
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _next_action(self, request: dict) -> Action:
        if callable(self.script):
            return self.script(request)
        if isinstance(self.script, str):
            return self.script
        with self._lock:
            return self._remaining.pop(0) if self._remaining else ("status", 500, None, "fake script exhausted")


def _make_handler(fake: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def _send_json(self, status: int, body: dict | bytes, headers: dict | None = None) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._send_json(200, {"object": "list", "data": [
                    {"id": fake.model, "object": "model", "created": 0, "owned_by": "fake"}]})
            else:
                self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send_json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with fake._lock:
                fake.requests.append(request)
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
            try:
                self._act(request, fake._next_action(request))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout); nothing to answer
            finally:
                with fake._lock:
                    fake.in_flight -= 1

        def _act(self, request: dict, action: Action) -> None:
            if isinstance(action, str):
                self._send_json(200, completion_body(request, action))
            elif isinstance(action, dict):
                self._send_json(200, action)
            elif action[0] == "slow":
                time.sleep(action[1])
                self._send_json(200, completion_body(request, action[2]))
            elif action[0] == "status":
                code, retry_after = action[1], (action[2] if len(action) > 2 else None)
                message = action[3] if len(action) > 3 else f"fake error {code}"
                headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
                self._send_json(code, {"error": {"message": message, "type": "fake_error", "code": code}}, headers)
            elif action[0] == "truncated":
                whole = json.dumps(completion_body(request, "truncated answer")).encode()
                self._send_json(200, whole[: len(whole) // 2])
            elif action[0] == "drop":
                self.close_connection = True  # return without a status line: the client sees a disconnect
            else:
                raise ValueError(f"unknown fake action {action!r}")

    return Handler
