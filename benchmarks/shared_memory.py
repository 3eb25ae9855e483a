"""Does more shared memory per block let the search find valid, faster schedules? One task, searched twice with
the same strategy, seed and trials: with the 48 KB the device reports (stock) and with the GPU's opt-in limit
(--shared-memory max: 227 KB on an H100/H200, kernels over 48 KB built with dynamic shared memory).

    python benchmarks/shared_memory.py [--workload workloads/level1/conv2d.py] [--size default] [--trials 64]
                                       [--strategy hybrid|rules|ansor] [--samples 200] [--seed 0]
                                       [--max-kb KB] [--samples-only] [--json OUT.json]

First, for each limit, how many of --samples schedules sampled from the task's design spaces pass every CUDA
postprocessor (VerifyGPUCode among them), as the evolutionary search samples its initial population, and how
many of those need more than 48 KB. Then (on a GPU) the search under each limit: valid trials, errors, best
latency, and whether the best kernel uses more than 48 KB. The default strategy, hybrid without a model (rules
proposals, then MetaSchedule's evolution), is one the option is for; `--strategy ansor` is MetaSchedule's
evolutionary search in both arms (the stock ansor arm is its 48 KB one), which on this conv gave up at 48 KB
("Cannot sample enough initial population": docs/results.md).
Needs a CUDA GPU for the search. --samples-only runs the sampling without one (it is compile-time), for the
H100/H200 limits (48 KB; --max-kb, default 227); there is nothing to compare on a CPU target.
"""
import argparse
import json
import os
import random
import tempfile
from collections import Counter
from pathlib import Path

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import Schedule, Trace

from schedsearch import frontend, shared_memory, strategies, target as targets, workload
from schedsearch.report import fmt_us, table
from schedsearch.rundir import RunDir, open_database
from schedsearch.tune import search

# An H100/H200 as schedsearch.target.resolve reads it from the device, for --samples-only.
HOPPER = {"kind": "cuda", "arch": "sm_90a", "max_threads_per_block": 1024, "max_num_threads": 1024,
          "max_shared_memory_per_block": 49152, "thread_warp_size": 32, "registers_per_block": 65536,
          "l2_cache_size_bytes": 52428800}


def sample_counts(task, target, n: int, seed: int) -> dict:
    """Of `n` fresh samples of the task's design spaces (decisions dropped and drawn again, the same draws for
    every target), how many pass every postprocessor, and how many of those exceed 48 KB of shared memory."""
    ctx = ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply", task_name=task.name,
                         num_threads=1, rand_state=seed)
    spaces, postprocs = ctx.generate_design_space(), list(ctx.space_generator.postprocs)
    rng = random.Random(seed)
    valid, over, refused = 0, 0, Counter()
    for _ in range(n):
        sch = Schedule(task.mod, seed=rng.randrange(1 << 30), debug_mask=0)
        Trace(rng.choice(spaces).trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
        sch.enter_postproc()
        failed = next((post for post in postprocs if not post.apply(sch)), None)
        if failed is not None:
            refused[type(failed).__name__] += 1
            continue
        valid += 1
        over += shared_memory.over_static_limit(sch.mod["main"], target)
    return {"samples": n, "valid": valid, "over_48kb": over, "refused_by": dict(refused)}


def tune(task, target, root: Path, strategy: str, trials: int, seed: int) -> dict:
    run = RunDir(root).create()
    os.environ["CUDA_CACHE_PATH"] = str(run.root / "cuda-cache")  # each arm compiles its own candidates
    if strategy == "ansor":
        factory = lambda t: "evolutionary"  # noqa: E731
    else:
        factory = strategies.make(strategy, run=run, target=target, seed=seed)
    search([task], target, run, strategy, factory, trials, seed,
           cost_model_warmup=getattr(factory, "cost_model_warmup", 100))
    trials_log = run.read_trials()
    latencies = [t["latency_us"] for t in trials_log if t["latency_us"] is not None]
    database = open_database(run.database)
    best = database.get_top_k(database.commit_workload(task.mod), 1)
    best_over = None
    if best:
        sch = Schedule(task.mod)
        best[0].trace.apply_to_schedule(sch, remove_postproc=False)
        best_over = shared_memory.over_static_limit(sch.mod["main"], target)
    return {"trials": len(trials_log), "valid": len(latencies), "best_us": min(latencies, default=None),
            "best_over_48kb": best_over,
            "errors": dict(Counter(t["error"][:100] for t in trials_log if t["error"]).most_common(3))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="workloads/level1/conv2d.py")
    p.add_argument("--size", default="default")
    p.add_argument("--task", type=int, default=0, help="index of the task (heaviest first)")
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--strategy", default="hybrid", choices=["hybrid", "rules", "ansor"])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-kb", type=int, help="the larger limit in KB (default: the GPU's opt-in limit; 227 "
                                              "with --samples-only)")
    p.add_argument("--samples-only", action="store_true", help="sample only, for an H100/H200, without a GPU")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    import tvm.s_tir.tensor_intrin  # noqa: F401  the CUDA rules need it

    if args.samples_only:
        stock = tvm.target.Target(HOPPER, host={"kind": "llvm"})
        big = (args.max_kb or 227) << 10
    else:
        stock = targets.resolve("cuda")  # says so when there is no GPU
        big = args.max_kb << 10 if args.max_kb else shared_memory.device_optin_limit()
    wl = workload.load(args.workload, args.size)
    tmp = Path(tempfile.mkdtemp(prefix="shared-memory-"))
    mod = frontend.import_onnx(frontend.export_onnx(wl, tmp / "model.onnx"), wl.shapes())
    task = frontend.extract_tasks(mod, stock)[args.task]
    rows = []
    for name, target in [("stock", stock), (f"{big >> 10} KB", shared_memory.with_limit(stock, big))]:
        row = {"limit": name, "bytes": shared_memory.limit(target), "task": task.name, "workload": wl.name,
               "size": wl.size, "strategy": args.strategy, "seed": args.seed,
               "sampling": sample_counts(task, target, args.samples, args.seed)}
        if not args.samples_only:
            row["search"] = tune(task, target, tmp / name.replace(" ", ""), args.strategy, args.trials, args.seed)
        rows.append(row)
        print(f"{name}: {json.dumps(row)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(f"task {task.name} of {wl.name} ({wl.size}), {args.strategy}, seed {args.seed}")
    head = ["limit", f"valid of {args.samples} samples", "valid > 48 KB"]
    if not args.samples_only:
        head += ["trials", "valid trials", "best", "best > 48 KB", "errors"]
    print(table(head, [[r["limit"], r["sampling"]["valid"], r["sampling"]["over_48kb"]]
                       + ([r["search"]["trials"], r["search"]["valid"], fmt_us(r["search"]["best_us"]),
                           r["search"]["best_over_48kb"], "; ".join(f"{n} x {e}" for e, n in
                                                                   r["search"]["errors"].items())]
                          if "search" in r else []) for r in rows]))


if __name__ == "__main__":
    main()
