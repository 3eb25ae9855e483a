"""How many schedules sampled from a task's MetaSchedule design spaces survive the CUDA postprocessors,
and why the rest do not. Runs without a GPU: sampling, postprocessing and the GPU-code check are
compile-time. The evolutionary search samples its initial population the same way.

    python benchmarks/sample_validity.py workloads/level1/conv2d.py [-n 600] [--seed 1] [--task 0]
"""
import argparse
import collections
import random
import re
import statistics
import tempfile
from pathlib import Path

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.schedule import Schedule, Trace

from schedsearch import frontend, workload

# The H100's limits, as schedsearch.target.resolve reads them from the device.
H100 = {"kind": "cuda", "arch": "sm_90a", "max_threads_per_block": 1024, "max_num_threads": 1024,
        "max_shared_memory_per_block": 49152, "thread_warp_size": 32, "registers_per_block": 65536,
        "l2_cache_size_bytes": 52428800}


def verifier_messages(mod, target) -> list[str]:
    """Lower as the VerifyGPUCode postproc does (src/s_tir/meta_schedule/postproc/verify_gpu_code.cc),
    then run the checking pass, which says why; the postproc only says no."""
    s, x = s_tir.transform, tirx.transform
    passes = [s.LowerCrossThreadReduction(), s.LowerInitBlock(), s.PlanAndUpdateBufferAllocationLocation(),
              s.ConvertBlocksToOpaque(), s.LiftThreadBinding(), s.ManifestSharedMemoryLocalStage(),
              s.CompactBufferAllocation(), x.StmtSimplify(), s.LowerAutoCopy(), s.UnifyThreadBinding(),
              s.LowerMatchBuffer(), s.InjectSoftwarePipeline(), s.LowerOpaqueBlock(), x.FlattenBuffer(),
              x.BF16ComputeLegalize(), x.NarrowDataType(32), x.StmtSimplify(), x.VectorizeLoop(True),
              s.InjectVirtualThread(), s.InjectDoubleBuffer(), x.StorageRewrite(),
              s.MergeSharedMemoryAllocations(), x.LowerIntrin()]
    func = mod["main"].with_attr("global_symbol", "main").with_attr("target", target)
    try:
        lowered = tvm.transform.Sequential(passes)(tvm.IRModule({"main": func}))
    except Exception as e:
        return ["lowering fails: " + str(e).strip().splitlines()[-1][:160]]
    limits = {"max_shared_memory_per_block": target.attrs["max_shared_memory_per_block"],
              "max_threads_per_block": 1024, "max_vthread": 8, "max_vector_bytes": 16}
    try:
        tvm.get_global_func("s_tir.transform.VerifyGPUCode")(limits)(lowered)
    except Exception as e:
        return [l.strip() for l in str(e).splitlines() if l.strip().startswith("Used")] or [str(e)[:160]]
    threads = re.findall(r'T\.int64\((\d+)\), thread="threadIdx\.x"', mod.script())
    return [f"threadIdx.x extent {threads[0] if threads else 1} outside [32, 1024]"]  # the postproc's own check


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload")
    p.add_argument("--size", default="default")
    p.add_argument("--task", type=int, default=0, help="index of the task (heaviest first)")
    p.add_argument("-n", type=int, default=600, help="schedules to sample")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    import tvm.s_tir.tensor_intrin  # noqa: F401  the CUDA rules need it

    target = tvm.target.Target(H100, host={"kind": "llvm"})
    wl = workload.load(args.workload, args.size)
    onnx = Path(tempfile.mkdtemp()) / "model.onnx"
    task = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, onnx), wl.shapes()), target)[args.task]
    ctx = ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply", task_name=task.name,
                         num_threads=1, rand_state=args.seed)
    spaces, postprocs = ctx.generate_design_space(), list(ctx.space_generator.postprocs)
    rng = random.Random(args.seed)
    first_failure, reasons, smem = collections.Counter(), collections.Counter(), []
    passed = 0
    for _ in range(args.n):  # a design space's trace with its decisions dropped, replayed: a fresh sample
        sch = Schedule(task.mod, seed=rng.randrange(1 << 30), debug_mask=0)
        Trace(rng.choice(spaces).trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
        sch.enter_postproc()
        failed = next((post for post in postprocs if not post.apply(sch)), None)
        if failed is None:
            passed += 1
            continue
        first_failure[type(failed).__name__] += 1
        if type(failed).__name__ == "VerifyGPUCode":
            for msg in verifier_messages(sch.mod, target):
                reasons[re.sub(r"\d+", "N", msg)] += 1
                if m := re.match(r"Used shared memory per block \((\d+)\)", msg):
                    smem.append(int(m.group(1)))
    print(f"task {task.name} of {wl.name} ({wl.size}), {len(spaces)} design spaces, target {H100['arch']}, "
          f"seed {args.seed}: {passed} of {args.n} samples pass every postprocessor")
    print("first postprocessor to refuse:", dict(first_failure))
    for msg, n in reasons.most_common():
        print(f"  {n:5d}  {msg}")
    if smem:
        print(f"shared memory asked for (bytes): min {min(smem)}, median {statistics.median(smem):.0f}, max {max(smem)}")


if __name__ == "__main__":
    main()
