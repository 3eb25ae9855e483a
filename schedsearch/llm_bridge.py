"""`schedsearch llm-bridge DIR`: answer the `files:` backend's requests through an OpenAI-compatible endpoint.

A compute node without network tunes with `--llm files:DIR` (waiting for answers); a login node that shares
DIR and reaches the endpoint runs the bridge, which answers each `<hash>.request.json` with
`<hash>.response.json` as soon as it appears. The answers go through llm_client.OpenAIClient: the same
model option, timeouts, retries, concurrency, token accounting and transcript as `--llm openai`. The
response carries the endpoint's token counts, so the compute node's results count real tokens and cost.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path

from .llm_client import LLMClient, LLMError, Request, make_client
from .options import add_llm_endpoint_options

POLL_S = 1.0  # seconds between looks at the requests' directory

REQUEST_SUFFIX, RESPONSE_SUFFIX = ".request.json", ".response.json"


def add_commands(sub) -> dict:
    b = sub.add_parser("llm-bridge", help="answer the request files of `--llm files:DIR` through an "
                                          "OpenAI-compatible endpoint (OPENAI_BASE_URL, OPENAI_API_KEY)")
    b.add_argument("directory", type=Path, help="the DIR of the tune's --llm files:DIR (a shared filesystem)")
    add_llm_endpoint_options(b)
    b.add_argument("--transcript", type=Path,
                   help="JSONL of every request and response (default DIR/bridge.transcript.jsonl)")
    b.add_argument("--poll", type=float, default=POLL_S, help=f"seconds between looks at DIR (default {POLL_S:g})")
    b.add_argument("--once", action="store_true", help="answer the requests there now, then exit")
    return {"llm-bridge": cmd_bridge}


def cmd_bridge(args) -> int:
    if not args.directory.is_dir():
        raise LLMError(f"{args.directory} is not a directory: give the DIR of the tune's --llm files:DIR")
    if args.poll <= 0:
        raise LLMError("--poll must be above 0")
    client = make_client("openai", model=args.llm_model,
                         transcript=args.transcript or args.directory / "bridge.transcript.jsonl",
                         concurrency=args.llm_concurrency, timeout_s=args.llm_timeout,
                         price_in=args.llm_price_in, price_out=args.llm_price_out)
    print(f"llm-bridge: answering {args.directory}/*{REQUEST_SUFFIX} with {client.model} at {client.base_url or 'the OpenAI API'}"
          + ("" if args.once else f", every {args.poll:g} s (Ctrl-C stops)"), file=sys.stderr, flush=True)
    bridge = Bridge(client, args.directory)
    try:
        bridge.serve(once=args.once, poll_s=args.poll)
    except KeyboardInterrupt:
        left = bridge.in_flight()
        print("\nllm-bridge: stopped" + (f"; {left} request(s) in flight were dropped: the next start answers them"
                                          if left else ""), file=sys.stderr)
    finally:
        client.close()
    u = client.usage()
    print(f"llm-bridge: {u['requests']} request(s) answered, {u['failures']} failed, {u['retries']} retries; "
          f"{u['prompt_tokens']} prompt + {u['completion_tokens']} completion tokens"
          f"{' (some estimated)' if u['tokens_estimated'] else ''}, ${u['cost_usd']:.4f}", file=sys.stderr)
    return 0


class Bridge:
    """Finds unanswered request files in `directory` and answers them on `client.concurrency` threads.
    The threads are daemons: Ctrl-C ends the bridge at once, and a request it dropped has no response
    file, so it is answered on the next start. Every file is written whole (a temporary file renamed)."""

    def __init__(self, client: LLMClient, directory: Path):
        self.client, self.directory = client, Path(directory)
        self._todo: queue.Queue = queue.Queue()
        self._taken: set[str] = set()  # request hashes queued or answered by this bridge
        self._busy = 0
        self._lock = threading.Lock()
        self.fatal: LLMError | None = None  # wrong key, model or URL: every request would fail the same way
        for _ in range(client.concurrency):
            threading.Thread(target=self._work, daemon=True, name="llm-bridge").start()

    def serve(self, once: bool = False, poll_s: float = POLL_S) -> None:
        while True:
            self._queue_new()
            if once:
                self._todo.join()
            if self.fatal is not None:
                raise self.fatal
            if once:
                return
            time.sleep(poll_s)

    def in_flight(self) -> int:
        with self._lock:
            return self._busy + self._todo.qsize()

    def _queue_new(self) -> None:
        for path in sorted(self.directory.glob("*" + REQUEST_SUFFIX)):
            digest = path.name[:-len(REQUEST_SUFFIX)]
            if digest not in self._taken and not self._response_path(digest).exists():
                self._taken.add(digest)
                self._todo.put((digest, path))

    def _response_path(self, digest: str) -> Path:
        return self.directory / (digest + RESPONSE_SUFFIX)

    def _work(self) -> None:
        while True:
            digest, path = self._todo.get()
            with self._lock:
                self._busy += 1
            try:
                if self.fatal is None:
                    self._answer(digest, path)
            except LLMError as e:
                self.fatal = e
            finally:
                with self._lock:
                    self._busy -= 1
                self._todo.task_done()

    def _answer(self, digest: str, path: Path) -> None:
        try:
            request = request_from_file(path)
        except ValueError as e:  # answered, so the tune says what was wrong instead of waiting for ever
            self._write(digest, {"error": f"llm-bridge: {e}"})
            print(f"llm-bridge: {path.name}: {e}", file=sys.stderr, flush=True)
            return
        response = self.client.complete(request)
        self.client.log_event("bridge", request_file=path.name, request_hash=digest, prompt_hash=response.prompt_hash)
        if response.error is not None:
            self._write(digest, {"error": response.error})
        else:
            self._write(digest, {"content": response.text, "usage": response.usage, "model": self.client.model,
                                 "latency_s": round(response.latency_s, 3), "attempts": response.attempts})
        u = response.usage
        print(f"llm-bridge: {digest[:12]} {request.tag or ''} "
              + (f"failed: {response.error}" if response.error else
                 f"answered in {response.latency_s:.1f} s, {u['prompt_tokens']}+{u['completion_tokens']} tokens"),
              file=sys.stderr, flush=True)

    def _write(self, digest: str, doc: dict) -> None:
        path = self._response_path(digest)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)  # the waiting tune never reads half an answer


def request_from_file(path: Path) -> Request:
    """The Request a files: client wrote (FilesClient._write_request); ValueError says what is wrong."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the request: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"the request is not JSON: {e}") from None
    body = doc.get("request") if isinstance(doc, dict) else None
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                 and isinstance(m.get("content"), str) for m in messages):
        raise ValueError('expected {"request": {"messages": [{"role": ..., "content": ...}, ...], ...}}')
    temperature, max_tokens, seed = body.get("temperature", 0.8), body.get("max_tokens"), body.get("seed")
    if not isinstance(temperature, (int, float)) or not all(v is None or isinstance(v, int) for v in (max_tokens, seed)):
        raise ValueError("temperature must be a number, max_tokens and seed integers")
    return Request(messages=messages, temperature=temperature, max_tokens=max_tokens, seed=seed,
                   tag=str(doc.get("tag", "")))
