"""Stock MetaSchedule's builder/runner vs ours on the same kernels: the candidates of an earlier run
(its database), built and measured in rounds of 64 by each, with no search. A whole search's trials
per minute also depend on the kernels it happens to propose (their compile cost varies 100x); this
compares the builder and runner alone.

    python benchmarks/replay_candidates.py RUN_DIR/database [--target auto|llvm|cuda] [--only stock|schedsearch]
                                           [--no-defer] [--limit N] [--json OUT.json]

Candidates go in the order the run measured them, so the rounds hold what the search's rounds held.
"""
import argparse
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

from tvm.s_tir import meta_schedule as ms

from compile_work import scheduled
from schedsearch import measure, result_codes, target as targets
from schedsearch.report import fmt_us, table

ROUND = 64


def records_in_run_order(database: str) -> list:
    """The database's records in the order they were committed (get_all_tuning_records sorts by latency)."""
    db = Path(database)
    workloads = [ms.database.Workload.from_json(json.loads(line))
                 for line in (db / "database_workload.json").read_text().splitlines() if line.strip()]
    return [ms.database.TuningRecord.from_json(rec, workloads[i])
            for i, rec in (json.loads(line) for line in (db / "database_tuning_record.json").read_text().splitlines()
                           if line.strip())]


def replay(arm: str, records, target, cores: int, defer: bool) -> dict:
    if arm == "stock":
        builder, runner = ms.builder.LocalBuilder(max_workers=cores), ms.runner.LocalRunner()
    else:
        builder, runner = measure.make_builder_and_runner(target, defer_stragglers=defer)
    device_type = measure.device_type(target)
    best_file = Path(tempfile.mkdtemp()) / "best_s.txt"
    measure.share_best_file(best_file)  # read by our runner's workers when they start
    os.environ["CUDA_CACHE_PATH"] = str(best_file.parent / "cuda-cache")  # compile every kernel afresh
    build_s = run_s = 0.0
    results, deferred = [], 0
    for start in range(0, len(records), ROUND):
        mods = [scheduled(r) for r in records[start:start + ROUND]]
        t0 = time.time()
        built = builder.build([ms.builder.BuilderInput(m, target) for m in mods])
        t1 = time.time()
        deferred += sum(result_codes.deferred_token(b.error_msg) is not None for b in built)
        results += [ms.runner.RunnerResult(None, b.error_msg) for b in built
                    if b.error_msg is not None and result_codes.deferred_token(b.error_msg) is None]
        inputs = [ms.runner.RunnerInput(b.artifact_path, device_type, ms.arg_info.ArgInfo.from_entry_func(m, True))
                  for b, m in zip(built, mods) if b.error_msg is None]
        ran = [f.result() for f in runner.run(inputs)]
        t2 = time.time()
        deferred += sum(result_codes.deferred_token(r.error_msg) is not None for r in ran)
        results += [r for r in ran if result_codes.deferred_token(r.error_msg) is None]
        last = start + ROUND >= len(records)
        results += [r for _, _, r in (runner.take_late(wait=last) if arm != "stock" else [])]
        build_s, run_s = build_s + t1 - t0, run_s + time.time() - t1  # waits for deferred ones count as run
        latencies = [1e6 * sum(map(float, r.run_secs)) / len(r.run_secs) for r in results if r.error_msg is None]
        best = min(latencies, default=None)
        if best is not None:
            best_file.write_text(repr(best * 1e-6))
        print(f"{arm}: {start + len(mods)}/{len(records)} candidates, {build_s + run_s:.0f} s", flush=True)
    assert len(results) == len(records), (len(results), len(records))  # every candidate measured (or failed) once
    return {"arm": arm + ("" if defer or arm == "stock" else " (no deferral)"), "candidates": len(records),
            "build_s": round(build_s, 1), "run_s": round(run_s, 1), "deferred": deferred,
            "errors": sum(r.error_msg is not None for r in results), "best_us": min(latencies, default=None),
            "error_kinds": dict(Counter(str(r.error_msg).strip().splitlines()[0][:120]
                                        for r in results if r.error_msg is not None).most_common(5)),
            "device": targets.facts(target)["name"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("database")
    p.add_argument("--target", default="auto")
    p.add_argument("--only", choices=["stock", "schedsearch"])
    p.add_argument("--limit", type=int, help="the first N candidates only")
    p.add_argument("--no-defer", action="store_true", help="ours: every round waits for its slowest build and run")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    import tvm.s_tir.tensor_intrin  # noqa: F401  stock's builder workers need it; import once, outside the timing

    target = targets.resolve(args.target)
    records = records_in_run_order(args.database)[:args.limit]
    cores = len(os.sched_getaffinity(0))
    rows = [replay(arm, records, target, cores, not args.no_defer)
            for arm in ([args.only] if args.only else ["stock", "schedsearch"])]
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    print(f"{len(records)} candidates of {args.database} on {rows[0]['device']}, {cores} cores, rounds of {ROUND}")
    print(table(["builder/runner", "build", "run", "candidates/min", "best", "errors", "deferred"],
                [[r["arm"], f"{r['build_s']:.0f} s", f"{r['run_s']:.0f} s",
                  f"{60 * r['candidates'] / (r['build_s'] + r['run_s']):.1f}", fmt_us(r["best_us"]), r["errors"],
                  r["deferred"]]
                 for r in rows]))
    for r in rows:
        for kind, n in r["error_kinds"].items():
            print(f"{r['arm']}: {n} x {kind}")


if __name__ == "__main__":
    main()
