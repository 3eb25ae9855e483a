"""Seconds TVM's CUDA compile step takes per candidate kernel, NVRTC against nvcc, on schedules sampled
from the heaviest task's MetaSchedule design spaces that pass the CUDA postprocessors. Needs no GPU.

    python benchmarks/cuda_compile.py [--workload workloads/level1/matmul.py] [--size 2048] [-n 32] [--seed 0]
        [--workers 16] [--modes nvrtc,nvcc] [--arch sm_90a] [--pool-only] [--json OUT]

nvrtc needs the `cuda-bindings` package and libnvrtc (e.g. the `nvidia-cuda-nvrtc` wheel); it finds the
CUDA headers from CUDA_PATH, else from `which nvcc`/../.. (set CUDA_PATH if that is a wrapper script).
"""
import argparse
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import Schedule, Trace
from tvm.support.nvcc import compile_cuda

from sample_validity import H100
from schedsearch import frontend, workload


def sample_sources(args) -> list[str]:
    """CUDA sources of up to n distinct candidates, sampled as the evolutionary search's initial population."""
    import tvm.s_tir.tensor_intrin  # noqa: F401  the CUDA rules need it
    target = tvm.target.Target({**H100, "arch": args.arch}, host={"kind": "llvm"})
    wl = workload.load(args.workload, args.size)
    onnx = frontend.export_onnx(wl, Path(tempfile.mkdtemp()) / "model.onnx")
    task = frontend.extract_tasks(frontend.import_onnx(onnx, wl.shapes()), target)[0]
    ctx = ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply", task_name=task.name,
                         num_threads=1, rand_state=args.seed)
    spaces, postprocs = ctx.generate_design_space(), list(ctx.space_generator.postprocs)
    rng = random.Random(args.seed)
    sources: dict[str, None] = {}  # ordered set: the search measures a schedule once
    seen_code: list[str] = []
    original = tvm_ffi.get_global_func("tvm_callback_cuda_compile")
    # A TVM built with CUDA compiles the source during the build: record it instead ("//": PTX, never
    # loaded). A TVM without CUDA (this CPU box's wheel) calls no callback and keeps the source.
    tvm_ffi.register_global_func("tvm_callback_cuda_compile",
                                 lambda code, *_: seen_code.append(code) or b"// not compiled\n", override=True)
    try:
        for _ in range(100 * args.n):
            if len(sources) == args.n:
                break
            sch = Schedule(task.mod, seed=rng.randrange(1 << 30), debug_mask=0)
            Trace(rng.choice(spaces).trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
            sch.enter_postproc()
            if all(post.apply(sch) for post in postprocs):
                built = tvm.build(sch.mod, target=target)
                sources[seen_code.pop() if seen_code else built.imports[0].inspect_source()] = None
    finally:
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", original, override=True)
    if not sources:
        raise SystemExit(f"no candidate of {task.name} passed the postprocessors in {100 * args.n} samples")
    print(f"{wl.name} ({wl.size}), task {task.name}: {len(sources)} distinct valid candidates for {args.arch}, "
          f"median source {statistics.median(len(s) for s in sources):.0f} chars")
    return list(sources)


def compile_one(source: str, mode: str, arch: str) -> tuple[float, str | None]:
    """Seconds to compile as tvm_callback_cuda_compile does with TVM_CUDA_COMPILE_MODE=mode, and the error."""
    start = time.perf_counter()
    try:
        # nvcc reads the compute version from the current target even when given the arch.
        with tvm.target.Target({"kind": "cuda", "arch": arch}):
            if mode == "nvrtc":
                compile_cuda(source, target_format="cubin", arch=arch, compiler="nvrtc")
            else:  # the callback's own flags when the target says the arch
                sm = arch.removeprefix("sm_")
                compile_cuda(source, target_format="fatbin", arch=["-gencode", f"arch=compute_{sm},code=sm_{sm}"],
                             compiler="nvcc")
        error = None
    except Exception as e:  # nvcc's message starts with the whole source: keep the first line after it
        text = str(e).split("Compilation error:")[-1]
        error = next((l.strip() for l in text.splitlines() if "error" in l.lower()), text.strip()[:200])
    return time.perf_counter() - start, error


def _hold(barrier) -> None:
    global _barrier
    _barrier = barrier


def warm_up(source: str, mode: str, arch: str) -> None:
    compile_one(source, mode, arch)
    _barrier.wait(timeout=600)  # every worker holds one warm-up job until all have one


def measure(sources: list[str], mode: str, args) -> dict:
    compile_one(sources[0], mode, args.arch)  # warm-up: imports, loading libnvrtc
    serial = [] if args.pool_only else [compile_one(s, mode, args.arch) for s in sources]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context, initializer=_hold,
                             initargs=(context.Barrier(args.workers),)) as pool:
        list(pool.map(warm_up, [sources[0]] * args.workers, [mode] * args.workers, [args.arch] * args.workers))
        start = time.perf_counter()
        pooled = list(pool.map(compile_one, sources, [mode] * len(sources), [args.arch] * len(sources)))
        wall = time.perf_counter() - start
    times = sorted(t for t, _ in serial or pooled)  # --pool-only: each compile's time in the pool
    errors = [e for _, e in serial + pooled if e]
    return {"mode": mode, "candidates": len(sources), "median_s": statistics.median(times),
            "p90_s": times[math.ceil(0.9 * len(times)) - 1], "pool_wall_s": wall, "workers": args.workers,
            "candidates_per_s": len(sources) / wall, "failures": sum(e is not None for _, e in serial),
            "pool_failures": sum(e is not None for _, e in pooled), "first_error": errors[0] if errors else None,
            "serial_s": [t for t, _ in serial], "pool_s": [t for t, _ in pooled], "source_chars": [len(s) for s in sources]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="workloads/level1/matmul.py")
    p.add_argument("--size", default="2048")
    p.add_argument("-n", type=int, default=32, help="candidates to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--modes", default="nvrtc,nvcc", help="comma-separated: nvrtc, nvcc")
    p.add_argument("--arch", default="sm_90a")
    p.add_argument("--pool-only", action="store_true",
                   help="skip the one-at-a-time phase (medians are then of compiles in the busy pool)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if set(args.modes.split(",")) - {"nvrtc", "nvcc"}:
        p.error(f"--modes: nvrtc and/or nvcc, not {args.modes}")
    # NVRTC keeps what it compiled in the driver's cache (across processes): without this the pool would
    # find every source the one-at-a-time phase compiled. The tuner's candidates are new, so time misses.
    os.environ["CUDA_CACHE_DISABLE"] = "1"
    sources = sample_sources(args)
    print(f"nvcc: {shutil.which('nvcc')}, CUDA_PATH: {os.environ.get('CUDA_PATH', 'unset')}; times include "
          f"failed compiles; each mode is warmed up first (one compile in this process, one in each of "
          f"{args.workers} pool workers), so process start and imports are not counted")
    rows = [measure(sources, mode, args) for mode in args.modes.split(",")]
    print(f"{'mode':6} {'median s':>9} {'p90 s':>7} {'pool wall s':>11} {'cand/s':>7}  failures (serial/pool)")
    for r in rows:
        print(f"{r['mode']:6} {r['median_s']:9.3f} {r['p90_s']:7.3f} {r['pool_wall_s']:11.2f} "
              f"{r['candidates_per_s']:7.2f}  {r['failures']}/{r['pool_failures']}"
              + (f"  first: {r['first_error']}" if r["first_error"] else ""))
    for a, b in zip(rows, rows[1:]):
        if a["failures"] + a["pool_failures"] + b["failures"] + b["pool_failures"]:
            print(f"no {b['mode']}/{a['mode']} ratio: some compiles failed")
            continue
        print(f"{b['mode']}/{a['mode']}: {b['median_s'] / a['median_s']:.2f}x the median time per candidate, "
              f"{a['candidates_per_s'] / b['candidates_per_s']:.2f}x the pool's time per candidate")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
