"""`schedsearch llm-bridge`: a files: tune waiting for answers, answered by the bridge in another process from
a scripted OpenAI-compatible server on 127.0.0.1 (tests/fake_openai.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from fake_openai import FakeOpenAI
from schedsearch.cli import main
from schedsearch.llm_client import PendingResponses, Request, make_client
from test_llm_search import MATMUL, answer, programs  # noqa: F401  (programs: the fixture)


def _env(base_url: str) -> dict:
    return {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "test",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def _lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_once_answers_each_request_file_with_the_endpoints_tokens(tmp_path, monkeypatch, capsys):
    box = tmp_path / "box"
    writer = make_client(f"files:{box}", model="m", wait=False)
    request = Request([{"role": "user", "content": "two words"}], temperature=0.3, seed=7, tag="t|r1|ideas")
    digest = writer.prompt_hash(request)
    with pytest.raises(PendingResponses):  # the request file is written
        writer.complete(request)
    (box / "broken.request.json").write_text('{"request": {"messages": "not a list"}}')

    with FakeOpenAI("the answer is here") as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test")
        assert main(["llm-bridge", str(box), "--llm-model", "fake-model", "--once", "--llm-price-in", "1e6"]) == 0
        [sent] = srv.requests
    assert sent["model"] == "fake-model" and sent["temperature"] == 0.3 and sent["seed"] == 7
    assert sent["messages"] == request.messages
    answer_doc = json.loads((box / f"{digest}.response.json").read_text())
    assert answer_doc["content"] == "the answer is here"
    assert answer_doc["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "estimated": False}
    assert json.loads((box / "broken.response.json").read_text())["error"].startswith(
        'llm-bridge: expected {"request": {"messages": [')
    err = capsys.readouterr().err
    assert "llm-bridge: 1 request(s) answered, 0 failed, 0 retries; 2 prompt + 4 completion tokens, $2.0000" in err

    # The files client reads the bridge's answer with the endpoint's token counts, not estimates.
    reader = make_client(f"files:{box}", model="m", wait=False)
    got = reader.complete(request)
    assert got.text == "the answer is here" and got.usage["estimated"] is False and got.usage["prompt_tokens"] == 2
    records = _lines(box / "bridge.transcript.jsonl")
    assert [r["text"] for r in records if "hash" in r] == ["the answer is here"]
    assert [r["request_hash"] for r in records if r.get("event") == "bridge"] == [digest]

    # Answered files are not asked again.
    with FakeOpenAI("again") as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        assert main(["llm-bridge", str(box), "--llm-model", "fake-model", "--once"]) == 0
        assert srv.requests == []


@pytest.fixture(scope="module")
def tensor_intrinsics():
    """What the programs fixture's TuneContext imports, without inspect.stack's minutes (tune.py says why)."""
    from schedsearch.tune import import_tensor_intrinsics

    import_tensor_intrinsics()


def test_a_waiting_files_tune_is_answered_by_the_bridge(tensor_intrinsics, programs, tmp_path):  # noqa: F811
    """The compute node's tune (--llm files:DIR, waiting) and the login node's bridge, two processes sharing DIR."""
    box, out = tmp_path / "box", tmp_path / "run"
    box.mkdir()
    served = []

    def script(request):
        if "optimisation ideas" in request["messages"][-1]["content"]:
            return "- tile the loops for cache"
        served.append(1)
        return answer(programs[len(served) % len(programs)])

    with FakeOpenAI(script) as srv:
        bridge = subprocess.Popen([sys.executable, "-m", "schedsearch", "llm-bridge", str(box), "--llm-model",
                                   "fake-model", "--poll", "0.2", "--llm-price-in", "1e6"],
                                  cwd=ROOT, env=_env(srv.base_url), stderr=subprocess.PIPE, text=True)
        try:
            tune = subprocess.run([sys.executable, "-m", "schedsearch", "tune", MATMUL, "--size", "small",
                                   "--strategy", "llm", "--llm", f"files:{box}", "--llm-model", "fake-model",
                                   "--trials", "2", "-o", str(out), "--target", "llvm", "--llm-ideas", "1",
                                   "--llm-programs-per-idea", "2", "--llm-price-in", "1e6",
                                   "--validation-seeds", "1", "--repeats", "2"],
                                  cwd=ROOT, env=_env(""), capture_output=True, text=True,
                                  timeout=400)
            time.sleep(0.5)  # the bridge has printed its last answer line
        finally:
            bridge.send_signal(signal.SIGINT)
            bridge_err = bridge.communicate(timeout=30)[1]
        requests = len(srv.requests)
    assert tune.returncode == 0, tune.stderr[-2000:]
    assert bridge.returncode == 0 and "Traceback" not in bridge_err, bridge_err[-2000:]
    assert "llm-bridge: stopped" in bridge_err

    res = json.loads((out / "results.json").read_text())
    assert res["tasks"][0]["trials"] == 2 and res["validation"]["passed"]
    usage = res["search"]["llm"]
    # One round: the ideas and two programs, each asked once through the bridge, with the endpoint's tokens.
    assert usage["backend"] == "files" and usage["requests"] == requests == 3 and usage["failures"] == 0
    assert not usage["tokens_estimated"] and usage["prompt_tokens"] > 0
    assert usage["cost_usd"] == usage["prompt_tokens"]  # 1e6 USD per 1M tokens
    assert f"llm-bridge: 3 request(s) answered, 0 failed, 0 retries; {usage['prompt_tokens']} prompt" in bridge_err

    tune_answers = [r for r in _lines(out / "transcript.jsonl") if "hash" in r]
    bridge_events = [r for r in _lines(box / "bridge.transcript.jsonl") if r.get("event") == "bridge"]
    assert sorted(r["hash"] for r in tune_answers) == sorted(r["request_hash"] for r in bridge_events)
    assert all(r["error"] is None for r in tune_answers)
    # Waiting, the tune had each answer within seconds of writing its request (it looks every second).
    assert max(r["latency_s"] for r in tune_answers) < 30
    print("files-mode latencies through the bridge (s):", sorted(r["latency_s"] for r in tune_answers))
