"""Seconds the XGBoost cost model takes to learn from a round and to rank candidates, by its thread
count, with some of the cores kept busy (as deferred builds and the runner keep them during a search).
Needs no GPU: the records come from a tuning database (e.g. a run's `database/`), in the order the run
committed them, 64 to an update as the search's rounds hand them over.

    python benchmarks/cost_model_threads.py RUN/database [--threads 16,4,1] [--busy 0,2,15] [--rounds 4]
"""
import argparse
import os
import subprocess
import time

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import Schedule

from compile_work import scheduled
from replay_candidates import records_in_run_order
from sample_validity import H100


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("database")
    p.add_argument("--threads", default="16,4,1", help="XGBoost thread counts to try")
    p.add_argument("--busy", default="0,2,15", help="how many of this process's cores to keep busy")
    p.add_argument("--rounds", type=int, default=4, help="updates of 64 records each")
    args = p.parse_args()
    records = [r for r in records_in_run_order(args.database) if r.run_secs][:64 * args.rounds]
    cores = sorted(os.sched_getaffinity(0))
    target = tvm.target.Target(H100, host={"kind": "llvm"})
    ctx = ms.TuneContext(mod=records[0].workload.mod, target=target, num_threads=len(cores))
    candidates, results = [], []
    for r in records:
        mod = scheduled(r)
        candidates.append(ms.MeasureCandidate(Schedule(mod), ms.arg_info.ArgInfo.from_entry_func(mod, True)))
        results.append(ms.runner.RunnerResult([float(s) for s in r.run_secs], None))
    print(f"{len(candidates)} records of {args.database}, {len(cores)} cores; update = one round of 64 records "
          "(the first also warms up the process)")
    predictions = {}
    for busy in map(int, args.busy.split(",")):
        hogs = [subprocess.Popen(["taskset", "-c", str(cores[-1 - i % len(cores)]), "sh", "-c", "while :; do :; done"])
                for i in range(busy)]
        try:
            for threads in map(int, args.threads.split(",")):
                model = ms.cost_model.XGBModel(adaptive_training=True, num_tuning_cores=threads)
                updates = []
                for i in range(0, len(candidates), 64):
                    t0 = time.perf_counter()
                    model.update(ctx, candidates[i:i + 64], results[i:i + 64])
                    updates.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                predictions[busy, threads] = model.predict(ctx, candidates)
                predict_s = time.perf_counter() - t0
                print(f"busy cores {busy:2d}, XGBoost threads {threads:2d}: updates "
                      + " ".join(f"{u:.2f}" for u in updates) + f" s; ranking {len(candidates)}: {predict_s:.2f} s")
        finally:
            for hog in hogs:
                hog.kill()
    first = next(iter(predictions.values()))
    print("largest difference between the predictions of any two thread counts:",
          max(float(np.max(np.abs(first - other))) for other in predictions.values()))


if __name__ == "__main__":
    main()
