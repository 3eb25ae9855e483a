"""The builder and runner: the cap on hopeless candidates must never make a capped kernel the reported
best; arguments are allocated once per task; runs overlap the build; stragglers are deferred, not lost."""
import os
import re

import pytest

from conftest import ROOT
from schedsearch import frontend, result_codes, target as targets, workload
from schedsearch.rundir import RunDir
from schedsearch.tune import search


@pytest.mark.slow
def test_capped_candidates_are_never_the_best(tmp_path, monkeypatch):
    # A tight cap so that this small CPU task caps some candidates (the worker reads these at start).
    monkeypatch.setenv("SCHEDSEARCH_CAP_FACTOR", "1.05")
    monkeypatch.setenv("SCHEDSEARCH_MIN_CAP_S", "0")
    wl = workload.load(ROOT / "workloads/level1/matmul.py", "small")
    target = targets.resolve("llvm")
    run = RunDir(tmp_path / "run").create()
    [task] = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, run.onnx)), target)
    trials = search([task], target, run, "ansor", lambda t: "evolutionary", trials=24)[task.name]
    measured = [t for t in trials if t["latency_us"] is not None]
    capped = [t for t in measured if t["capped"]]
    assert capped and len(capped) < len(measured)
    best = min(t["latency_us"] for t in measured)
    assert best == min(t["latency_us"] for t in measured if not t["capped"])
    assert all(t["latency_us"] > best for t in capped)
    for t in capped:  # each was more than 1.05x a full measurement made before it
        earlier = [u["latency_us"] for u in measured if u["trial"] < t["trial"] and not u["capped"]]
        assert earlier and t["latency_us"] > 1.05 * min(earlier)
    assert trials[-1]["best_us"] == best
    # Each candidate is in one round's build line, built or deferred (on 2 busy cores a slow one can be).
    rounds = re.findall(r"built (\d+) candidates on \d+ workers: [^;\n]*(?:; (\d+) deferred)?", run.log.read_text())
    assert rounds and sum(int(built) + int(deferred or 0) for built, deferred in rounds) == len(trials)


def _children() -> set[int]:
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    ppid = {}
    for p in pids:
        try:
            ppid[int(p)] = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # ended meanwhile
            pass
    return {p for p, parent in ppid.items() if parent == os.getpid()}


@pytest.mark.slow
def test_search_stops_the_worker_processes_it_started(tmp_path):
    """Build and run pools that search() starts, it shuts down (TVM: a pool left to the GC can deadlock)."""
    wl = workload.load(ROOT / "workloads/level1/softmax.py", "small")
    target = targets.resolve("llvm")
    run = RunDir(tmp_path / "run").create()
    [task] = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, run.onnx)), target)
    before = _children()
    search([task], target, run, "ansor", lambda t: "evolutionary", trials=4)
    assert _children() <= before


def _call_counting_kernel() -> str:
    """A real CPU kernel of about 0.1 s here that counts its calls in calls[0], built and exported as
    candidates are: its shared library's path."""
    import tvm
    from tvm.script import tirx as T

    from schedsearch import measure

    @T.prim_func
    def slow(a: T.Buffer((1 << 20,), "float32"), calls: T.Buffer((1,), "int32")):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        calls[0] = calls[0] + 1
        for i, j in T.grid(1 << 20, 100):
            a[i] = a[i] * T.float32(0.5) + T.float32(1)

    built = measure.build_kernel(tvm.IRModule({"main": slow}), tvm.target.Target("llvm"), None)
    return measure.export_shared_library(built)


@pytest.mark.parametrize("best_s, allowance_s, calls, samples", [
    (1e-6, 0.01, 1, 1),  # past the cap by more than any load takes: its first call is its record
    (1e-6, 1e3, 2, 1),  # within the load allowance of the cap: its next call decides
    (None, None, 4, 2),  # no best yet: measured in full; a call fills a repeat, so one call per repeat
])
def test_the_cap_spends_few_calls_on_a_hopeless_kernel(tmp_path, monkeypatch, best_s, allowance_s, calls, samples):
    import numpy as np
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from schedsearch import measure

    best_file = tmp_path / "best_s.txt"
    if best_s is not None:
        best_file.write_text(repr(best_s))
    monkeypatch.setenv(measure.BEST_FILE_ENV, str(best_file))
    if allowance_s is not None:
        monkeypatch.setattr(measure, "LOAD_ALLOWANCE_S", allowance_s)
    rt_mod, dev = tvm.runtime.load_module(_call_counting_kernel()), tvm.cpu(0)
    args = [tvm.runtime.tensor(np.zeros(1 << 20, "float32"), dev), tvm.runtime.tensor(np.zeros(1, "int32"), dev)]
    config = ms.runner.EvaluatorConfig(number=2, repeat=measure.REPEAT, min_repeat_ms=10)  # the GPU's
    secs = measure.run_evaluator_capped(rt_mod, dev, config, [args])
    assert int(args[1].numpy()[0]) == calls and len(secs) == samples
    assert result_codes.is_capped(secs) == (samples == 1)
    assert all(s > 0.01 for s in secs)


def test_arguments_are_allocated_once_per_task():
    import tvm

    from schedsearch.measure import alloc_args_cached

    a = (("TENSOR", "float32", [4, 8]), ("TENSOR", "float32", [8]))
    first = alloc_args_cached(tvm.cpu(0), a, 1)
    assert alloc_args_cached(tvm.cpu(0), a, 1) is first  # the next candidate of the task: same buffers
    other = alloc_args_cached(tvm.cpu(0), (("TENSOR", "float32", [3]),), 1)
    assert other is not first and tuple(other[0][0].shape) == (3,)


def test_builder_hands_each_built_candidate_to_an_overlapping_runner(tmp_path):
    """On a GPU runs start while the rest of the batch builds; forced on here (LLVM) to check the hand-over:
    each built candidate is started by the builder, and run() returns those runs for the right inputs."""
    from tvm.s_tir import meta_schedule as ms

    from schedsearch.measure import WarmBuilder, WarmRunner

    wl = workload.load(ROOT / "workloads/level1/matmul.py", "small")
    target = targets.resolve("llvm")
    [task] = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "m.onnx")), target)
    runner = WarmRunner(target, overlap=True, defer=False)  # run() waits for the runs (deferral: below)
    builder = WarmBuilder(runner)
    assert runner.overlap and builder.cores == runner.build_cores  # all cores but the runner's
    assert len(builder.cores) == len(os.sched_getaffinity(0)) - 1
    submitted, submit = [], runner.pool.submit
    runner.pool.submit = lambda *a: submitted.append(a) or submit(*a)
    built = builder.build([ms.builder.BuilderInput(task.mod, target)] * 3)
    paths = [b.artifact_path for b in built]
    assert all(b.error_msg is None for b in built) and len(set(paths)) == 3
    assert set(runner._started) == set(paths)  # started by the builder, before anyone called run()
    started = {p: runner._started[p] for p in paths}
    args = ms.arg_info.ArgInfo.from_entry_func(task.mod, True)
    results = [f.result() for f in runner.run([ms.runner.RunnerInput(p, runner.device_type, args) for p in paths])]
    assert all(r.error_msg is None and len(r.run_secs) >= 1 for r in results)
    assert not runner._started and all(f.done() for f in started.values())
    assert len(submitted) == 3  # run() took the started runs, none ran twice
    assert not WarmRunner(target).overlap  # on a CPU target runs wait for the build, as stock's do


def _slow_nth_build(counter_path: str, nth: int, sleep_s: float):
    """A build function for the pool that makes its `nth` build (counted across workers) a straggler."""
    def build(mod, target, params):
        import fcntl
        import time

        from schedsearch.measure import build_kernel

        with open(counter_path, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write("x")
            f.flush()
            f.seek(0)
            count = len(f.read())
        if count == nth:
            time.sleep(sleep_s)
        return build_kernel(mod, target, params)
    return build


def test_builder_defers_a_straggler_and_measures_it_later(tmp_path):
    """A round does not wait for a build far slower than the rest: it is reported as deferred, goes on
    building and running, and take_late() hands over its real result (forced overlap on LLVM)."""
    from tvm.s_tir import meta_schedule as ms

    from schedsearch.measure import WarmBuilder, WarmRunner
    from schedsearch.result_codes import deferred_token

    wl = workload.load(ROOT / "workloads/level1/matmul.py", "small")
    target = targets.resolve("llvm")
    [task] = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "m.onnx")), target)
    runner = WarmRunner(target, overlap=True)
    builder = WarmBuilder(runner, f_build=_slow_nth_build(str(tmp_path / "count"), 10, 8.0))
    built = builder.build([ms.builder.BuilderInput(task.mod, target)] * 10)
    tokens = [deferred_token(b.error_msg) for b in built]
    assert sum(t is not None for t in tokens) == 1  # the tenth build: the other nine went through
    [token] = [t for t in tokens if t is not None]
    assert all(b.error_msg is None for b in built if deferred_token(b.error_msg) is None)
    assert runner.take_late() == []  # still building
    [(late_token, late_build, late_run)] = runner.take_late(wait=True)
    assert late_token == token and late_build.error_msg is None and late_run.error_msg is None
    assert len(late_run.run_secs) >= 1 and all(float(s) > 0 for s in late_run.run_secs)
    assert runner.take_late(wait=True) == []  # handed over once


def test_runner_defers_runs_still_queued_when_the_round_is_built(tmp_path, monkeypatch):
    """The round's results do not wait for the GPU's queue either: a run still waiting is reported as
    deferred, and take_late() hands over its measurement, with the artifact it ran."""
    from tvm.s_tir import meta_schedule as ms

    from schedsearch import measure

    monkeypatch.setenv(measure.BEST_FILE_ENV, str(tmp_path / "best_s.txt"))  # no best yet: measured in full
    runner = measure.WarmRunner(targets.resolve("llvm"), overlap=True)
    runner.RUN_GRACE_S = 0.0  # the worker process has not even started: the run is surely still queued
    path = _call_counting_kernel()
    info = [ms.arg_info.TensorInfo("float32", [1 << 20]), ms.arg_info.TensorInfo("int32", [1])]
    runner.start(path, info)
    [result] = [f.result() for f in runner.run([ms.runner.RunnerInput(path, "cpu", info)])]
    token = result_codes.deferred_token(result.error_msg)
    assert token is not None and result.run_secs is None
    [(late_token, late_build, late_run)] = runner.take_late(wait=True)
    assert late_token == token and late_build.artifact_path == path
    assert late_run.error_msg is None and len(late_run.run_secs) == measure.REPEAT
    assert runner.take_late(wait=True) == []


def test_unroll_step_reads_the_scheduled_kernel(tmp_path):
    """The builder submits the most unrolled candidates first: the step must come from the annotation."""
    from tvm.s_tir import Schedule

    from schedsearch.measure import unroll_step

    wl = workload.load(ROOT / "workloads/level1/matmul.py", "small")
    [task] = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "m.onnx")),
                                    targets.resolve("llvm"))
    sch = Schedule(task.mod)
    outer, inner = sch.get_loops(sch.get_sblock("matmul"))[:2]
    sch.annotate(outer, "pragma_auto_unroll_max_step", 64)
    sch.annotate(inner, "pragma_auto_unroll_max_step", 512)
    assert unroll_step(task.mod) == 0 and unroll_step(sch.mod) == 512


@pytest.mark.slow
@pytest.mark.parametrize("strategy, deferred", [("evolutionary", "build"), ("rules", "build"), ("evolutionary", "run")])
def test_a_deferred_candidate_is_recorded_with_its_measurement(tmp_path, strategy, deferred):
    """Through the whole search: a deferred candidate (its build, or its run) reaches the trial log and
    the database with its real latency, once; nothing is recorded as 'deferred'."""
    from tvm.s_tir import meta_schedule as ms

    from schedsearch import strategies
    from schedsearch.measure import WarmBuilder, WarmRunner

    wl = workload.load(ROOT / "workloads/level1/matmul.py", "small")
    target = targets.resolve("llvm")
    run = RunDir(tmp_path / "run").create()
    [task] = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, run.onnx)), target)
    runner = WarmRunner(target, overlap=True)
    if deferred == "build":
        builder = WarmBuilder(runner, f_build=_slow_nth_build(str(tmp_path / "count"), 12, 8.0))
    else:  # runs still queued when the round is built: at least the one of the last build
        builder, runner.RUN_GRACE_S = WarmBuilder(runner), 0.0
    make = strategies.make("rules", run=run, target=target) if strategy == "rules" else lambda t: "evolutionary"
    trials = search([task], target, run, strategy, make, trials=12, runner=runner, builder=builder,
                    capping_runner=True)[task.name]
    log = run.log.read_text()
    assert ("1 deferred, still building" if deferred == "build" else "still waiting for the GPU") in log
    assert len(trials) == 12 and [t["trial"] for t in trials] == list(range(1, 13))
    assert not any("deferred" in (t["error"] or "") for t in trials)
    assert sum(t["latency_us"] is not None for t in trials) >= 11
    records = ms.database.JSONDatabase(work_dir=str(run.database)).get_all_tuning_records()
    assert len(records) == 12  # errors are recorded as 1e10 s, as MetaSchedule records them
    assert sum(min(float(s) for s in r.run_secs) >= 1e9 for r in records) == sum(t["error"] is not None for t in trials)
