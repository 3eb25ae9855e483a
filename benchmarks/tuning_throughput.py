"""Trials per minute: stock MetaSchedule builder/runner vs ours, same task, seed and trial count,
in one process on one machine. The ratio means nothing if the best latency drops, so both print.

    python benchmarks/tuning_throughput.py [--workload workloads/level1/matmul.py] [--size small]
                                           [--trials 64] [--target auto|llvm|cuda] [--deadline S]
                                           [--only stock|schedsearch] [--json OUT.json]

--only runs one arm (e.g. the two arms at once on two GPUs of one host, each with its own share of
the cores: merge with --merge A.json B.json). --deadline S: an arm starts no new round after S seconds
and reports the trials it finished; the table then also compares each arm's best at the trial count
both reached.
"""
import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from tvm.s_tir import meta_schedule as ms

from schedsearch import frontend, measure, target as targets, workload
from schedsearch.report import fmt_us, table
from schedsearch.rundir import RunDir
from schedsearch.tune import search


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
    p.add_argument("--merge", nargs="+", metavar="JSON", help="print the table of arms measured by earlier --json runs")
    args = p.parse_args()
    if args.merge:
        return report([row for path in args.merge for row in json.loads(Path(path).read_text())])
    import tvm.s_tir.tensor_intrin  # noqa: F401  TuneContext imports it once a process: not in an arm's time

    target = targets.resolve(args.target)
    wl = workload.load(args.workload, args.size)
    tmp = Path(tempfile.mkdtemp(prefix="throughput-"))
    mod = frontend.import_onnx(frontend.export_onnx(wl, tmp / "model.onnx"), wl.shapes())
    task = frontend.extract_tasks(mod, target)[0]  # the heaviest kernel
    cores = len(os.sched_getaffinity(0))  # both arms build on the same share of the cores
    make = {
        "stock": lambda: (ms.builder.LocalBuilder(max_workers=cores), ms.runner.LocalRunner()),
        "schedsearch": lambda: (measure.make_builder(), None),  # None: search() makes its capping runner
    }
    rows = []
    for name in [args.only] if args.only else ARMS:
        run = RunDir(tmp / name).create()
        builder, runner = make[name]()
        t0 = time.time()
        deadline = t0 + (args.deadline or float("inf"))
        search([task], target, run, "ansor", lambda t: "evolutionary", args.trials, args.seed, runner=runner,
               builder=builder, stop=lambda: time.time() > deadline)
        wall = time.time() - t0
        trials = run.read_trials()
        rows.append({"arm": name, "task": task.name, "workload": wl.name, "size": wl.size,
                     "device": targets.facts(target)["name"], "seed": args.seed, "budget": args.trials,
                     "stopped_by_deadline": len(trials) < args.trials and time.time() > deadline,
                     "wall_s": round(wall, 1), "cores": cores,
                     "latencies_us": [t["latency_us"] for t in trials],
                     "capped": sum(bool(t.get("capped")) for t in trials),
                     "errors": sum(t["error"] is not None for t in trials),
                     "error_kinds": dict(Counter(t["error"][:120] for t in trials if t["error"]).most_common(5))})
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    report(rows)


def _best(latencies, n=None):
    return min((t for t in latencies[:n] if t is not None), default=None)


def report(rows: list[dict]) -> None:
    first = rows[0]
    print(f"task {first['task']} of {first['workload']} ({first['size']}) on {first['device']}, "
          f"budget {first['budget']} trials, seed {first['seed']}, {first['cores']} build cores per arm")
    common = min(len(r["latencies_us"]) for r in rows)
    print(table(["builder/runner", "trials", "wall", "trials/min", "best", f"best of first {common}", "capped",
                 "errors"],
                [[r["arm"] + (" (deadline)" if r["stopped_by_deadline"] else ""), len(r["latencies_us"]),
                  f"{r['wall_s']:.0f} s", f"{60 * len(r['latencies_us']) / r['wall_s']:.1f}",
                  fmt_us(_best(r["latencies_us"])), fmt_us(_best(r["latencies_us"], common)), r["capped"],
                  r["errors"]] for r in rows]))
    for r in rows:
        for kind, n in r.get("error_kinds", {}).items():
            print(f"{r['arm']}: {n} x {kind}")
    rate = {r["arm"]: len(r["latencies_us"]) / r["wall_s"] for r in rows}
    if set(rate) == set(ARMS):
        print(f"throughput ratio: {rate['schedsearch'] / rate['stock']:.2f}x")


ARMS = ["stock", "schedsearch"]

if __name__ == "__main__":
    main()
