"""Shared memory per block beyond the 48 KB every CUDA target reports (Hopper: 227 KB), for the arms other than ansor.

What it takes in TVM 0.27 (checked in its source and by building here):
- The search: VerifyGPUCode refuses a schedule whose shared memory exceeds the target's
  `max_shared_memory_per_block`; target.resolve reads it from the device (cudaDevAttrMaxSharedMemoryPerBlock:
  48 KB on an H100/H200, where the opt-in limit is 227 KB).
- The build: a `__shared__` array is limited to 48 KB (ptxas of CUDA 13.0 refuses a 64 KB one for sm_80, sm_86,
  sm_90 and sm_100 with "uses too much shared data (0x10000 bytes, 0xc000 max)"; for sm_90a it lets it
  through, but the documented way past 48 KB is dynamic shared memory). TVM emits dynamic shared memory for
  buffers in "shared.dyn" scope: MergeSharedMemoryAllocations puts them in one `extern __shared__` buffer and its
  CUDA runtime calls cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) at the first launch of
  a kernel that asks for 48 KB or more (src/backend/cuda/runtime/cuda_module.cc). The pass config
  `tirx.merge_static_smem` does not help: it merges static buffers into one static buffer (64 KB of them became
  `__shared__ uchar buf_shmem_ptr[65536]`).
MetaSchedule's CUDA sketches and the schedule language cache into "shared", so a kernel over 48 KB is built
with its shared buffers moved to "shared.dyn" (`dynamic_where_needed`, in the builder's workers and in the final
build); a kernel within 48 KB is built exactly as before.
"""
from __future__ import annotations

import tvm
from tvm.target import Target

from .errors import UserError
from .options import Tuning, parse_shared_memory
from .target import cuda_visible, kind

STATIC_LIMIT = 48 << 10  # bytes of `__shared__` arrays per block, on every NVIDIA GPU since Volta


def limit(target: Target) -> int | None:
    """The shared memory per block the search allows on `target` (None for CPU targets)."""
    value = target.attrs.get("max_shared_memory_per_block") if kind(target).shared_memory else None
    return None if value is None else int(value)


def with_limit(target: Target, nbytes: int) -> Target:
    """`target`, searching with `nbytes` of shared memory per block."""
    config = dict(target.export())
    config["max_shared_memory_per_block"] = nbytes
    return Target(config)


def search_limit(option: str, target: Target, strategy: str) -> int | None:
    """Bytes of shared memory per block `strategy` searches with, from --shared-memory `option`:
    stock: what the device reports (48 KB; the ansor arm always, as TVM ships it); max: the device's opt-in
    limit (227 KB on an H100/H200); KB: that many KB. None for CPU targets. A value the target cannot take
    is refused whatever the strategy, as compare refuses it for every arm."""
    option = (option or Tuning.shared_memory).strip().lower()
    kb = parse_shared_memory(option)
    stock = limit(target)
    if kb == "stock":
        return stock
    if stock is None:
        raise UserError(f"--shared-memory {option}: only CUDA targets have shared memory (the target is "
                        f"{target.kind.name}); leave it at stock")
    most = device_optin_limit() if kb == "max" or cuda_visible() else None
    if kb != "max" and most is not None and kb << 10 > most:
        raise UserError(f"--shared-memory {kb}: this GPU allows at most {most >> 10} KB per block")
    if strategy == "ansor":
        return stock
    return most if kb == "max" else kb << 10


def device_optin_limit() -> int:
    """The most shared memory a block of GPU 0 may have when its kernel opts in: 227 KB on sm_90
    (cudaDevAttrMaxSharedMemoryPerBlockOptin, which TVM does not read; PyTorch does)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("--shared-memory max reads the GPU's opt-in limit, and no CUDA GPU is visible to "
                        "PyTorch here: give it in KB (227 on an H100/H200)")
    try:
        return int(torch.cuda.get_device_properties(0).shared_memory_per_block_optin)
    except AttributeError:  # a PyTorch older than the property
        raise UserError(f"--shared-memory max: PyTorch {torch.__version__} does not read the GPU's opt-in limit: "
                        "give it in KB (227 on an H100/H200)") from None


# The VerifyGPUCode postproc's own lowering (src/s_tir/meta_schedule/postproc/verify_gpu_code.cc), so the
# shared memory counted here is the one the search allowed.
def _verify_passes() -> list:
    from tvm import s_tir, tirx

    s, x = s_tir.transform, tirx.transform
    return [s.LowerCrossThreadReduction(), s.LowerInitBlock(), s.PlanAndUpdateBufferAllocationLocation(),
            s.ConvertBlocksToOpaque(), s.LiftThreadBinding(), s.ManifestSharedMemoryLocalStage(),
            s.CompactBufferAllocation(), x.StmtSimplify(), s.LowerAutoCopy(), s.UnifyThreadBinding(),
            s.LowerMatchBuffer(), s.InjectSoftwarePipeline(), s.LowerOpaqueBlock(), x.FlattenBuffer(),
            x.BF16ComputeLegalize(), x.NarrowDataType(32), x.StmtSimplify(), x.VectorizeLoop(True),
            s.InjectVirtualThread(), s.InjectDoubleBuffer(), x.StorageRewrite(), s.MergeSharedMemoryAllocations(),
            x.LowerIntrin()]


def over_static_limit(func: tvm.tirx.PrimFunc, target: Target) -> bool:
    """Whether a kernel of the scheduled `func` has more static shared memory than a `__shared__` array may."""
    from tvm import s_tir

    func = func.with_attr("global_symbol", "main").with_attr("target", target)
    lowered = tvm.transform.Sequential(_verify_passes())(tvm.IRModule({"main": func}))
    return not s_tir.analysis.verify_gpu_code(lowered["main"], {"max_shared_memory_per_block": STATIC_LIMIT})


def to_dynamic(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """`func` with every buffer in "shared" scope moved to "shared.dyn" (the schedule primitive set_scope)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    todo = sch.get_child_blocks(sch.get_sblock("root"))
    while todo:
        block = todo.pop()
        todo.extend(sch.get_child_blocks(block))
        for i, write in enumerate(sch.get(block).writes):
            if write.source.scope() == "shared":
                sch.set_scope(block, i, "shared.dyn")
    return sch.mod["main"]


def dynamic_where_needed(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """`mod` with the PrimFuncs whose static shared memory exceeds 48 KB moved to dynamic shared memory.
    A function this cannot lower is left as it is: the build says what is wrong with it."""
    if not kind(target).shared_memory:
        return mod
    changed = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        try:
            if over_static_limit(func, target):
                changed[gvar] = to_dynamic(func)
        except Exception:  # TVM raises TVMError, InternalError, ScheduleError...
            continue
    if not changed:
        return mod
    return tvm.IRModule({**dict(mod.functions), **changed}, attrs=mod.attrs, global_infos=mod.global_infos)
