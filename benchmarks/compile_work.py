"""How much compiling a run's candidates takes: every candidate in a run's database, rebuilt for the H100
(CUDA source, no GPU needed) and compiled one at a time with nvcc. Two searches of the same task can
propose kernels of very different compile cost (explicit unrolling makes sources of 1M+ characters),
and a search's trials per minute follow.

    python benchmarks/compile_work.py RUN_DIR/database [RUN_DIR/database ...] [--jobs 2]
"""
import argparse
import re
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import Schedule
from tvm.support.nvcc import compile_cuda

from sample_validity import H100


def source_of(record) -> tuple[str, int]:
    sch = Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    unroll = max(map(int, re.findall(r'"pragma_auto_unroll_max_step": (\d+)', sch.mod.script())), default=0)
    target = tvm.target.Target(H100, host={"kind": "llvm"})
    with target:
        return tvm.build(sch.mod, target=target).imports[0].inspect_source(), unroll


def nvcc_seconds(source: str) -> float:
    start = time.perf_counter()
    with tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}):  # the callback's flags for this arch
        compile_cuda(source, target_format="fatbin", arch=["-gencode", "arch=compute_90a,code=sm_90a"],
                     compiler="nvcc")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("databases", nargs="+")
    p.add_argument("--jobs", type=int, default=1, help="compiles at once (each is timed on its own)")
    args = p.parse_args()
    print("database | candidates | unroll >= 512 | median source | compile sum | median | slowest | over 10 s")
    for path in args.databases:
        records = ms.database.JSONDatabase(work_dir=path).get_all_tuning_records()
        built = [source_of(r) for r in records]
        with ProcessPoolExecutor(args.jobs) as pool:
            seconds = sorted(pool.map(nvcc_seconds, [s for s, _ in built]))
        chars = statistics.median(len(s) for s, _ in built)
        print(f"{path} | {len(built)} | {sum(u >= 512 for _, u in built)} | {chars / 1e3:.1f}k chars | "
              f"{sum(seconds):.0f} s | {statistics.median(seconds):.2f} s | {seconds[-1]:.1f} s | "
              f"{sum(t > 10 for t in seconds)}")


if __name__ == "__main__":
    main()
