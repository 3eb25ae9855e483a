"""llm_client against the loopback fake server, through the real openai package."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from fake_openai import FakeOpenAI, completion_body
from schedsearch.llm_client import (NO_ENDPOINT, LLMError, PendingResponses, Request, make_client,
                                    prompt_hash)


@pytest.fixture
def env(monkeypatch):
    """A key but no endpoint from the environment: each test names the fake server's URL."""
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_MODEL", raising=False)


def client_for(srv, **kw):
    args = dict(model="m1", timeout_s=2.0, max_retries=2, backoff_s=0.01, concurrency=4)
    return make_client(f"openai:{srv.base_url}", **{**args, **kw})


def ask(text, **kw):
    return Request(messages=[{"role": "system", "content": "you write schedules"},
                             {"role": "user", "content": text}], **kw)


def echo(request):
    return "answer to " + request["messages"][-1]["content"]


def test_success_counts_tokens_and_cost(env):
    with FakeOpenAI(echo) as srv, client_for(srv, price_in=2.0, price_out=10.0) as client:
        responses = client.complete_many([ask("one two", seed=7, max_tokens=50), ask("three")])
        sent = sorted(srv.requests, key=lambda r: r["messages"][-1]["content"])
    assert [r.text for r in responses] == ["answer to one two", "answer to three"]
    assert [r.error for r in responses] == [None, None]
    assert [r.attempts for r in responses] == [1, 1]
    # the fake counts words: 3 system words + the user's words; completions "answer to ..."
    assert [r.usage for r in responses] == [
        {"prompt_tokens": 5, "completion_tokens": 4, "estimated": False},
        {"prompt_tokens": 4, "completion_tokens": 3, "estimated": False}]
    assert sent[0]["model"] == "m1" and sent[0]["seed"] == 7 and sent[0]["max_tokens"] == 50
    assert sent[0]["temperature"] == 0.8 and "seed" not in sent[1] and "max_tokens" not in sent[1]
    usage = client.usage()
    assert (usage["requests"], usage["retries"], usage["failures"]) == (2, 0, 0)
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["tokens_estimated"]) == (9, 7, False)
    assert usage["cost_usd"] == pytest.approx((9 * 2.0 + 7 * 10.0) / 1e6)
    assert usage["wall_s"] > 0


def test_429_is_retried_after_retry_after(env):
    with FakeOpenAI([("status", 429, 0.3), "finally"]) as srv, client_for(srv) as client:
        response = client.complete(ask("x"))
    assert (response.text, response.error, response.attempts) == ("finally", None, 2)
    assert response.latency_s >= 0.3  # waited for Retry-After, not just the 0.01 s backoff
    assert len(srv.requests) == 2
    assert client.usage()["retries"] == 1


def test_500s_exhaust_retries_without_killing_the_batch(env):
    script = lambda req: ("status", 500) if "bad" in req["messages"][-1]["content"] else "fine"
    with FakeOpenAI(script) as srv, client_for(srv) as client:
        responses = client.complete_many([ask("good 1"), ask("bad"), ask("good 2")])
        bad_requests = [r for r in srv.requests if r["messages"][-1]["content"] == "bad"]
    assert [r.text for r in responses] == ["fine", None, "fine"]
    assert "HTTP 500" in responses[1].error and responses[1].attempts == 3
    assert len(bad_requests) == 3
    usage = client.usage()
    assert (usage["requests"], usage["retries"], usage["failures"]) == (3, 2, 1)


def test_400_is_not_retried_and_401_raises(env):
    with FakeOpenAI([("status", 400), ("status", 401)]) as srv, client_for(srv) as client:
        response = client.complete(ask("too long"))
        assert "HTTP 400" in response.error and response.attempts == 1
        with pytest.raises(LLMError, match="HTTP 401"):
            client.complete(ask("x"))
        assert len(srv.requests) == 2


def test_slow_answer_times_out_and_is_retried(env):
    with FakeOpenAI([("slow", 1.5, "late"), "on time"]) as srv, client_for(srv, timeout_s=0.3) as client:
        start = time.monotonic()
        response = client.complete(ask("x"))
        assert time.monotonic() - start < 1.2  # did not wait for the slow answer
    assert (response.text, response.attempts) == ("on time", 2)


def test_always_slow_fails_with_timeout_error(env):
    with FakeOpenAI(lambda req: ("slow", 1.0, "late")) as srv, \
            client_for(srv, timeout_s=0.2, max_retries=1) as client:
        response = client.complete(ask("x"))
    assert response.text is None and "Timeout" in response.error and response.attempts == 2
    assert client.usage()["failures"] == 1


@pytest.mark.parametrize("bad", [("truncated",), ("drop",), {"id": "x", "object": "chat.completion"}],
                         ids=["truncated-json", "dropped-connection", "no-choices"])
def test_broken_replies_are_retried(env, bad):
    with FakeOpenAI([bad, "whole"]) as srv, client_for(srv) as client:
        response = client.complete(ask("x"))
    assert (response.text, response.error, response.attempts) == ("whole", None, 2)
    assert len(srv.requests) == 2


def test_concurrency_cap_and_order(env):
    # later requests answer sooner, so completion order differs from request order
    script = lambda req: ("slow", 0.3 - 0.03 * int(req["messages"][-1]["content"]), echo(req))
    with FakeOpenAI(script) as srv, client_for(srv, concurrency=3) as client:
        responses = client.complete_many([ask(str(i)) for i in range(9)])
    assert srv.max_in_flight == 3
    assert [r.text for r in responses] == [f"answer to {i}" for i in range(9)]


def test_transcript_then_replay_without_server(env, tmp_path):
    transcript = tmp_path / "llm.jsonl"
    requests = [ask("a"), ask("b"), ask("a")]  # the same prompt twice gets two different answers
    with FakeOpenAI(["first a", "b!", "second a"]) as srv, \
            client_for(srv, transcript=transcript, concurrency=1) as client:
        recorded = client.complete_many(requests)
        client.log_event("program", hash=recorded[0].prompt_hash, verdict="rejected", why="bad split")
    lines = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert len(lines) == 4 and lines[3]["event"] == "program" and lines[3]["why"] == "bad split"
    first = lines[0]
    assert first["hash"] == prompt_hash("m1", requests[0]) == recorded[0].prompt_hash
    assert (first["backend"], first["model"], first["text"], first["attempts"]) == ("openai", "m1", "first a", 1)
    assert first["messages"] == requests[0].messages and first["usage"]["prompt_tokens"] == 4

    # the server is gone; the model comes from the transcript
    with make_client(f"replay:{transcript}", model=None, transcript=tmp_path / "replayed.jsonl") as replay:
        assert [r.text for r in replay.complete_many(requests)] == ["first a", "b!", "second a"]
        assert replay.usage()["prompt_tokens"] == client.usage()["prompt_tokens"]
        with pytest.raises(LLMError, match="no response for this prompt") as miss:
            replay.complete(ask("never asked"))
        assert prompt_hash("m1", ask("never asked")) in str(miss.value)
    assert len((tmp_path / "replayed.jsonl").read_text().splitlines()) == 3


def test_sampling_params_change_the_hash():
    base = prompt_hash("m", ask("x"))
    assert base == prompt_hash("m", ask("x", tag="other tag"))
    assert len({base, prompt_hash("m", ask("x", seed=1)), prompt_hash("m", ask("x", temperature=0.2)),
                prompt_hash("m2", ask("x")), prompt_hash("m", ask("y"))}) == 5


def test_files_backend_pending_then_answered(tmp_path):
    answers = tmp_path / "answers"
    requests = [ask("p1"), ask("p2", seed=3)]
    client = make_client(f"files:{answers}", model="offline", transcript=tmp_path / "t.jsonl", wait=False)
    with pytest.raises(PendingResponses, match=f"waiting for 2 responses in {answers}") as pending:
        client.complete_many(requests)
    paths = pending.value.paths
    assert sorted(p.name for p in paths) == sorted(f"{prompt_hash('offline', r)}.request.json" for r in requests)
    written = json.loads(paths[0].read_text())
    assert written["request"]["model"] == "offline" and written["request"]["messages"] in [r.messages for r in requests]
    assert not list(answers.glob("*.response.json"))

    h1, h2 = (prompt_hash("offline", r) for r in requests)
    (answers / f"{h1}.response.json").write_text(json.dumps({"content": "plain answer!"}))
    with pytest.raises(PendingResponses, match="waiting for 1 responses") as pending:
        client.complete_many(requests)
    assert [p.name for p in pending.value.paths] == [f"{h2}.request.json"]

    full = completion_body({"messages": requests[1].messages}, "full completion")
    (answers / f"{h2}.response.json").write_text(json.dumps(full))
    responses = client.complete_many(requests)
    assert [r.text for r in responses] == ["plain answer!", "full completion"]
    assert responses[0].usage == {"prompt_tokens": (len("you write schedules") + 2) // 4,
                                  "completion_tokens": len("plain answer!") // 4, "estimated": True}
    assert responses[1].usage == {"prompt_tokens": 4, "completion_tokens": 2, "estimated": False}


def test_files_backend_waits_for_a_writer(tmp_path):
    request = ask("later")
    path = tmp_path / f"{prompt_hash(None, request)}.response.json"
    writer = threading.Timer(0.3, lambda: path.write_text('{"content": "arrived"}'))
    writer.start()
    client = make_client(f"files:{tmp_path}", wait=True, poll_s=0.05, wait_timeout_s=5)
    assert client.complete(request).text == "arrived"
    with pytest.raises(PendingResponses, match="waiting for 1 responses"):
        make_client(f"files:{tmp_path}", wait=True, poll_s=0.05, wait_timeout_s=0.2).complete(ask("never"))


def test_no_endpoint_configured(monkeypatch):
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LLMError) as error:
        make_client("openai", model="some-model")
    assert str(error.value) == NO_ENDPOINT
    with pytest.raises(LLMError, match="unknown --llm"):
        make_client("replay")


def test_model_is_taken_from_a_local_server(env):
    with FakeOpenAI("ok", model="served-model") as srv, client_for(srv, model=None) as client:
        assert client.model == "served-model"
        assert client.complete(ask("x")).text == "ok"
        assert srv.requests[0]["model"] == "served-model"


def test_works_without_the_openai_package(tmp_path, monkeypatch):
    code = "import sys, schedsearch.llm_client; assert 'openai' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "openai", None)  # makes `import openai` fail
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    with pytest.raises(LLMError, match="needs the 'openai' package"):
        make_client("openai", model="m")
    with pytest.raises(PendingResponses):
        make_client(f"files:{tmp_path}", wait=False).complete(ask("x"))


@pytest.mark.skipif(not (os.environ.get("OPENAI_API_KEY")
                         and (os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_MODEL"))),
                    reason="needs OPENAI_API_KEY and OPENAI_BASE_URL or OPENAI_MODEL")
def test_real_endpoint(tmp_path):
    with make_client("openai", model=os.environ.get("OPENAI_MODEL"), transcript=tmp_path / "t.jsonl",
                     timeout_s=60, max_retries=2) as client:
        response = client.complete(Request([{"role": "user", "content": "Reply with the single word: pong"}],
                                           temperature=0.0, max_tokens=20))
    assert response.error is None and "pong" in response.text.lower()
    assert client.usage()["requests"] == 1 and client.usage()["prompt_tokens"] > 0
