"""Pick the TVM target and describe the device (for prompts, rooflines and reports)."""
from __future__ import annotations

import os
import platform
import re

import tvm
from tvm.target import Target

from .errors import UserError


def cuda_visible() -> bool:
    try:
        return bool(tvm.cuda(0).exist)
    except Exception:  # no libcuda on this machine
        return False


def cuda_arch() -> str:
    major, minor = tvm.cuda(0).compute_version.split(".")
    # sm_90a unlocks Hopper-only instructions; "a" variants exist for 9.0 and 10.x.
    return f"sm_{major}{minor}" + ("a" if int(major) >= 9 else "")


def resolve(name: str | None = None) -> Target:
    """`None`/"auto": CUDA if a GPU is visible, else LLVM for this CPU."""
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if cuda_visible() else "llvm"
    if name == "llvm":
        return Target({"kind": "llvm", "num-cores": os.cpu_count() or 1})
    if name == "cuda":
        if not cuda_visible():
            raise UserError("--target cuda, but no CUDA GPU is visible on this machine")
        dev = tvm.cuda(0)
        return Target({
            "kind": "cuda", "arch": cuda_arch(),
            "max_threads_per_block": dev.max_threads_per_block,
            "max_num_threads": dev.max_threads_per_block,
            "max_shared_memory_per_block": dev.max_shared_memory_per_block,
            "thread_warp_size": dev.warp_size,
            "registers_per_block": 65536,
            "l2_cache_size_bytes": dev.l2_cache_size_bytes,
        }, host={"kind": "llvm"})
    raise UserError(f"unknown target {name!r}: use llvm, cuda or auto")


def is_gpu(target: Target) -> bool:
    return target.kind.name == "cuda"


def device(target: Target) -> tvm.runtime.Device:
    return tvm.cuda(0) if is_gpu(target) else tvm.cpu(0)


def torch_device(target: Target) -> str:
    return "cuda" if is_gpu(target) else "cpu"


def device_slug(name: str) -> str:
    """A device's directory name (schedules/, cost_models/, docs/reports/): "NVIDIA H100 80GB HBM3" ->
    "nvidia-h100", "NVIDIA H200" -> "nvidia-h200". Only the memory's size and kind are dropped; the rest
    names another product ("NVIDIA H100 PCIe" -> "nvidia-h100-pcie": other clocks, other SM count)."""
    words = re.findall(r"[a-z0-9]+", name.lower().replace("(r)", "").replace("(tm)", ""))
    kept = [w for w in words if not re.fullmatch(r"\d+gb|hbm\d*e?|gddr\d*x?", w)]
    return "-".join(kept) or "unknown"


def device_name(target: Target) -> str:
    """The device `target` runs on here, by name: the GPU's, or this CPU's model."""
    return facts(target)["name"]


def facts(target: Target) -> dict:
    """What a person (or a model) needs to know about the hardware behind `target`."""
    if is_gpu(target):
        dev = tvm.cuda(0)
        return {"kind": "cuda", "name": dev.device_name, "arch": str(target.arch),
                "sms": dev.multi_processor_count, "warp_size": dev.warp_size,
                "max_threads_per_block": dev.max_threads_per_block,
                "shared_memory_per_block": dev.max_shared_memory_per_block,
                "registers_per_block": 65536, "l2_bytes": dev.l2_cache_size_bytes,
                "total_memory_bytes": dev.total_global_memory}
    return {"kind": "llvm", "name": _cpu_name(), "cores": os.cpu_count(),
            "machine": platform.machine()}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
