"""The one place that talks to language models (for the LLM-guided schedule search).

Backends, chosen by a spec string (see make_client):
  openai[:BASE_URL]  any OpenAI-compatible endpoint: OPENAI_BASE_URL, OPENAI_API_KEY, --llm-model
  replay:PATH        answers from a recorded transcript (JSONL), matched by prompt hash; no endpoint
  files:DIR          offline nodes: requests go to DIR/<hash>.request.json, answers are read from
                     DIR/<hash>.response.json, written by a person or any program
Every client counts tokens, retries, failures, wall time and cost, and appends each request and
response (plus caller events, see log_event) to a transcript JSONL that replay can re-run.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from schedsearch.errors import UserError
from schedsearch.rundir import append_line, drop_cut_tail

NO_ENDPOINT = ("no LLM endpoint configured: set OPENAI_BASE_URL (and OPENAI_API_KEY) "
               "or use --llm replay:PATH / files:DIR")
RETRY_STATUSES = {408, 409, 425, 429} | set(range(500, 600))
FATAL_STATUSES = {401, 403, 404}  # wrong key / model / URL: every request would fail the same way
MAX_SLEEP_S = 60.0
# Per request. Reasoning models took 122-126 s for one program (CPU box, 2026-12-01): 120 s cut them off.
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_CONCURRENCY = 8  # requests in flight at once (--llm-concurrency)
PROBE_TIMEOUT_S = 10.0  # GET /models at start: an address that drops packets must not hang a run for minutes


class LLMError(UserError):
    """A problem with the LLM configuration or its answers that the user must fix."""


class TranscriptExhausted(LLMError):
    """A replayed transcript has no answer for a request: the model said nothing more that can be replayed."""


class PendingResponses(LLMError):
    """files backend: requests are written, some answers are not there yet; run again later."""

    def __init__(self, directory: Path, request_paths: list[Path]):
        self.directory = directory
        self.paths = request_paths
        super().__init__(f"waiting for {len(request_paths)} responses in {directory}: answer each listed "
                         '<hash>.request.json with <hash>.response.json ({"content": "..."}), then run again')

    @property
    def response_paths(self) -> list[Path]:
        return [p.with_name(p.name.replace(".request.json", ".response.json")) for p in self.paths]


@dataclass(frozen=True)
class Request:
    messages: list[dict]
    temperature: float = 0.8
    max_tokens: int | None = None
    seed: int | None = None
    tag: str = ""  # the caller's label (task, round...), copied to the transcript

    def params(self) -> dict:
        """The sampling parameters that change the answer (part of the prompt hash)."""
        return {"temperature": float(self.temperature), "max_tokens": self.max_tokens, "seed": self.seed}


@dataclass
class Response:
    text: str | None
    error: str | None
    usage: dict  # prompt_tokens, completion_tokens, estimated
    prompt_hash: str
    latency_s: float
    attempts: int


def prompt_hash(model: str | None, request: Request) -> str:
    canonical = json.dumps({"model": model, "messages": request.messages, **request.params()},
                           sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _token_usage(request: Request, text: str | None, usage: dict | None) -> dict:
    if usage and isinstance(usage.get("prompt_tokens"), int) and isinstance(usage.get("completion_tokens"), int):
        return {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"],
                "estimated": bool(usage.get("estimated", False))}
    if text is None:  # failed request: nothing was generated, and we cannot know what was billed
        return {"prompt_tokens": 0, "completion_tokens": 0, "estimated": True}
    prompt_chars = sum(len(str(m.get("content", ""))) for m in request.messages)
    return {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(text) // 4, "estimated": True}


class LLMClient:
    """Accounting, transcript and batching shared by the backends; subclasses answer one request."""

    backend = ""

    def __init__(self, model: str | None, transcript: Path | None, concurrency: int = DEFAULT_CONCURRENCY,
                 price_in: float = 0.0, price_out: float = 0.0):
        self.model = model
        self.transcript = Path(transcript) if transcript else None
        if self.transcript:
            self.transcript.parent.mkdir(parents=True, exist_ok=True)
            drop_cut_tail(self.transcript)
        self.concurrency = max(1, int(concurrency))
        self.price_in, self.price_out = price_in, price_out  # USD per 1M input / output tokens
        self._slots = threading.BoundedSemaphore(self.concurrency)  # cap across concurrent batches too
        self._lock = threading.Lock()
        self._totals = Counter()
        self._wall_s = 0.0

    def prompt_hash(self, request: Request) -> str:
        return prompt_hash(self.model, request)

    def complete(self, request: Request) -> Response:
        return self.complete_many([request])[0]

    def complete_many(self, requests: list[Request]) -> list[Response]:
        """Answers in request order; up to `concurrency` at once. Failed requests come back with
        .error set; only configuration problems (LLMError) raise."""
        start = time.monotonic()
        try:
            if self.concurrency == 1 or len(requests) <= 1:
                return [self._complete_slot(r) for r in requests]
            with ThreadPoolExecutor(min(self.concurrency, len(requests))) as pool:
                return list(pool.map(self._complete_slot, requests))
        finally:
            with self._lock:
                self._wall_s += time.monotonic() - start

    def _complete_slot(self, request: Request) -> Response:
        with self._slots:
            return self._complete_one(request)

    def _complete_one(self, request: Request) -> Response:
        raise NotImplementedError

    def _finish(self, request: Request, digest: str, text: str | None, error: str | None,
                usage: dict | None, latency_s: float, attempts: int) -> Response:
        """Builds the Response, counts it and appends it to the transcript."""
        response = Response(text, error, _token_usage(request, text, usage), digest, latency_s, attempts)
        with self._lock:
            t = self._totals
            t["requests"] += 1
            t["retries"] += max(0, attempts - 1)
            t["failures"] += error is not None
            t["prompt_tokens"] += response.usage["prompt_tokens"]
            t["completion_tokens"] += response.usage["completion_tokens"]
            t["estimated_requests"] += response.usage["estimated"] and text is not None
        self._append({"time": round(time.time(), 3), "backend": self.backend, "model": self.model,
                      "hash": digest, "tag": request.tag, "params": request.params(),
                      "messages": request.messages, "text": text, "error": error, "usage": response.usage,
                      "latency_s": round(latency_s, 4), "attempts": attempts})
        return response

    def log_event(self, kind: str, **fields) -> None:
        """Appends a caller record, e.g. log_event("program", prompt_hash=h, verdict="rejected", why=...)."""
        self._append({"event": kind, "time": round(time.time(), 3), **fields})

    def _append(self, record: dict) -> None:
        if not self.transcript:
            return
        line = json.dumps(record, ensure_ascii=False, default=str)
        with self._lock:
            append_line(self.transcript, line)  # whole, or not at all

    def usage(self) -> dict:
        with self._lock:
            t, wall_s = dict(self._totals), self._wall_s
        prompt, completion = t.get("prompt_tokens", 0), t.get("completion_tokens", 0)
        return {"backend": self.backend, "model": self.model,
                "requests": t.get("requests", 0), "retries": t.get("retries", 0),
                "failures": t.get("failures", 0), "prompt_tokens": prompt, "completion_tokens": completion,
                "estimated_requests": t.get("estimated_requests", 0),
                "tokens_estimated": t.get("estimated_requests", 0) > 0,
                "wall_s": round(wall_s, 3),
                "cost_usd": (prompt * self.price_in + completion * self.price_out) / 1e6}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _MalformedReply(Exception):
    pass


class OpenAIClient(LLMClient):
    backend = "openai"

    def __init__(self, model: str | None, transcript: Path | None, *, base_url: str | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_retries: int = 4, backoff_s: float = 0.5, **common):
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        api_key = os.environ.get("OPENAI_API_KEY") or None
        if not base_url and not api_key:
            raise LLMError(NO_ENDPOINT)
        try:
            import openai  # lazily: offline GPU nodes have no openai package and use files:/replay:
        except ImportError as e:
            raise LLMError("the openai backend needs the 'openai' package (pip install openai); "
                           "offline, use --llm files:DIR or replay:PATH") from e
        self._openai = openai
        # max_retries=0: our retry loop is the only one, so every retry is counted and logged
        self._api = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout_s, max_retries=0)
        self.base_url, self.timeout_s = base_url, timeout_s
        self.max_retries, self.backoff_s = max_retries, backoff_s
        model = model or os.environ.get("OPENAI_MODEL")
        if base_url:  # an unreachable endpoint fails here, in seconds, not after the workload's export and import
            served = self._served_models(needed=not model)
            model = model or (served[0] if served else None)
        if not model:
            raise LLMError("no LLM model: pass --llm-model (or set OPENAI_MODEL)")
        super().__init__(model, transcript, **common)

    def _served_models(self, needed: bool) -> list[str]:
        """The endpoint's models (a local server, vLLM, llama.cpp..., usually serves one: used when none is
        named), asked with retries on connection errors, which are fatal in the end. An HTTP error is fatal
        only when a model is `needed`: some OpenAI-compatible endpoints have no /models."""
        api = self._api.with_options(timeout=min(self.timeout_s, PROBE_TIMEOUT_S))
        attempt = 0
        while True:
            attempt += 1
            try:
                return [m.id for m in api.models.list().data]
            except self._openai.APIConnectionError as e:  # includes APITimeoutError
                if attempt > self.max_retries:
                    raise LLMError(f"cannot reach the LLM endpoint at {self.base_url}: {type(e).__name__}: {e} "
                                   f"({attempt} attempts)") from e
                time.sleep(min(MAX_SLEEP_S, self._backoff_s(attempt)))
            except self._openai.OpenAIError as e:
                if needed:
                    raise LLMError(f"could not list models at {self.base_url} ({e}); pass --llm-model") from e
                return []

    def _complete_one(self, request: Request) -> Response:
        digest, start = self.prompt_hash(request), time.monotonic()
        args = {"model": self.model, "messages": request.messages, "temperature": request.temperature}
        args.update({k: v for k, v in (("max_tokens", request.max_tokens), ("seed", request.seed)) if v is not None})
        error, attempt = None, 0
        while attempt <= self.max_retries:
            attempt += 1
            retry_after = 0.0
            try:
                text, usage = _parse_completion(self._api.chat.completions.create(**args))
                return self._finish(request, digest, text, None, usage, time.monotonic() - start, attempt)
            except self._openai.APIStatusError as e:
                if e.status_code in FATAL_STATUSES:
                    raise LLMError(f"LLM endpoint refused the request (HTTP {e.status_code}): {e.message}") from e
                error = f"HTTP {e.status_code}: {e.message}"
                if e.status_code not in RETRY_STATUSES:
                    break  # e.g. 400 prompt too long: the same request fails the same way
                retry_after = _retry_after_s(e.response.headers.get("retry-after"))
            except self._openai.APIConnectionError as e:  # includes APITimeoutError
                error = f"{type(e).__name__}: {e}"
            except (self._openai.APIResponseValidationError, ValueError, _MalformedReply) as e:
                error = f"malformed response: {e}"  # ValueError covers a truncated JSON body
            if attempt <= self.max_retries:
                time.sleep(min(MAX_SLEEP_S, max(retry_after, self._backoff_s(attempt))))
        return self._finish(request, digest, None, error, None, time.monotonic() - start, attempt)

    def _backoff_s(self, attempt: int) -> float:
        delay = self.backoff_s * 2 ** (attempt - 1)
        return delay / 2 + random.uniform(0, delay / 2)  # jitter spreads out a burst of 429s

    def close(self) -> None:
        self._api.close()


def _parse_completion(reply) -> tuple[str, dict | None]:
    choices = getattr(reply, "choices", None)
    if not choices:
        raise _MalformedReply("no choices")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str):
        raise _MalformedReply(f"no message content (finish_reason={getattr(choices[0], 'finish_reason', None)})")
    usage = getattr(reply, "usage", None)
    return content, usage and {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


def _retry_after_s(header: str | None) -> float:
    try:
        return max(0.0, float(header)) if header else 0.0
    except ValueError:
        return 0.0  # an HTTP date: fall back to our own backoff


class ReplayClient(LLMClient):
    """Answers from a transcript. The k-th request with a given prompt hash gets the k-th recorded
    response for it (errors included); it runs serially to keep that order. Prompts quote measured
    latencies, which move between machines and runs, and a search that measures other things in between
    (hybrid's evolution) numbers its rounds otherwise: a prompt whose hash is not in the transcript gets the
    first answer not used yet that was recorded for the same request of the same task (ideas, or idea i's
    variation k), from whatever round, in the transcript's order. A files backend's answer that resumed runs
    read more than once (it is in the transcript each time) counts once."""

    backend = "replay"

    def __init__(self, model: str | None, transcript: Path | None, *, source: Path, **common):
        self.source = Path(source)
        records = _read_response_records(self.source)
        if model is None:
            models = {r.get("model") for r in records}
            if len(models) > 1:
                raise LLMError(f"transcript {self.source} holds several models ({', '.join(map(str, models))}): "
                               "pass --llm-model")
            model = models.pop() if models else None
        self._answers: dict[str, list[int]] = defaultdict(list)  # prompt hash -> record indices
        self._by_request: dict[str, list[int]] = defaultdict(list)  # tag less its round -> record indices
        for i, r in enumerate(records):
            if r.get("backend") == "files" and r["hash"] in self._answers:
                continue  # one answer file, read again by a resumed run: one answer, not the next round's
            self._answers[r["hash"]].append(i)
            if r.get("tag"):
                self._by_request[_without_round(r["tag"])].append(i)
        self._records, self._unused = records, set(range(len(records)))
        self._used = Counter()
        if transcript and Path(transcript).resolve() == self.source.resolve():
            transcript = None  # never append to the transcript being replayed
        super().__init__(model, transcript, **{**common, "concurrency": 1})

    def _complete_one(self, request: Request) -> Response:
        digest, start = self.prompt_hash(request), time.monotonic()
        with self._lock:
            if digest in self._answers:
                answers, k = self._answers[digest], self._used[digest]
                self._used[digest] += 1
                found = answers[k] if k < len(answers) else None
            else:
                answers = [i for i in self._by_request.get(_without_round(request.tag or ""), []) if i in self._unused]
                found, k = (answers[0] if answers else None), 0
            if found is not None:
                self._unused.discard(found)
        if found is None:
            more = f" (it has {len(answers)}, this is request {k + 1} with that prompt)" if answers else ""
            raise TranscriptExhausted(f"replay: transcript {self.source} has no response for this prompt "
                           f"(hash {digest}, model {self.model}){more}")
        r = self._records[found]
        return self._finish(request, digest, r.get("text"), r.get("error"), r.get("usage"),
                            time.monotonic() - start, int(r.get("attempts", 1)))


def _without_round(tag: str) -> str:
    """`task|r3|i0|s1` -> `task|i0|s1`: the same request, whatever the round."""
    return re.sub(r"\|r\d+(?=\||$)", "", tag)


def _read_response_records(path: Path) -> list[dict]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LLMError(f"cannot read transcript {path}: {e.strerror or e}") from e
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                break  # a run killed mid-write leaves a partial last line
            raise LLMError(f"transcript {path}:{i} is not JSON: {e}") from e
        if isinstance(record, dict) and "event" not in record and "hash" in record:
            records.append(record)
    return records


class FilesClient(LLMClient):
    """Requests are files a person or program answers: DIR/<hash>.request.json -> DIR/<hash>.response.json.
    The response is {"content": "..."}, {"error": "..."} or a full OpenAI chat.completion JSON. In wait mode
    it waits for the answers as long as they take (`wait_timeout_s`, seconds, only where given)."""

    backend = "files"

    def __init__(self, model: str | None, transcript: Path | None, *, directory: Path, wait: bool = True,
                 wait_timeout_s: float | None = None, poll_s: float = 1.0, **common):
        super().__init__(model, transcript, **common)
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.wait, self.wait_timeout_s, self.poll_s = wait, wait_timeout_s, poll_s

    def complete_many(self, requests: list[Request]) -> list[Response]:
        start = time.monotonic()
        digests = [self.prompt_hash(r) for r in requests]
        for request, digest in zip(requests, digests):
            self._write_request(request, digest)
        answers: dict[str, tuple] = {}
        while True:
            for digest in set(digests) - answers.keys():
                answer = self._read_response(digest)
                if answer is not None:
                    answers[digest] = (*answer, time.monotonic() - start)
            missing = sorted(set(digests) - answers.keys())
            if not missing:
                break
            if not self.wait or (self.wait_timeout_s is not None and time.monotonic() - start >= self.wait_timeout_s):
                raise PendingResponses(self.directory, [self._path(d, "request") for d in missing])
            time.sleep(self.poll_s)
        with self._lock:
            self._wall_s += time.monotonic() - start
        return [self._finish(r, d, *answers[d], 1) for r, d in zip(requests, digests)]

    def _path(self, digest: str, kind: str) -> Path:
        return self.directory / f"{digest}.{kind}.json"

    def _write_request(self, request: Request, digest: str) -> None:
        path = self._path(digest, "request")
        if path.exists():
            return
        body = {"model": self.model, "messages": request.messages, **request.params()}
        doc = {"hash": digest, "tag": request.tag,
               "answer_in": self._path(digest, "response").name,
               "answer_format": '{"content": "..."} or an OpenAI chat.completion JSON',
               "request": {k: v for k, v in body.items() if v is not None}}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(path)  # atomic: a watching program never sees half a request

    def _read_response(self, digest: str) -> tuple[str | None, str | None, dict | None] | None:
        """(text, error, usage), or None while the response is absent (or still being written)."""
        path = self._path(digest, "response")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as e:
            if self.wait:
                return None
            raise LLMError(f"{path} is not valid JSON: {e}") from e
        usage = data.get("usage") if isinstance(data, dict) else None
        if isinstance(data, dict) and isinstance(data.get("content"), str):
            return data["content"], None, usage
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return None, data["error"], None
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise LLMError(f'{path}: expected {{"content": "..."}}, {{"error": "..."}} or a chat.completion JSON')
        return content, None, usage


def make_client(spec: str = "openai", model: str | None = None, transcript: Path | None = None,
                concurrency: int = DEFAULT_CONCURRENCY, timeout_s: float = DEFAULT_TIMEOUT_S, max_retries: int = 4,
                price_in: float = 0, price_out: float = 0, wait: bool = True, *,
                base_url: str | None = None, backoff_s: float = 0.5, wait_timeout_s: float | None = None,
                poll_s: float = 1.0) -> LLMClient:
    """spec: "openai", "openai:BASE_URL", "replay:PATH" or "files:DIR"."""
    kind, _, arg = spec.partition(":")
    common = {"concurrency": concurrency, "price_in": price_in, "price_out": price_out}
    if kind == "openai":
        return OpenAIClient(model, transcript, base_url=arg or base_url, timeout_s=timeout_s,
                            max_retries=max_retries, backoff_s=backoff_s, **common)
    if kind == "replay" and arg:
        return ReplayClient(model, transcript, source=Path(arg), **common)
    if kind == "files" and arg:
        return FilesClient(model, transcript, directory=Path(arg), wait=wait,
                           wait_timeout_s=wait_timeout_s, poll_s=poll_s, **common)
    raise LLMError(f"unknown --llm {spec!r}: use openai, openai:BASE_URL, replay:PATH or files:DIR")
