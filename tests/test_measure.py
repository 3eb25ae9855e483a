"""The builder and runner: the cap on hopeless candidates must never make a capped kernel the reported
best; arguments are allocated once per task; runs overlap the build; stragglers are deferred, not lost."""
import os

import pytest

from conftest import ROOT
from schedsearch import frontend, target as targets, workload
from schedsearch.rundir import RunDir
from schedsearch.tune import search


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
    assert "built 24 candidates on" in run.log.read_text()  # how long the round's builds trailed


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
    runner = WarmRunner(target, overlap=True)
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

    from schedsearch.measure import WarmBuilder, WarmRunner, deferred_token

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
    assert builder.take_late() == []  # still building
    [(late_token, late_build, late_run)] = builder.take_late(wait=True)
    assert late_token == token and late_build.error_msg is None and late_run.error_msg is None
    assert len(late_run.run_secs) >= 1 and all(float(s) > 0 for s in late_run.run_secs)
    assert builder.take_late(wait=True) == []  # handed over once


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


@pytest.mark.parametrize("strategy", ["evolutionary", "rules"])
def test_a_deferred_candidate_is_recorded_with_its_measurement(tmp_path, strategy):
    """Through the whole search: the deferred candidate reaches the trial log and the database with its
    real latency, once; nothing is recorded as 'deferred'."""
    from tvm.s_tir import meta_schedule as ms

    from schedsearch import strategies
    from schedsearch.measure import WarmBuilder, WarmRunner

    wl = workload.load(ROOT / "workloads/level1/matmul.py", "small")
    target = targets.resolve("llvm")
    run = RunDir(tmp_path / "run").create()
    [task] = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, run.onnx)), target)
    runner = WarmRunner(target, overlap=True)
    builder = WarmBuilder(runner, f_build=_slow_nth_build(str(tmp_path / "count"), 12, 8.0))
    make = strategies.make("rules", run=run, target=target) if strategy == "rules" else lambda t: "evolutionary"
    trials = search([task], target, run, strategy, make, trials=12, runner=runner, builder=builder,
                    capping_runner=True)[task.name]
    assert "1 deferred, still building" in run.log.read_text()
    assert len(trials) == 12 and [t["trial"] for t in trials] == list(range(1, 13))
    assert not any("deferred" in (t["error"] or "") for t in trials)
    assert sum(t["latency_us"] is not None for t in trials) >= 11
    records = ms.database.JSONDatabase(work_dir=str(run.database)).get_all_tuning_records()
    assert len(records) == 12  # errors are recorded as 1e10 s, as MetaSchedule records them
    assert sum(min(float(s) for s in r.run_secs) >= 1e9 for r in records) == sum(t["error"] is not None for t in trials)
