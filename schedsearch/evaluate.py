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
    device = module.device
    checks = validate.validate(workload, lambda xs: module(*xs), device, seeds=seeds)
    inputs = validate.make_inputs(workload, 0, "normal", device)
    model = workload.model.to(device) if workload.model is not None else None
    tvm_stats = timing.time_call(lambda: module(*inputs), device, repeats=repeats)
    out = {"validation": validate.summary(checks), "checks": [c.as_dict() for c in checks],
           "timing": {"tvm": tvm_stats, "method": timing.METHOD}}
    if model is not None:
        with torch.no_grad():
            eager = timing.time_call(lambda: model(*inputs), device, repeats=repeats)
        out["timing"]["torch_eager"] = eager
        out["timing"]["speedup_vs_eager"] = eager["median_us"] / tvm_stats["median_us"]
    return out
