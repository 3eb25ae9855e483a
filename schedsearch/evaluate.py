"""Validate and time a compiled module against the workload's PyTorch program, the same way for both."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import timing, validate
from .workload import Workload

if TYPE_CHECKING:  # not imported here: the eager-timing process must not load TVM
    from .runtime import CompiledModule


def torch_settings() -> None:
    # A TF32 result compared with an fp32 one is not a comparison: PyTorch runs true fp32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def evaluate(workload: Workload, module: CompiledModule, seeds: int, repeats: int) -> dict:
    torch_settings()
    checks = validate.validate(workload, lambda xs: module(*xs), module.device, seeds=seeds)
    return {"validation": validate.summary(checks), "checks": [c.as_dict() for c in checks],
            "timing": time_against_eager(workload, module, repeats)}


def evaluate_on_worker(workload: Workload, module, seeds: int, repeats: int) -> dict:
    """evaluate() for a module run on an RPC worker (rpc.WorkerModule): the same validation, its references
    computed here by PyTorch on the CPU; TVM timed on the worker by TVM's evaluator. The worker runs no
    PyTorch, so eager is not timed: `schedsearch run DIST --check` on that GPU's host times both."""
    torch_settings()
    checks = validate.validate(workload, lambda xs: module(*xs), module.device, seeds=seeds)
    inputs = validate.make_inputs(workload, 0, "normal", module.device)
    return {"validation": validate.summary(checks), "checks": [c.as_dict() for c in checks],
            "timing": {"tvm": module.time(inputs, repeats), "method": WORKER_METHOD}}


WORKER_METHOD = ("on the RPC worker: TVM's time_evaluator, median of single calls after one warm-up, no cache flush; "
                 "PyTorch eager not timed (the worker runs no PyTorch)")


def time_against_eager(workload: Workload, module: CompiledModule, repeats: int) -> dict:
    """TVM and PyTorch eager on the same inputs, timed the same way (eager in a process of its own)."""
    torch_settings()
    device = module.device
    inputs = validate.make_inputs(workload, 0, "normal", device)
    tvm_stats = timing.time_call(lambda: module(*inputs), device, repeats=repeats)
    out = {"tvm": tvm_stats, "method": timing.METHOD}
    if workload.model is not None:
        eager = time_eager_in_fresh_process(workload, device, repeats)
        out["torch_eager"] = eager
        out["speedup_vs_eager"] = eager["median_us"] / tvm_stats["median_us"]
    return out


# PyTorch eager is timed in a fresh process that never loads TVM: in the process that has just run the TVM
# module, TVM's thread pool disturbs it. The small softmax (8x256) on the 2-core CPU box: 4,806 us there,
# 628 us in a fresh process, the same timing.time_call (issue 22).
EAGER_PROCESS = ("import json, sys; from schedsearch.evaluate import time_eager; "
                 "print(json.dumps(time_eager(*json.loads(sys.argv[1]))))")


def time_eager_in_fresh_process(workload: Workload, device: str, repeats: int) -> dict:
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    args = json.dumps([str(workload.path), workload.size, device, repeats])
    p = subprocess.run([sys.executable, "-c", EAGER_PROCESS, args], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines()
        raise RuntimeError(f"timing PyTorch eager in a process of its own failed: {lines[-1] if lines else p.returncode}")
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "process": "its own, without TVM"}


def time_eager(path: str, size: str, device: str, repeats: int) -> dict:
    """PyTorch eager on validation's seed-0 inputs, in this process (the one time_eager_in_fresh_process starts)."""
    from . import workload as workloads

    torch_settings()
    workload = workloads.load(path, size)
    inputs = validate.make_inputs(workload, 0, "normal", device)
    model = workload.model.to(device)
    with torch.no_grad():
        return timing.time_call(lambda: model(*inputs), device, repeats=repeats)
