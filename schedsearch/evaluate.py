"""Validate and time a compiled module against the workload's PyTorch program, the same way for both."""
from __future__ import annotations

import torch

from . import timing, validate
from .runtime import CompiledModule
from .workload import Workload


def torch_settings() -> None:
    # A TF32 result compared with an fp32 one is not a comparison: PyTorch runs true fp32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def evaluate(workload: Workload, module: CompiledModule, seeds: int = 3, repeats: int = 20) -> dict:
    torch_settings()
    checks = validate.validate(workload, lambda xs: module(*xs), module.device, seeds=seeds)
    return {"validation": validate.summary(checks), "checks": [c.as_dict() for c in checks],
            "timing": time_against_eager(workload, module, repeats)}


def time_against_eager(workload: Workload, module: CompiledModule, repeats: int = 20) -> dict:
    """TVM and PyTorch eager on the same inputs, timed the same way."""
    torch_settings()
    device = module.device
    inputs = validate.make_inputs(workload, 0, "normal", device)
    tvm_stats = timing.time_call(lambda: module(*inputs), device, repeats=repeats)
    out = {"tvm": tvm_stats, "method": timing.METHOD}
    if workload.model is not None:
        model = workload.model.to(device)
        with torch.no_grad():
            eager = timing.time_call(lambda: model(*inputs), device, repeats=repeats)
        out["torch_eager"] = eager
        out["speedup_vs_eager"] = eager["median_us"] / tvm_stats["median_us"]
    return out
