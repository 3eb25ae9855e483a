"""Trials per minute: stock MetaSchedule builder/runner vs ours, same task, seed and trial count,
in one process on one machine. The ratio means nothing if the best latency drops, so both print.

    python benchmarks/tuning_throughput.py [--workload workloads/level1/matmul.py] [--size small]
                                           [--trials 64] [--target auto|llvm|cuda] [--deadline S]
                                           [--only stock|schedsearch] [--json OUT.json] [--run-dir DIR]
                                           [--no-overlap] [--no-defer]

--only runs one arm (e.g. the two arms at once on two GPUs of one host, each with its own share of
the cores: merge with --merge A.json B.json). --deadline S: an arm starts no new round after S seconds
and reports the trials it finished; the table then also compares both arms at the trial count both
reached. --run-dir keeps each arm's run (DIR/<arm>): run again with it to go on where a deadline
stopped, counting the time of every invocation. Time is search time (from the start of the search to
its last measurement), split into the search strategy, build (for ours: while the first runs already
overlap it) and run (what the runner adds after the build, and the wait for deferred candidates at the end).
"""
import argparse
import contextlib
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from schedsearch import frontend, measure, target as targets, workload
from schedsearch.report import fmt_us, table
from schedsearch.rundir import RunDir
from schedsearch.tune import search, search_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="workloads/level1/matmul.py")
    p.add_argument("--size", default="small")
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--target", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, help="seconds of tuning per arm, then stop and count what finished")
    p.add_argument("--only", choices=ARMS)
    p.add_argument("--json", help="write the measured rows here")
    p.add_argument("--run-dir", help="keep the arms' runs here and resume them")
    p.add_argument("--no-overlap", action="store_true", help="ours: run candidates only after the whole build")
    p.add_argument("--no-defer", action="store_true", help="ours: every round waits for its slowest build and run")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="print the table of arms measured by earlier --json runs")
    args = p.parse_args()
    if args.merge:
        return report([row for path in args.merge for row in json.loads(Path(path).read_text())])
    import tvm.s_tir.tensor_intrin  # noqa: F401  TuneContext imports it once a process: not in an arm's time

    target = targets.resolve(args.target)
    wl = workload.load(args.workload, args.size)
    tmp = Path(args.run_dir or tempfile.mkdtemp(prefix="throughput-"))
    mod = frontend.import_onnx(frontend.export_onnx(wl, tmp / "model.onnx"), wl.shapes())
    task = frontend.extract_tasks(mod, target)[0]  # the heaviest kernel
    cores = len(os.sched_getaffinity(0))  # both arms build on the same share of the cores
    make = {
        "stock": lambda: (ms.builder.LocalBuilder(max_workers=cores), ms.runner.LocalRunner()),
        "schedsearch": lambda: measure.make_builder_and_runner(target, overlap=False if args.no_overlap else None,
                                                               defer_stragglers=not args.no_defer),
    }
    rows = []
    for name in [args.only] if args.only else ARMS:
        run = RunDir(tmp / name).create()
        # NVRTC keeps compiled kernels in the driver's cache, shared by every process of the host: arms
        # running at once with the same seed would compile each other's candidates. One cache per arm.
        os.environ["CUDA_CACHE_PATH"] = str(run.root / "cuda-cache")
        phases = run.root / "phases.json"  # build and run seconds of every invocation
        spent = json.loads(phases.read_text()) if phases.exists() else {"build_s": 0.0, "run_s": 0.0}
        builder, runner = make[name]()
        builder, runner = TimedBuilder(builder, spent), TimedRunner(runner, spent)
        deadline = time.time() + (args.deadline or float("inf"))
        search([task], target, run, "ansor", lambda t: "evolutionary", args.trials, args.seed, runner=runner,
               builder=builder, capping_runner=name == "schedsearch", stop=lambda: time.time() > deadline)
        phases.write_text(json.dumps(spent))
        trials = run.read_trials()
        wall = search_seconds(trials)
        off = [what for what, on in [("overlap", args.no_overlap), ("deferral", args.no_defer)] if on]
        arm = name + "".join(f" (no {what})" for what in off if name == "schedsearch")
        rows.append({"arm": arm, "task": task.name, "workload": wl.name, "size": wl.size,
                     "device": targets.facts(target)["name"], "seed": args.seed, "budget": args.trials,
                     "stopped_by_deadline": len(trials) < args.trials,
                     "invocations": len({t["started"] for t in trials}),
                     "cuda_compiler": os.environ.get("TVM_CUDA_COMPILE_MODE", "nvrtc") if target.kind.name == "cuda" else None,
                     "wall_s": round(wall, 1), "cores": cores,
                     "search_s": round(wall - spent["build_s"] - spent["run_s"], 1),
                     "build_s": round(spent["build_s"], 1), "run_s": round(spent["run_s"], 1),
                     "latencies_us": [t["latency_us"] for t in trials], "seconds_at": seconds_at(trials),
                     "capped": sum(bool(t.get("capped")) for t in trials),
                     "errors": sum(t["error"] is not None for t in trials),
                     "error_kinds": dict(Counter(t["error"][:120] for t in trials if t["error"]).most_common(5))})
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    report(rows)


@contextlib.contextmanager
def adding_seconds(spent: dict, key: str):
    t0 = time.time()
    try:
        yield
    finally:
        spent[key] += time.time() - t0


@derived_object
class TimedBuilder(ms.builder.PyBuilder):
    def __init__(self, inner, spent: dict):
        super().__init__()
        self.inner, self.spent = inner, spent

    def build(self, build_inputs):
        with adding_seconds(self.spent, "build_s"):
            return self.inner.build(build_inputs)

    def start_workers(self):  # ours: before the first round (measure.WarmBuilder)
        if hasattr(self.inner, "start_workers"):
            self.inner.start_workers()


@derived_object
class TimedRunner(ms.runner.PyRunner):
    def __init__(self, inner, spent: dict):
        super().__init__()
        self.inner, self.spent = inner, spent

    def run(self, runner_inputs):
        with adding_seconds(self.spent, "run_s"):  # both runners return finished futures
            return self.inner.run(runner_inputs)

    def take_late(self, wait=False):  # ours: deferred candidates (measure.WarmRunner)
        with adding_seconds(self.spent, "run_s"):
            return self.inner.take_late(wait) if hasattr(self.inner, "take_late") else []


def seconds_at(trials: list[dict]) -> list[float]:
    """Search seconds when each trial was recorded, across the invocations of a resumed run."""
    out, offset, current, longest = [], 0.0, None, 0.0
    for t in trials:
        if t["started"] != current:  # the next invocation: the earlier ones' time comes first
            offset, current, longest = offset + longest, t["started"], 0.0
        longest = max(longest, t["elapsed_s"])
        out.append(round(offset + t["elapsed_s"], 3))
    return out


def _best(latencies, n=None):
    return min((t for t in latencies[:n] if t is not None), default=None)


def report(rows: list[dict]) -> None:
    first = rows[0]
    print(f"task {first['task']} of {first['workload']} ({first['size']}) on {first['device']}, "
          f"budget {first['budget']} trials, {first['cores']} build cores per arm")
    common = min(len(r["latencies_us"]) for r in rows)
    rate = [60 * common / r["seconds_at"][common - 1] for r in rows]
    label = [f"{r['arm']} seed {r['seed']}" + (" (deadline)" if r["stopped_by_deadline"] else "") for r in rows]
    print(table(["builder/runner", "trials", "time", "search / build / run", "trials/min", "best",
                 f"first {common}: time", "trials/min", "best", "capped", "errors"],
                [[name, len(r["latencies_us"]), f"{r['wall_s']:.0f} s",
                  f"{r['search_s']:.0f} / {r['build_s']:.0f} / {r['run_s']:.0f} s",
                  f"{60 * len(r['latencies_us']) / r['wall_s']:.1f}", fmt_us(_best(r["latencies_us"])),
                  f"{r['seconds_at'][common - 1]:.0f} s", f"{rt:.1f}", fmt_us(_best(r["latencies_us"], common)),
                  r["capped"], r["errors"]] for name, r, rt in zip(label, rows, rate)]))
    for name, r in zip(label, rows):
        for kind, n in r.get("error_kinds", {}).items():
            print(f"{name}: {n} x {kind}")
    stock = [rt for r, rt in zip(rows, rate) if r["arm"] == "stock"]
    for name, r, rt in zip(label, rows, rate):
        if r["arm"] != "stock" and len(stock) == 1:
            print(f"throughput ratio, {name} / stock, at {common} trials each: {rt / stock[0]:.2f}x")


ARMS = ["stock", "schedsearch"]

if __name__ == "__main__":
    main()
