"""Trials per minute: stock MetaSchedule builder/runner vs ours, same task, seed and trial count,
in one process on one machine. The ratio means nothing if the best latency drops, so both print.

    python benchmarks/tuning_throughput.py [--workload workloads/level1/matmul.py] [--size small]
                                           [--trials 64] [--target auto|llvm|cuda]
"""
import argparse
import tempfile
import time
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
    args = p.parse_args()
    import tvm.s_tir.tensor_intrin  # noqa: F401  TuneContext imports it once a process: not in an arm's time

    target = targets.resolve(args.target)
    wl = workload.load(args.workload, args.size)
    tmp = Path(tempfile.mkdtemp(prefix="throughput-"))
    mod = frontend.import_onnx(frontend.export_onnx(wl, tmp / "model.onnx"), wl.shapes())
    task = frontend.extract_tasks(mod, target)[0]  # the heaviest kernel
    arms = {
        "stock MetaSchedule": lambda run: (ms.builder.LocalBuilder(), ms.runner.LocalRunner()),
        "schedsearch": lambda run: (measure.make_builder(), None),  # None: search() makes its capping runner
    }
    rows, rates = [], {}
    for name, make in arms.items():
        run = RunDir(tmp / name.replace(" ", "_")).create()
        builder, runner = make(run)
        t0 = time.time()
        trials = search([task], target, run, "ansor", lambda t: ms.search_strategy.EvolutionarySearch(),
                        args.trials, args.seed, runner=runner, builder=builder)[task.name]
        minutes = (time.time() - t0) / 60
        best = min((t["latency_us"] for t in trials if t["latency_us"] is not None), default=None)
        rates[name] = len(trials) / minutes
        rows.append([name, len(trials), f"{minutes * 60:.0f} s", f"{rates[name]:.1f}", fmt_us(best),
                     sum(bool(t.get("capped")) for t in trials), sum(t["error"] is not None for t in trials)])
    print(f"task {task.name} of {wl.name} ({wl.size}) on {targets.facts(target)['name']}, "
          f"{args.trials} trials, seed {args.seed}")
    print(table(["builder/runner", "trials", "wall", "trials/min", "best", "capped", "errors"], rows))
    print(f"throughput ratio: {rates['schedsearch'] / rates['stock MetaSchedule']:.2f}x")


if __name__ == "__main__":
    main()
