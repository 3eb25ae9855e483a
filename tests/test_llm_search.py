"""LLM search end to end on LLVM against a scripted OpenAI-compatible server on 127.0.0.1.

The server's answers are programs written from MetaSchedule design spaces plus deliberate
mistakes and attacks; nothing here is an LLM's output."""
import json
import os
import random
import re
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

    from schedsearch.tune import import_tensor_intrinsics

    import_tensor_intrinsics()  # as tune does, before TuneContext would: the intrinsics are noted (tensorize_text)

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

    # With a larger budget the replay measures what it finds answers for (requests for more programs than
    # recorded have none), then ends: not an error.
    longer = tmp_path / "longer"
    rc = main(["tune", MATMUL, "--size", "small", "--strategy", "llm", "--llm", f"replay:{out / 'transcript.jsonl'}",
               "--trials", "12", "-o", str(longer), "--target", "llvm", "--llm-ideas", "2",
               "--llm-programs-per-idea", "3", "--validation-seeds", "1", "--repeats", "3"])
    assert rc == 0
    [task] = json.loads((longer / "results.json").read_text())["tasks"]
    assert 0 < task["trials"] < 12 and task["ended"] == "the replayed transcript has no more answers"
    assert not task["space_exhausted"]


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
def test_files_mode_no_wait_two_exchanges_a_round_none_wasted(programs, tmp_path):
    """Offline GPU node: each run writes the requests it needs and stops; the answers are written; the same
    command resumes. Over 3 rounds every round is two exchanges (ideas, programs), and every answer written is
    used: the run that measured a round asks the next round's ideas, and the run after it, which rebuilds the
    history from proposals.jsonl, asks the very same prompt (it used to restart at round 1, call every program
    "database" and forget the rejections: a new prompt, a wasted answer)."""
    box, out = tmp_path / "box", tmp_path / "run"
    args = ["tune", MATMUL, "--size", "small", "--strategy", "llm", "--llm", f"files:{box}", "--llm-model", "m",
            "--no-wait", "--trials", "6", "-o", str(out), "--target", "llvm", "--llm-ideas", "1",
            "--llm-programs-per-idea", "2", "--validation-seeds", "1", "--repeats", "2"]
    answered, runs = 0, 0
    for runs in range(1, 12):
        rc = main(args)
        if rc == 0:
            break
        assert rc == 3
        for req in sorted(box.glob("*.request.json")):
            resp = req.with_name(req.name.replace(".request.", ".response."))
            if resp.exists():
                continue
            prompt = json.loads(req.read_text())["request"]["messages"][-1]["content"]
            text = "- tile for cache" if "optimisation ideas" in prompt else answer(programs[answered])
            answered += "optimisation ideas" not in prompt
            resp.write_text(json.dumps({"content": text}))
    assert rc == 0 and runs == 7  # per round: ideas asked, programs asked, measured (and the next ideas asked)
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"][0]["trials"] == 6 and res["validation"]["passed"]

    records = [json.loads(l) for l in (out / "transcript.jsonl").read_text().splitlines()]
    responses = [r for r in records if "hash" in r]
    kinds = {}  # (round, ideas | programs) -> the prompts asked
    for r in responses:
        _, round_, *rest = r["tag"].split("|")
        kinds.setdefault((round_, "ideas" if rest == ["ideas"] else "programs"), set()).add(r["hash"])
    assert sorted(kinds) == [(f"r{i}", k) for i in (1, 2, 3) for k in ("ideas", "programs")]  # 2 exchanges a round
    assert [len(kinds[f"r{i}", "ideas"]) for i in (1, 2, 3)] == [1, 1, 1]  # each round's ideas asked once
    # Round 2 measures 2 programs and the best of round 1 again (a trial: 2 + 3 + 1 = 6); round 3 has 1 trial left.
    assert [len(kinds[f"r{i}", "programs"]) for i in (1, 2, 3)] == [2, 2, 1]
    written = {p.name.split(".")[0] for p in box.glob("*.request.json")}
    answers = {p.name.split(".")[0] for p in box.glob("*.response.json")}
    assert written == answers == {r["hash"] for r in responses}  # every request answered, every answer used
    outcomes = [r for r in records if r.get("event") == "outcome"]
    used = {o["request"] for o in outcomes if o["status"] == "measured" and o["request"]}  # not the re-measure
    assert {h for k, hs in kinds.items() if k[1] == "programs" for h in hs} == used
    remeasures = [o for o in outcomes if o["source"].startswith("re-measure of ") and o["status"] == "measured"]
    assert len(remeasures) == 1 and remeasures[0]["round"] == 2
    trials = [json.loads(l) for l in (out / "trials.jsonl").read_text().splitlines()]
    assert [t["origin"] for t in trials] == ["llm:m"] * 4 + ["re-measure", "llm:m"]
    # The resumed run's prompt is the one the run before wrote, byte for byte.
    for r in responses:
        assert json.loads((box / f"{r['hash']}.request.json").read_text())["request"]["messages"] == r["messages"]
    last = next(r for r in responses if r["tag"].endswith("|r3|ideas"))["messages"][-1]["content"]
    assert "re-measured:" in last and "Round 2, each program" in last and "enter_postproc" not in last


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


def test_a_replay_that_ends_while_its_programs_are_measuring_ends_the_search():
    """The H200's softmax: the round's 8 programs were deferred (still building) when the replayed transcript had no
    next round. That ends the search like any recorded run's end; only a task with no answer at all is an error."""
    from schedsearch.llm_client import TranscriptExhausted
    from schedsearch.strategies.proposals import Outcome, ProposalSearch

    class Ended:
        label = "llm:replay"

        def propose(self, view):
            raise TranscriptExhausted("replay: transcript t.jsonl has no response for this prompt")

    for outcomes, ended, error in [([Outcome("sch.a()", "idea 1", "measuring")], True, False), ([], False, True)]:
        search = ProposalSearch(Ended(), {})
        search.max_trials, search.per_iter, search.trials, search.round = 16, 8, 8, 1
        search.outcomes, search.measured, search.rejected = outcomes, [], []
        search._view = lambda want, can_measure: None
        assert search.generate_measure_candidates() is None
        assert (search.ended == "the replayed transcript has no more answers") == ended
        assert isinstance(search.error, TranscriptExhausted) == error


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


def _task_view(round_: int, measured=(), recent=(), can_measure: int = 1 << 30, kind: str = "llvm"):
    from schedsearch.strategies.proposals import TaskView

    return TaskView("layer_norm", "# the kernel", {"kind": kind}, [], list(measured), list(recent), round_, 8,
                    random.Random(0), None, can_measure)


H200_ANSWERS = ROOT / "tests/data/h200-layernorm/transcript-answers.jsonl"  # of /work/shared/llm-transcripts/h200


def test_replay_of_the_h200_transcript_finds_every_answer_with_todays_prompts(tmp_path):
    """The real model's layernorm transcript (2 rounds, recorded with older prompts, each ideas answer read
    twice by the files backend) replays round by round: every request of today's prompts gets the recorded
    answer of the same request (by tag), round 2 gets round 2's ideas, not round 1's again."""
    from schedsearch.llm_client import make_client
    from schedsearch.strategies.llm import LLMProposer, extract_program
    from schedsearch.strategies.proposals import Outcome

    records = [json.loads(l) for l in H200_ANSWERS.read_text().splitlines()]
    programs = [extract_program(r["text"]) for r in records if re.search(r"\|i\d+\|s\d+$", r["tag"])]
    assert len(programs) == 16
    proposer = LLMProposer(make_client(f"replay:{H200_ANSWERS}", transcript=tmp_path / "t.jsonl"))
    first = proposer.propose(_task_view(1, kind="cuda"))
    assert [p.program for p in first] == programs[:8]
    done = [Outcome(p.program, p.source, "measured", latency_us=200.0 + i, round=1, idea=p.idea)
            for i, p in enumerate(first)]
    second = proposer.propose(_task_view(2, done, done, kind="cuda"))
    assert [p.program for p in second] == programs[8:]
    assert second[0].idea.startswith("Get more loads in flight") and first[0].idea.startswith("Give ln_stats")


@pytest.mark.parametrize("exchange", ["ideas", "programs"])
def test_a_round_asks_no_more_programs_than_trials_left(tmp_path, exchange):
    """3 trials left, 4 ideas x 2 programs: 3 programs asked for (3 ideas, one each); with --llm-exchange
    programs one exchange of 3 requests, each program's idea taken from its first comment."""
    from schedsearch import llm_client
    from schedsearch.strategies.llm import LLMProposer

    def script(request):
        if "optimisation ideas" in request["messages"][-1]["content"]:
            return "- tile\n- vectorize\n- unroll\n- parallel"
        return answer("# idea: split the rows over threads\nb0 = sch.get_sblock(name=\"x\", func_name=\"main\")")

    with FakeOpenAI(script) as srv:
        client = llm_client.make_client(f"openai:{srv.base_url}", model="m", transcript=tmp_path / "t.jsonl")
        proposals = LLMProposer(client, ideas=4, programs_per_idea=2, exchange=exchange).propose(
            _task_view(1, can_measure=3))
        prompts = [r["messages"][-1]["content"] for r in srv.requests]
    tags = [json.loads(l)["tag"] for l in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(proposals) == 3
    if exchange == "ideas":
        assert "Propose 3 distinct optimisation ideas" in prompts[0] and len(prompts) == 4
        assert sorted(tags[1:]) == ["layer_norm|r1|i0|s0", "layer_norm|r1|i1|s0", "layer_norm|r1|i2|s0"]
        assert [p.idea for p in proposals] == ["tile", "vectorize", "unroll"]
    else:
        assert len(prompts) == 3 and not any("optimisation ideas" in p for p in prompts)
        assert any("request 2 of 3" in p for p in prompts)
        assert sorted(tags) == ["layer_norm|r1|p0", "layer_norm|r1|p1", "layer_norm|r1|p2"]
        assert {p.idea for p in proposals} == {"split the rows over threads"}


def test_a_resumed_round_is_asked_with_the_same_prompt_byte_for_byte(tmp_path):
    """A run asks round 2 (files, no answer yet: it stops), and a deferred measurement of round 1 arrives as it
    ends. The next run rebuilds the history from proposals.jsonl and asks round 2 with the same prompt: the
    request file already written is the one it waits for, not a new one. Round 3 then shows the late result."""
    from types import SimpleNamespace

    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    from schedsearch.llm_client import PendingResponses, make_client
    from schedsearch.result_codes import deferred
    from schedsearch.strategies.llm import LLMProposer, history_text
    from schedsearch.strategies.proposals import Outcome, Proposal, ProposalSearch

    a = te.placeholder((8,), name="A")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((8,), lambda i: a[i] * 2, name="B")])})
    box, history = tmp_path / "box", tmp_path / "proposals.jsonl"

    def start() -> ProposalSearch:
        client = make_client(f"files:{box}", model="m", wait=False)
        search = ProposalSearch(LLMProposer(client, ideas=1, programs_per_idea=2), {"kind": "llvm"}, history=history)
        search.context = SimpleNamespace(task_name="t", mod=mod)
        search.rng = random.Random(0)
        search._inst.pre_tuning(8, 8, [], SimpleNamespace(has_workload=lambda mod: False), None)  # not via the FFI
        return search

    first = start()
    # Round 1 as generate_measure_candidates leaves it: checked, ranked, one measured now, one deferred.
    first.round = 1
    fast, late, dup = (Outcome(f"sch.p{i}()", f"idea 1, variation {i}", s, round=1, idea="tile", kernel=str(i))
                       for i, s in ((1, "queued"), (2, "queued"), (3, "duplicate")))
    first.outcomes += [fast, late, dup]
    first.history.ended(1, 3)
    first._record([fast, late, dup], [Proposal(o.program, o.source) for o in (fast, late, dup)])
    first.pending = [(fast, Proposal(fast.program, fast.source)), (late, Proposal(late.program, late.source))]
    first.notify_runner_results([], [ms.runner.RunnerResult([0.002], None),
                                     ms.runner.RunnerResult(None, deferred(7, "still waiting for the GPU"))])
    assert first.generate_measure_candidates() is None and isinstance(first.error, PendingResponses)
    [asked] = first.error.paths
    first.notify_late_results([7], [ms.runner.RunnerResult([0.001], None)])  # the late result, as the run ends

    resumed = start()
    assert resumed.round == 1 and [o.status for o in resumed.outcomes] == ["measured", "measured", "duplicate"]
    assert [o.latency_us for o in resumed.measured] == [1000.0, 2000.0]
    assert resumed.generate_measure_candidates() is None and resumed.error.paths == [asked]
    assert sorted(box.iterdir()) == [asked]
    shown = json.loads(asked.read_text())["request"]["messages"][-1]["content"]
    assert "1000 us" not in shown and "build or run still pending" in shown and "duplicate of a kernel" in shown
    # Round 2 done (no program came back, say): round 3 shows everything measured.
    resumed.history.ended(2, 0)
    again = start()
    again.round += 1  # as generate_measure_candidates does
    view = again._view(8, 8)
    assert view.round == 3 and "Fastest so far: 1000 us (r1 idea 1, variation 2)" in history_text(view)


def test_the_prompt_names_the_tensor_intrinsics_for_the_kernels_types():
    """TVM keeps no list of its tensor intrinsics: import_tensor_intrinsics notes them as they register. A
    float32 kernel has none on either target (the prompt says so); float16 and int8 ones on CUDA do."""
    from tvm import te

    from schedsearch.strategies.llm import tensorize_text
    from schedsearch.tune import TENSOR_INTRINSICS, import_tensor_intrinsics

    import_tensor_intrinsics()
    if not TENSOR_INTRINSICS:
        pytest.skip("tvm.s_tir.tensor_intrin was imported before import_tensor_intrinsics in this process")

    def matmul(dtype: str, acc: str):
        a, b = te.placeholder((64, 64), dtype, name="A"), te.placeholder((64, 64), dtype, name="B")
        k = te.reduce_axis((0, 64), "k")
        c = te.compute((64, 64), lambda i, j: te.sum(a[i, k].astype(acc) * b[k, j].astype(acc), axis=k), name="C")
        return tvm.IRModule({"main": te.create_prim_func([a, b, c])})

    def text(dtype, acc, kind):
        view = _task_view(1, kind=kind)
        view.mod, view.target = matmul(dtype, acc), {"kind": kind, "machine": "x86_64"}
        return tensorize_text(view)

    for kind in ("llvm", "cuda"):
        assert text("float32", "float32", kind) == ("tensorize: no tensor intrinsic of TVM's computes on this "
                                                    "kernel's types (float32) on this target.")
    assert "wmma_sync_16x16x16_f16f16f32" in text("float16", "float32", "cuda")
    assert "dp4a_s8s8s32" in text("int8", "int32", "cuda") and "dp4a" not in text("int8", "int32", "llvm")
