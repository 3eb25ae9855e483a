"""LLM search end to end on LLVM against a scripted OpenAI-compatible server on 127.0.0.1.

The server's answers are programs written from MetaSchedule design spaces plus deliberate
mistakes and attacks; nothing here is an LLM's output."""
import json
import os
import random
from pathlib import Path

import pytest
import tvm

from conftest import ROOT
from fake_openai import FakeOpenAI
from schedsearch import frontend, schedule_lang, target as targets, workload
from schedsearch.cli import main
from schedsearch.strategies.rules import redraw

MATMUL = str(ROOT / "workloads/level1/matmul.py")


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """Eight distinct valid programs for the small matmul task, and its block name."""
    from tvm.s_tir import meta_schedule as ms

    wl = workload.load(MATMUL, "small")
    target = targets.resolve("llvm")
    mod = frontend.import_onnx(frontend.export_onnx(wl, tmp_path_factory.mktemp("m") / "m.onnx"))
    [task] = frontend.extract_tasks(mod, target)
    ctx = ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply", task_name="t")
    sketch = schedule_lang.parse(schedule_lang.from_trace(ctx.generate_design_space()[0].trace))
    out = set()
    for seed in range(1, 100):
        sch = tvm.s_tir.Schedule(task.mod, seed=seed)
        schedule_lang.apply(redraw(sketch, None), sch)
        out.add(schedule_lang.from_trace(sch.trace))
        if len(out) == 8:
            break
    return sorted(out)


def answer(program: str) -> str:
    return f"Here is the schedule.\n```python\n{program}\n```\n"


def scripted(programs, sentinel: Path):
    attacks = [
        answer(f"__import__('os').system('touch {sentinel}')"),
        answer(programs[0].replace('name="', 'name="no_such_', 1)),  # wrong block name
        ("status", 429, 0),  # rate limited: retried
        answer("b0 = sch.get_sblock(name=\"x\", func_name=\"main\")\nsch.make_it_fast(block=b0)"),  # hallucinated
        ("truncated",),  # broken JSON: retried
        answer(f"sch.__class__.__init__\nopen('{sentinel}', 'w')"),
        ("slow", 0.3, answer(programs[1])),
        "I cannot write code today.",  # no program at all
    ]
    queue = [a for pair in zip(attacks, [answer(p) for p in programs]) for a in pair]

    def script(request):
        prompt = request["messages"][-1]["content"]
        if "optimisation ideas" in prompt:
            return "- tile the loops for cache\n- vectorize the inner loop and parallelize the outer"
        return queue.pop(0) if queue else answer(programs[len(queue) % len(programs)])
    return script


@pytest.mark.slow
def test_llm_tune_against_a_loopback_server(programs, tmp_path, monkeypatch):
    sentinel = tmp_path / "pwned"
    out = tmp_path / "run"
    with FakeOpenAI(scripted(programs, sentinel)) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test")
        rc = main(["tune", MATMUL, "--size", "small", "--strategy", "llm", "--llm-model", "fake-model",
                   "--trials", "6", "-o", str(out), "--target", "llvm", "--llm-ideas", "2",
                   "--llm-programs-per-idea", "3", "--llm-concurrency", "1", "--validation-seeds", "1",
                   "--repeats", "3"])
        assert len(srv.requests) >= 8
    assert rc == 0
    assert not sentinel.exists()
    res = json.loads((out / "results.json").read_text())
    assert res["validation"]["passed"]
    [task] = res["tasks"]
    assert task["trials"] == 6 and task["errors"] == 0  # only valid programs reached the hardware
    usage = res["search"]["llm"]
    assert usage["requests"] >= 8 and usage["retries"] >= 2 and usage["prompt_tokens"] > 0
    assert res["search"]["proposer"] == "llm:fake-model" and res["search"]["rounds"]

    records = [json.loads(l) for l in (out / "transcript.jsonl").read_text().splitlines()]
    outcomes = [r for r in records if r.get("event") == "outcome"]
    reasons = " | ".join(str(o["reason"]) for o in outcomes if o["status"] == "rejected")
    assert "`__import__` is not allowed" in reasons or "__import__" in reasons
    assert "make_it_fast" in reasons
    assert "no_such_" in reasons
    assert sum(o["status"] == "measured" for o in outcomes) == 6
    responses = [r for r in records if "hash" in r]
    assert all(r["tag"].startswith(task["name"]) for r in responses)

    # The same search again with no endpoint at all, from the transcript.
    monkeypatch.delenv("OPENAI_BASE_URL")
    replayed = tmp_path / "replayed"
    rc = main(["tune", MATMUL, "--size", "small", "--strategy", "llm", "--llm", f"replay:{out / 'transcript.jsonl'}",
               "--trials", "6", "-o", str(replayed), "--target", "llvm", "--llm-ideas", "2",
               "--llm-programs-per-idea", "3", "--validation-seeds", "1", "--repeats", "3"])
    assert rc == 0
    assert json.loads((replayed / "results.json").read_text())["tasks"][0]["trials"] == 6


def test_replay_miss_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc = main(["tune", MATMUL, "--size", "small", "--strategy", "llm", "--llm", f"replay:{empty}",
               "--trials", "2", "-o", str(tmp_path / "run"), "--target", "llvm"])
    assert rc == 2
    assert "has no response for this prompt" in capsys.readouterr().err


def test_no_endpoint_is_a_clear_error(tmp_path, capsys, monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "OPENAI_MODEL"):
        monkeypatch.delenv(var, raising=False)
    rc = main(["tune", MATMUL, "--size", "small", "--strategy", "llm", "--trials", "2",
               "-o", str(tmp_path / "run"), "--target", "llvm"])
    assert rc == 2
    assert "no LLM endpoint configured" in capsys.readouterr().err


@pytest.mark.slow
def test_files_mode_no_wait_then_resume(programs, tmp_path):
    """Offline GPU node: requests are written, the run stops; answers arrive; the same command resumes."""
    box, out = tmp_path / "box", tmp_path / "run"
    args = ["tune", MATMUL, "--size", "small", "--strategy", "llm", "--llm", f"files:{box}", "--llm-model", "m",
            "--no-wait", "--trials", "4", "-o", str(out), "--target", "llvm", "--llm-ideas", "1",
            "--llm-programs-per-idea", "4", "--validation-seeds", "1", "--repeats", "2"]
    answered = 0
    for _ in range(8):
        rc = main(args)
        if rc == 0:
            break
        assert rc == 3
        for req in sorted(box.glob("*.request.json")):
            resp = req.with_name(req.name.replace(".request.", ".response."))
            if resp.exists():
                continue
            prompt = json.loads(req.read_text())["request"]["messages"][-1]["content"]
            text = "- tile for cache" if "optimisation ideas" in prompt else answer(programs[answered % len(programs)])
            answered += "optimisation ideas" not in prompt
            resp.write_text(json.dumps({"content": text}))
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"][0]["trials"] == 4 and res["validation"]["passed"]


@pytest.mark.skipif(not os.environ.get("OPENAI_API_KEY") or not (os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_MODEL")),
                    reason="needs a real endpoint: OPENAI_API_KEY and OPENAI_BASE_URL or OPENAI_MODEL")
@pytest.mark.slow
def test_real_endpoint(tmp_path):
    rc = main(["tune", MATMUL, "--size", "small", "--strategy", "llm", "--trials", "4", "-o", str(tmp_path / "run"),
               "--target", "llvm", "--llm-ideas", "2", "--llm-programs-per-idea", "2", "--validation-seeds", "1"])
    assert rc == 0


@pytest.mark.parametrize("deferred", ["build", "run"])
def test_a_deferred_candidate_reaches_the_history_as_measured(deferred):
    """A candidate whose build or run was deferred is not a failure: the proposer's history shows it as
    measuring, then measured with its latency once the late result comes (not in the rejections)."""
    from tvm.s_tir import meta_schedule as ms

    from schedsearch.result_codes import deferred as deferred_error
    from schedsearch.strategies.proposals import Outcome, Proposal, ProposalSearch

    class Recorder:
        label = "recorder"

        def __init__(self):
            self.statuses = []

        def record(self, outcomes, proposals):
            self.statuses += [o.status for o in outcomes]

    recorder = Recorder()
    search = ProposalSearch(recorder, {})
    search.trials, search.measured, search.rejected, search.measuring = 0, [], [], {}
    fast, slow = Outcome("sch.a()", "idea 1", "queued"), Outcome("sch.b()", "idea 2", "queued")
    search.pending = [(fast, Proposal("sch.a()", "idea 1")), (slow, Proposal("sch.b()", "idea 2"))]
    search.notify_runner_results([], [ms.runner.RunnerResult([0.002], None),
                                      ms.runner.RunnerResult(None, deferred_error(7, f"still {deferred}ing"))])
    assert search.trials == 2 and slow.status == "measuring" and search.measured == [fast] and not search.rejected
    search.notify_late_results([7], [ms.runner.RunnerResult([0.001, 0.001], None)])
    assert slow.status == "measured" and slow.latency_us == pytest.approx(1000.0)
    assert search.measured == [slow, fast] and not search.rejected and not search.measuring
    assert recorder.statuses == ["measured", "measuring", "measured"]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_endpoint_is_an_error_not_a_success(tmp_path, capsys, monkeypatch):
    """Every request fails to connect: the run used to spend minutes, end 'search stopped after 0 trials: no
    new candidates', validate the untuned module and exit 0. Now it stops before the export."""
    from schedsearch import llm_client

    monkeypatch.setattr(llm_client, "MAX_SLEEP_S", 0.0)  # retries without their backoff
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    out = tmp_path / "run"
    rc = main(["tune", MATMUL, "--size", "small", "--strategy", "llm", "--llm-model", "m", "--trials", "2",
               "-o", str(out), "--target", "llvm", "--llm-timeout", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"schedsearch: error: cannot reach the LLM endpoint at {url}: APIConnectionError" in err
    assert "(5 attempts)" in err
    assert not (out / "model.onnx").exists() and not (out / "results.json").exists()


def test_no_answer_in_a_whole_run_is_an_error(tmp_path, monkeypatch):
    """The endpoint lists its models but drops every completion: the first round that gets nothing, with no
    request answered in the run, ends the search with the cause instead of trying the next rounds."""
    from schedsearch import llm_client
    from schedsearch.llm_client import LLMError
    from schedsearch.strategies.llm import LLMProposer
    from schedsearch.strategies.proposals import TaskView

    monkeypatch.setattr(llm_client, "MAX_SLEEP_S", 0.0)
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    view = TaskView("matmul", "# the kernel", {"kind": "llvm"}, [], [], [], 1, 8, random.Random(0))
    with FakeOpenAI(lambda request: ("drop",)) as srv:
        client = llm_client.make_client(f"openai:{srv.base_url}", model="m", transcript=tmp_path / "t.jsonl")
        proposer = LLMProposer(client, ideas=2, programs_per_idea=2)
        with pytest.raises(LLMError, match=r"the LLM endpoint gave no answer: all 1 requests of this run failed "
                                           r"\(last: APIConnectionError: Connection error., after 5 attempts\)"):
            proposer.propose(view)
    assert proposer.failed_rounds == [{"task": "matmul", "round": 1, "requests": 1, "failed": 1,
                                       "error": "APIConnectionError: Connection error.", "attempts": 5}]


@pytest.mark.slow
def test_a_round_whose_requests_all_fail_is_reported(programs, tmp_path, capsys, monkeypatch):
    """The endpoint answers the first round, then drops every connection: each later round says so on the
    console and in results.json; what was measured before counts (exit 0)."""
    from schedsearch import llm_client

    monkeypatch.setattr(llm_client, "MAX_SLEEP_S", 0.0)
    answered = []

    def script(request):
        if len(answered) >= 3:  # the first round: one ideas request and two programs
            return ("drop",)
        answered.append(1)
        if "optimisation ideas" in request["messages"][-1]["content"]:
            return "- tile the loops for cache"
        return answer(programs[len(answered) - 2])

    out = tmp_path / "run"
    with FakeOpenAI(script) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "test")
        rc = main(["tune", MATMUL, "--size", "small", "--strategy", "llm", "--llm-model", "fake-model",
                   "--trials", "4", "-o", str(out), "--target", "llvm", "--llm-ideas", "1",
                   "--llm-programs-per-idea", "2", "--validation-seeds", "1", "--repeats", "2"])
    captured = capsys.readouterr()
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"][0]["trials"] == 2
    failed = res["search"]["failed_rounds"]
    assert [r["round"] for r in failed] == [2, 3, 4] and all(r["failed"] == r["requests"] == 1 for r in failed)
    assert all("APIConnectionError" in r["error"] for r in failed)
    assert "LLM round 2: 1 of 1 requests failed, no program came back (last: APIConnectionError" in captured.err
    assert "LLM: 3 round(s) got no program back, their requests failed (last: APIConnectionError" in captured.out
