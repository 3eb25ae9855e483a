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
    """`None`/"auto": CUDA if a GPU is visible, else LLVM for this CPU.
    "llvm" compiles for the host CPU (its -mcpu); "llvm -mcpu=X [-mattr=+a,-b] [-num-cores=N]" for another."""
    name = (name or "auto").strip()
    if name.lower() == "auto":
        name = "cuda" if cuda_visible() else "llvm"
    if name.split(None, 1)[0].lower() == "llvm":
        return llvm(name)
    name = name.lower()
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


# LLVM feature -> /proc/cpuinfo flag, for the vector ISAs TVM's CPU code uses.
_ISA_FLAGS = {"avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f",
              "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl", "avx512cd": "avx512cd",
              "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512fp16": "avx512_fp16",
              "avxvnni": "avx_vnni"}


def llvm(spec: str = "llvm") -> Target:
    """An LLVM target for the host CPU, or as `spec` ("llvm -mcpu=znver3 -mattr=-avx512f -num-cores=8") says.

    Without -mcpu LLVM emits baseline x86-64 (SSE2: no AVX2, no FMA) whatever the machine; on the
    2-core Xeon (icelake-server) box the README's softmax job then gets no 256/512-bit vectors.
    The host's CPU is LLVM's own name for it; features the kernel does not report (a VM that hides
    AVX-512 from a CPU model that has it) are turned off, so the code never faults on this machine."""
    from tvm.target import codegen

    words = spec.split()
    if not words or words[0].lower() != "llvm":
        raise UserError(f"bad target {spec!r}: expected llvm [-mcpu=CPU] [-mattr=+F,-G] [-num-cores=N]")
    opts: dict[str, str] = {}
    for word in words[1:]:
        key, eq, value = word.lstrip("-").partition("=")
        if not word.startswith("-") or not eq or not value or key not in ("mcpu", "mattr", "num-cores", "mtriple"):
            raise UserError(f"bad target option {word!r} in {spec!r}: use -mcpu=CPU, -mattr=+F,-G, "
                            "-num-cores=N or -mtriple=TRIPLE")
        opts[key] = value
    triple = opts.get("mtriple") or codegen.llvm_get_system_triple()
    host = "mcpu" not in opts
    mcpu = opts.get("mcpu") or codegen.llvm_get_system_cpu()
    if not codegen.llvm_is_valid_cpu(mcpu, triple):
        raise UserError(f"--target {spec!r}: LLVM {codegen.llvm_version_major()} knows no CPU {mcpu!r} for {triple} "
                        f"(this machine is {codegen.llvm_get_system_cpu()!r})")
    mattr = [a for a in opts.get("mattr", "").split(",") if a]
    if any(a[:1] not in "+-" for a in mattr):
        raise UserError(f"bad -mattr in {spec!r}: each feature is +NAME or -NAME, comma separated")
    if host and "mtriple" not in opts:
        mattr += [f"-{f}" for f in _hidden_features(mcpu) if f"+{f}" not in mattr]
    try:
        cores = int(opts.get("num-cores", os.cpu_count() or 1))
    except ValueError:
        raise UserError(f"bad -num-cores in {spec!r}: expected an integer") from None
    config = {"kind": "llvm", "mcpu": mcpu, "num-cores": cores}
    if mattr:
        config["mattr"] = mattr
    if "mtriple" in opts:
        config["mtriple"] = opts["mtriple"]
    return Target(config)


def cpu_features(target: Target) -> set[str]:
    """The LLVM features `target` compiles for (its -mcpu's, with its -mattr applied)."""
    from tvm.target import codegen

    return set(codegen.llvm_get_cpu_features(target))


def _hidden_features(mcpu: str) -> list[str]:
    """Vector ISA features `mcpu` implies that /proc/cpuinfo does not list (none where it is unreadable)."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), None)
    except OSError:
        flags = None
    if flags is None:
        return []
    implied = cpu_features(Target({"kind": "llvm", "mcpu": mcpu}))
    return sorted(f for f, flag in _ISA_FLAGS.items() if f in implied and flag not in flags)


def missing_cpu_features(target: Target) -> list[str]:
    """Vector ISA features a CPU module compiled for `target` uses that this machine lacks."""
    have = cpu_features(llvm("llvm"))
    return sorted(f for f in _ISA_FLAGS if f in cpu_features(target) and f not in have)


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
            "machine": platform.machine(), "mcpu": str(target.attrs.get("mcpu", "")),
            "mattr": [str(a) for a in target.attrs.get("mattr", [])]}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
