"""Pick the TVM target, describe the device (for prompts, rooflines and reports), and what differs by target kind
(KINDS: device, runner timeouts, shared memory, prompt notes), which the rest of the package asks instead of the kind's name."""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

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


# What tvm.cuda(0) reported on these GPUs (the device facts in schedules/nvidia-h100/*/results.json and
# schedules/nvidia-h200/*/results.json). A tune for one of them from a machine without it (`--target h200`)
# takes its facts from here: the prompt, the target's limits, and the roofline (peaks.PEAKS, by name).
GPUS = {
    "h100": {"kind": "cuda", "name": "NVIDIA H100 80GB HBM3", "arch": "sm_90a", "sms": 132, "warp_size": 32,
             "max_threads_per_block": 1024, "shared_memory_per_block": 49152, "registers_per_block": 65536,
             "l2_bytes": 52428800, "total_memory_bytes": 85017493504},
    "h200": {"kind": "cuda", "name": "NVIDIA H200", "arch": "sm_90a", "sms": 132, "warp_size": 32,
             "max_threads_per_block": 1024, "shared_memory_per_block": 49152, "registers_per_block": 65536,
             "l2_bytes": 62914560, "total_memory_bytes": 150109880320},
}
# The limits every CUDA GPU since sm_70 shares (static shared memory per block: 48 KiB), for `--target cuda
# --arch sm_XX` without that GPU here.
_ANY_CUDA_GPU = {"warp_size": 32, "max_threads_per_block": 1024, "shared_memory_per_block": 49152,
                 "registers_per_block": 65536}


def resolve(name: str | None = None, arch: str | None = None) -> Target:
    """`None`/"auto": CUDA if a GPU is visible, else LLVM for this CPU.
    "llvm" compiles for the host CPU (its -mcpu); "llvm -mcpu=X [-mattr=+a,-b] [-num-cores=N]" for another.
    "cuda": the GPU here (`arch` overrides its sm_XX), or, with no GPU here, the GPU that `arch` names;
    "h100", "h200": that GPU, here or not (GPUS). A CUDA target without its GPU here is built for with nvcc
    (prepare_build) and measured elsewhere (--runner rpc://)."""
    name = (name or "auto").strip()
    if name.lower() == "auto":
        name = "cuda" if cuda_visible() or arch else "llvm"
    if name.split(None, 1)[0].lower() == "llvm":
        if arch:
            raise UserError(f"--arch {arch} is for CUDA targets, not {name!r}")
        return llvm(name)
    name = name.lower()
    if arch is not None and not re.fullmatch(r"sm_\d{2,3}[a-z]?", arch):
        raise UserError(f"--arch {arch!r}: expected sm_XX, e.g. sm_90a (H100, H200) or sm_80 (A100)")
    if name in GPUS:
        known = GPUS[name]
        if arch and arch != known["arch"]:
            raise UserError(f"--target {name} is {known['arch']}, not {arch}: for another arch use --target cuda --arch {arch}")
        return _cuda_target(known, model=known["name"])
    if name == "cuda":
        if cuda_visible():
            return _cuda_target(_device_facts(arch))
        if not arch:
            raise UserError("--target cuda, but no CUDA GPU is visible on this machine: name the GPU to build for "
                            f"(--arch sm_90a, or --target {'|'.join(GPUS)}) and measure on it with --runner rpc://HOST:PORT/KEY")
        return _cuda_target({"arch": arch, **_ANY_CUDA_GPU})
    raise UserError(f"unknown target {name!r}: use llvm, cuda, {', '.join(GPUS)} or auto")


def _cuda_target(f: dict, model: str | None = None) -> Target:
    """`model`: the GPU's name, for a target made for that GPU wherever it is (GPUS); none for the GPU here."""
    config = {"kind": "cuda", "arch": f["arch"], "max_threads_per_block": f["max_threads_per_block"],
              "max_num_threads": f["max_threads_per_block"], "max_shared_memory_per_block": f["shared_memory_per_block"],
              "thread_warp_size": f["warp_size"], "registers_per_block": f["registers_per_block"]}
    if f.get("l2_bytes"):
        config["l2_cache_size_bytes"] = f["l2_bytes"]
    if model:
        config["model"] = model
    return Target(config, host={"kind": "llvm"})


def _device_facts(arch: str | None = None) -> dict:
    """The GPU here, as tvm.cuda(0) reports it; `arch` for another sm_XX than its own."""
    dev = tvm.cuda(0)
    return {"kind": "cuda", "name": dev.device_name, "arch": arch or cuda_arch(),
            "sms": dev.multi_processor_count, "warp_size": dev.warp_size,
            "max_threads_per_block": dev.max_threads_per_block,
            "shared_memory_per_block": dev.max_shared_memory_per_block,
            "registers_per_block": 65536, "l2_bytes": dev.l2_cache_size_bytes,
            "total_memory_bytes": dev.total_global_memory}


def _known_gpu(target: Target) -> dict | None:
    """The GPUS entry `target` was made for (its model), if any."""
    model = target.attrs.get("model")
    return next((f for f in GPUS.values() if f["name"] == str(model)), None) if model else None


def gpu_here(target: Target) -> bool:
    """Whether the GPU a CUDA target is for is on this machine: one is visible, and it is the target's model
    where the target names one (--target h200)."""
    model = target.attrs.get("model")
    return cuda_visible() and (not model or tvm.cuda(0).device_name == str(model))


def prepare_build(target: Target) -> None:
    """Before building for `target`: a CUDA target whose GPU is not here needs prepare_cross_compile."""
    if is_gpu(target) and not gpu_here(target):
        prepare_cross_compile()


def prepare_cross_compile() -> None:
    """Makes TVM build real CUDA modules (a fatbin of the arch's machine code) on a machine without a GPU.

    TVM 0.27 compiles CUDA at build time only when its CUDA runtime library (libtvm_runtime_cuda.so) loads,
    and that needs the driver's libcuda.so.1; without it a CUDA module holds only source, compiled when
    loaded on the GPU. So: nvcc (PATH, CUDA_PATH/CUDA_HOME, or the nvidia-cuda-nvcc wheel; TVM calls it by
    name), TVM_CUDA_COMPILE_MODE=nvcc unless set, and a driver stub whose
    every call fails (CUDA_ERROR_STUB_LIBRARY, as the toolkit's own stub) when no libcuda.so.1 is installed.
    Build workers started afterwards inherit all of it (PATH, LD_LIBRARY_PATH)."""
    import ctypes
    import shutil

    import tvm_ffi

    nvcc = _find_nvcc()
    if nvcc is None:
        raise UserError("a CUDA target without its GPU here is compiled with nvcc, which is not installed: "
                        "pip install 'nvidia-cuda-nvcc>=13,<14' (or put a CUDA toolkit's bin/ on PATH)")
    if shutil.which("nvcc") is None:
        os.environ["PATH"] = os.pathsep.join([str(nvcc.parent), os.environ.get("PATH", "")])
        os.environ.setdefault("CUDA_PATH", str(nvcc.parent.parent))  # TVM's find_cuda_path: libdevice, version
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")  # TVM's default, NVRTC, needs more wheels
    import tvm.support.nvcc  # noqa: F401  registers tvm_callback_cuda_compile

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        return
    runtime = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    toolkit_libs = [nvcc.parent.parent / "lib", nvcc.parent.parent / "lib64"]  # a wheel's libcudart.so.13
    loaded: list[Path] = []  # what the runtime lacked, loaded first; the build workers' loader finds it too
    while True:
        try:
            ctypes.CDLL(str(runtime), mode=ctypes.RTLD_GLOBAL)
            break
        except OSError as e:
            if "libcuda.so.1" in str(e):
                lib = _driver_stub(runtime)
            else:
                lib = next((p for d in toolkit_libs if d.is_dir() for p in sorted(d.glob("libcudart.so.*"))), None)
                lib = lib if lib is not None and "libcudart.so" in str(e) else None
            if lib is None or lib in loaded:
                raise UserError(f"cannot load TVM's CUDA runtime {runtime} to build CUDA here: {e}") from None
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            loaded.append(lib)
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(p.parent) for p in loaded] + [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p])
    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is None:
        raise UserError(f"loaded {runtime}, but TVM still has no CUDA module support: cannot build CUDA here")


def _find_nvcc() -> Path | None:
    import shutil

    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").is_file():
            return Path(os.environ[var]) / "bin" / "nvcc"
    if shutil.which("nvcc"):
        return Path(shutil.which("nvcc"))
    try:
        import nvidia  # the nvidia-cuda-nvcc wheel: nvidia/cu13/bin (CUDA 13), nvidia/cuda_nvcc/bin (-cu12)
    except ImportError:
        return None
    for root in map(Path, nvidia.__path__):
        for candidate in sorted(root.glob("*/bin/nvcc"), reverse=True):
            return candidate
    return None


def _driver_stub(runtime: Path) -> Path:
    """A libcuda.so.1 with the driver functions `runtime` calls, each failing with CUDA_ERROR_STUB_LIBRARY (34):
    enough to load TVM's CUDA runtime and build, never to run. Made once per TVM library, with nm and cc."""
    import hashlib
    import subprocess
    import tempfile

    key = hashlib.sha256(f"{runtime}:{runtime.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "schedsearch" / f"cuda-stub-{key}"
    stub = cache / "libcuda.so.1"
    if stub.is_file():
        return stub
    try:
        nm = subprocess.run(["nm", "-D", "--undefined-only", str(runtime)], capture_output=True, text=True, check=True)
        symbols = sorted({line.split()[-1].split("@")[0] for line in nm.stdout.splitlines()
                          if re.fullmatch(r"cu[A-Z]\w*(@.*)?", line.split()[-1])})
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            source = Path(tmp) / "stub.c"
            source.write_text("".join(f"int {s}(void) {{ return 34; }}\n" for s in symbols))
            subprocess.run(["cc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", f"{tmp}/libcuda.so.1",
                            str(source)], capture_output=True, text=True, check=True)
            os.replace(f"{tmp}/libcuda.so.1", stub)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        raise UserError(f"no libcuda.so.1 here, and making a stub of it to build CUDA failed (needs nm and cc): "
                        f"{str(detail).strip()[:300]}") from None
    return stub


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


@dataclass(frozen=True)
class Kind:
    """What differs between the target kinds schedsearch tunes for, as the code outside this module asks it:
    a new kind is one entry in KINDS (and its case in resolve and facts)."""
    name: str  # TVM's target kind
    gpu: bool  # kernels bind blockIdx/threadIdx; measure.WarmRunner runs candidates while others build
    device: str  # its device 0, by the name TVM, TVM's RPC and PyTorch give it
    run_timeout_s: int  # one candidate's run: measure.WarmRunner, and an RPC session (rpc.make_rpc_runner)
    min_repeat_ms: int  # each of a trial's timed repeats lasts at least this long (measure.evaluator_config)
    shared_memory: bool  # --shared-memory and shared_memory.py (48 KB static, dynamic shared memory past it) apply
    annotations: str  # the meta_schedule.* annotations TVM's post-processors act on here (the LLM's prompt)
    tensor_intrinsics: tuple[str, ...] | None  # families of TVM's tensor intrinsics; None: the host CPU's


KINDS = {k.name: k for k in (
    Kind("cuda", gpu=True, device="cuda", run_timeout_s=10, min_repeat_ms=10, shared_memory=True,
         annotations='root block: "meta_schedule.unroll_explicit" = max unroll steps; cache_read block: '
                     '"meta_schedule.cooperative_fetch" = vector lanes',
         tensor_intrinsics=("cuda", "dot_product_common")),
    Kind("llvm", gpu=False, device="cpu", run_timeout_s=30, min_repeat_ms=0, shared_memory=False,
         annotations='root block: "meta_schedule.parallel" = max parallel extent, "meta_schedule.vectorize" = max '
                     'vector width, "meta_schedule.unroll_explicit" = max unroll steps',
         tensor_intrinsics=None),
)}


def kind(target: Target | str) -> Kind:
    """The KINDS entry of `target` (or of a kind's name, as results and manifests record it)."""
    name = target if isinstance(target, str) else target.kind.name
    if name not in KINDS:
        raise UserError(f"target kind {name!r}: schedsearch knows {', '.join(KINDS)}")
    return KINDS[name]


def is_gpu(target: Target) -> bool:
    return kind(target).gpu


def device(target: Target) -> tvm.runtime.Device:
    return tvm.runtime.device(kind(target).device, 0)


def torch_device(target: Target) -> str:
    return kind(target).device


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
    """What a person (or a model) needs to know about the hardware behind `target`: the GPU here, or, for a
    GPU elsewhere, its GPUS entry (or the target's own limits for a bare --arch)."""
    if is_gpu(target):
        a = target.attrs
        if gpu_here(target):  # the limit searched with (--shared-memory), not the 48 KB the device reports
            return {**_device_facts(str(target.arch)), "shared_memory_per_block": int(a["max_shared_memory_per_block"])}
        known = _known_gpu(target)
        return {**known, "shared_memory_per_block": int(a["max_shared_memory_per_block"])} if known else {
            "kind": "cuda", "name": f"CUDA {target.arch} GPU", "arch": str(target.arch),
            "warp_size": int(a["thread_warp_size"]), "max_threads_per_block": int(a["max_threads_per_block"]),
            "shared_memory_per_block": int(a["max_shared_memory_per_block"]),
            "registers_per_block": int(a["registers_per_block"])}
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
