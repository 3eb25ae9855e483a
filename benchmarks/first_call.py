"""How much longer a candidate's first call takes than its next ones (its module's load): the margin
measure.run_evaluator_capped allows (LOAD_ALLOWANCE_S) before it records a first call as a hopeless
kernel's time. Builds the candidates of an earlier run (its database) and calls each as the runner does.

    python benchmarks/first_call.py RUN_DIR/database [--target auto|llvm|cuda] [--limit N]
"""
import argparse
import statistics

import tvm
from tvm.s_tir import meta_schedule as ms

from compile_work import scheduled
from replay_candidates import records_in_run_order
from schedsearch import measure, target as targets
from schedsearch.report import table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("database")
    p.add_argument("--target", default="auto")
    p.add_argument("--limit", type=int, default=64)
    args = p.parse_args()
    target = targets.resolve(args.target)
    mods = [scheduled(r) for r in records_in_run_order(args.database)[:args.limit]]
    built = measure.WarmBuilder().build([ms.builder.BuilderInput(m, target) for m in mods])
    device = tvm.runtime.device(measure.device_type(target), 0)
    rows = []
    for mod, b in zip(mods, built):
        if b.error_msg:
            continue
        info = tuple(a.as_json() for a in ms.arg_info.ArgInfo.from_entry_func(mod, True))
        call_args = measure.alloc_args_cached(device, info, 1)[0]
        rt_mod = tvm.runtime.load_module(b.artifact_path)
        try:
            first = measure.one_call_seconds(rt_mod, device, call_args)
            rest = min(measure.one_call_seconds(rt_mod, device, call_args) for _ in range(3))
        except tvm.error.TVMError:  # a launch error: no time to compare
            continue
        rows.append((first, rest))
    extra_ms = sorted(1e3 * (f - r) for f, r in rows)
    print(f"{len(rows)} of {len(mods)} candidates of {args.database} on {targets.facts(target)['name']}: "
          f"first call minus the fastest of the next 3")
    print(table(["median", "p90", "max", "kernel (median of next calls)", "load allowance"],
                [[f"{statistics.median(extra_ms):.2f} ms", f"{extra_ms[int(0.9 * (len(extra_ms) - 1))]:.2f} ms",
                  f"{extra_ms[-1]:.2f} ms", f"{1e3 * statistics.median(r for _, r in rows):.2f} ms",
                  f"{1e3 * measure.LOAD_ALLOWANCE_S:.0f} ms"]]))


if __name__ == "__main__":
    main()
