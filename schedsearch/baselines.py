"""PyTorch's baselines for `schedsearch compare`: eager and torch.compile (default, max-autotune; TF32 off), timed
on validation's seed-0 inputs the way TVM's module is timed (timing.time_call), into OUT/<workload>/baselines.json."""
from __future__ import annotations

import json
from pathlib import Path

COMPILE_MODES = {"compile": "default", "compile-max-autotune": "max-autotune"}


def same_baselines(path: Path, workload, target, compile_baselines: bool) -> bool:
    """Whether `path` holds the baselines of this workload (its file and size) on this target, every one asked for."""
    if not path.is_file():
        return False
    old = json.loads(path.read_text())
    wanted = {"eager", *(COMPILE_MODES if compile_baselines else ())}
    return (old["workload"] == {"sha256": workload.sha256, "size": workload.size} and old["target"] == str(target)
            and wanted <= set(old["baselines"]))


def time_baselines(workload, target, repeats: int, compile_baselines: bool = True) -> dict:
    """PyTorch eager and torch.compile (default, max-autotune) on validation's seed-0 inputs, with the
    timing method TVM's module gets in evaluate(); also the bytes the workload must move at least once."""
    import torch

    from . import target as targets, timing, validate
    from .evaluate import torch_settings

    torch_settings()
    device = targets.torch_device(target)
    inputs = validate.make_inputs(workload, 0, "normal", device)
    refs = workload.reference(inputs)
    model = workload.model.to(device) if workload.model is not None else None
    weights = 0 if model is None else sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    out = {"workload": {"sha256": workload.sha256, "size": workload.size}, "target": str(target),
           "device": targets.facts(target), "method": timing.METHOD,
           "tf32": {"cuda_matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
           "bytes": {"inputs": nbytes(inputs), "outputs": nbytes(refs), "weights": weights},
           "baselines": {}}
    if model is None:
        out["baselines"]["eager"] = {"failed": "an ONNX workload has no PyTorch program"}
        return out
    with torch.no_grad():
        out["baselines"]["eager"] = timing.time_call(lambda: model(*inputs), device, repeats=repeats)
    for name, mode in (COMPILE_MODES.items() if compile_baselines else ()):
        torch._dynamo.reset()  # a module compiled in another mode would be reused from the cache
        try:
            compiled = torch.compile(model, mode=mode)
            with torch.no_grad():
                got = compiled(*inputs)
                check = validate.compare(list(got) if isinstance(got, (tuple, list)) else [got], refs)
                stats = timing.time_call(lambda: compiled(*inputs), device, repeats=repeats)
            out["baselines"][name] = {**stats, "matches_eager": check.passed, "max_abs_vs_eager": check.max_abs}
        except Exception as e:  # no C++ compiler, no Triton, an unsupported op: report, don't stop
            lines = [l for l in str(e).strip().splitlines() if l.strip()]
            out["baselines"][name] = {"failed": f"{type(e).__name__}: {lines[0][:300] if lines else ''}"}
    return out
