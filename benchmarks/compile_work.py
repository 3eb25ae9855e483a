"""How much compiling a run's candidates takes: every candidate in a run's database, rebuilt for the H100
(CUDA source, no GPU needed) and compiled one at a time with nvcc. Two searches of the same task can
propose kernels of very different compile cost (explicit unrolling makes sources of 1M+ characters),
and a search's trials per minute follow.

    python benchmarks/compile_work.py RUN_DIR/database [RUN_DIR/database ...] [--jobs 2]
"""
import argparse
import functools
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import Schedule

from cuda_compile import compile_one
from sample_validity import H100
from schedsearch import measure


def scheduled(record) -> tvm.IRModule:
    """The candidate a tuning record stands for, as the tuner built it."""
    sch = Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    return sch.mod


def source_of(record) -> tuple[str, int]:
    mod = scheduled(record)
    unroll = measure.unroll_step(mod)
    target = tvm.target.Target(H100, host={"kind": "llvm"})
    with target:
        return tvm.build(mod, target=target).imports[0].inspect_source(), unroll


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("databases", nargs="+")
    p.add_argument("--jobs", type=int, default=1, help="compiles at once (each is timed on its own)")
    args = p.parse_args()
    print("database | candidates | distinct sources | unroll >= 512 | median source | TVM to source, sum | compile sum"
          " | median | slowest | over 10 s | failed")
    for path in args.databases:
        records = ms.database.JSONDatabase(work_dir=path).get_all_tuning_records()
        start = time.perf_counter()
        built = [source_of(r) for r in records]
        tvm_s = time.perf_counter() - start  # the schedule applied and lowered to CUDA source, one at a time
        with ProcessPoolExecutor(args.jobs) as pool:
            compiled = list(pool.map(functools.partial(compile_one, mode="nvcc", arch=H100["arch"]), [s for s, _ in built]))
        seconds = sorted(t for t, _ in compiled)
        chars = statistics.median(len(s) for s, _ in built)
        print(f"{path} | {len(built)} | {len({s for s, _ in built})} | {sum(u >= 512 for _, u in built)} | "
              f"{chars / 1e3:.1f}k chars | {tvm_s:.0f} s | {sum(seconds):.0f} s | {statistics.median(seconds):.2f} s | "
              f"{seconds[-1]:.1f} s | {sum(t > 10 for t in seconds)} | {sum(e is not None for _, e in compiled)}")


if __name__ == "__main__":
    main()
