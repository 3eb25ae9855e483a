"""Workload -> ONNX -> Relax -> fused Relax -> tuning tasks (TIR PrimFuncs with weights)."""
from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax
from tvm.relax.frontend.onnx import from_onnx
from tvm.s_tir import meta_schedule as ms

from . import onnx_ops, shared_memory
from .errors import UserError
from .legalize import LEGALIZE_MAP
from .workload import Workload


@dataclass
class Task:
    name: str
    weight: int  # how many times the kernel runs per forward pass
    mod: tvm.IRModule  # the PrimFunc as MetaSchedule sees it (key of the database)
    flops: float


def export_onnx(workload: Workload, path: Path) -> Path:
    """The workload as an ONNX file (ONNX workloads are used as they are)."""
    if workload.onnx_path is not None:
        return workload.onnx_path
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    inputs = tuple(t.detach().cpu() for t in workload.make_inputs())
    # The exporter narrates every step on stdout; keep it for errors only.
    buf = io.StringIO()
    for name in ("torch.onnx", "torch.export", "torch._dynamo"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            workload.reset_state()  # timing or checking it may have run the model: export its first call
            model = workload.model.cpu()
            try:  # torch.onnx's own first capture; ops it cannot export are rewritten in the program
                model = onnx_ops.decompose_program(torch.export.export(model, inputs, strict=False))
            except Exception:
                pass  # torch.onnx tries its other captures on the model, and says what failed
            torch.onnx.export(model, inputs, str(path), dynamo=True, opset_version=18,
                              input_names=workload.input_names, external_data=True)
    except Exception as e:
        raise UserError(f"ONNX export of {workload.name} failed: {root_cause(e)}") from e
    return path


def root_cause(e: BaseException) -> str:
    """The first line of the exception at the bottom of the chain: torch.onnx's own message ends with
    "(Refer to the full stack trace above for more information.)", the cause ("Constant hidden is mutated
    in the forward method. Pls register it as buffer") is the exception it was raised from."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [l.strip() for l in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if l.strip()]
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def import_onnx(onnx_path: Path, shapes: dict[str, list[int]] | None = None) -> tvm.IRModule:
    """ONNX -> Relax with weights bound as constants, so the module takes only the inputs.
    `shapes` fixes dynamic input dimensions (kernels are tuned for one static shape)."""
    import onnx

    model = onnx_ops.decompose(onnx.load(str(onnx_path)))
    try:
        mod = from_onnx(model, shape_dict=shapes, keep_params_in_input=False)
    except tvm.error.OpNotImplemented as e:
        raise UserError(f"{onnx_path.name}: {str(e).strip().splitlines()[-1]}") from e
    except Exception as e:
        ops = sorted({n.op_type for n in model.graph.node})
        raise UserError(f"{onnx_path.name}: TVM's ONNX importer failed ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1][:200]}); ops in the graph: {', '.join(ops)}") from e
    return relax.transform.DecomposeOpsForInference()(mod)


def fuse_passes(target: tvm.target.Target) -> list:
    """Legalize and fuse: the same for task extraction and compilation, so database keys match."""
    return [*relax.pipeline.library_dispatch_passes(target),
            relax.transform.LegalizeOps(customize_legalize_map=LEGALIZE_MAP),
            relax.transform.AnnotateTIROpPattern(), relax.transform.FoldConstant(),
            relax.transform.FuseOps(), relax.transform.FuseTIR()]


def extract_tasks(mod: tvm.IRModule, target: tvm.target.Target) -> list[Task]:
    with target, tvm.transform.PassContext(opt_level=3):
        fused = tvm.transform.Sequential(fuse_passes(target))(mod)
    tasks = []
    for t in ms.relax_integration.extract_tasks(fused, target):
        flops = float(tvm.s_tir.analysis.estimate_tir_flops(t.dispatched[0]))
        tasks.append(Task(str(t.task_name), int(t.weight), t.dispatched[0], flops))
    # Heaviest first: when a budget is cut short the important kernels are tuned.
    return sorted(tasks, key=lambda t: -t.flops * t.weight)


def compile_module(mod: tvm.IRModule, target: tvm.target.Target, database: ms.database.Database | None):
    """Build the Relax module: tuned kernels from `database`, TVM's defaults (dlight on GPU) for the rest.

    Mirrors `ms.relax_integration.compile_relax`, with our legalizations."""
    from tvm.s_tir import dlight as dl

    database = database if database is not None else ms.database.MemoryDatabase()
    is_gpu = relax.pipeline.BackendDispatcher.is_gpu_target(target)

    @tvm.transform.module_pass(opt_level=3)
    def pipeline(mod, _ctx):
        mod = tvm.transform.Sequential(fuse_passes(target))(mod)
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
        if is_gpu:  # kernels without a record: TVM's default GPU schedules
            mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)
            mod = shared_memory.dynamic_where_needed(mod, target)  # records searched with more than 48 KB
        return tvm.transform.Sequential(_lower_passes(target))(mod)

    with target, database, tvm.transform.PassContext(opt_level=3):
        return relax.build(mod, target=target, relax_pipeline=pipeline)


def _lower_passes(target) -> list:
    try:
        return relax.pipeline.dataflow_lower_passes(target) + relax.pipeline.finalize_passes(target)
    except AttributeError:  # TVM 0.27 registers these for GPU backends only; compile_relax's CPU list
        t = relax.transform
        return [t.RewriteDataflowReshape(), t.ToNonDataflow(), t.RemovePurityChecking(), t.CallTIRRewrite(),
                t.StaticPlanBlockMemory(), t.LowerAllocTensor(), t.KillAfterLastUse(), t.LowerRuntimeBuiltin(),
                t.ComputePrimValue(), t.VMShapeLower(), t.AttachGlobalSymbol()]
