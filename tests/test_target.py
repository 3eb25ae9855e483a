"""CPU targets compile for this CPU (its -mcpu), not for baseline x86-64; `--target "llvm -mcpu=..."`."""
import json
import platform
import re

import pytest
import tvm
from tvm import te
from tvm.target import codegen

from schedsearch import export, target as targets
from schedsearch.errors import UserError

X86 = platform.machine() in ("x86_64", "AMD64")


def _cpu_flags() -> set[str]:
    try:
        return set(next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def _fma_kernel_asm(target) -> str:
    a, b, c = (te.placeholder((1024,), "float32", name=n) for n in "abc")
    d = te.compute((1024,), lambda i: a[i] * b[i] + c[i], name="d")
    sch = tvm.s_tir.Schedule(te.create_prim_func([a, b, c, d]))
    (i,) = sch.get_loops(sch.get_sblock("d"))
    sch.vectorize(sch.split(i, [None, 16])[1])
    return tvm.compile(sch.mod, target=target).mod.inspect_source("asm")


@pytest.mark.skipif(not X86 or not {"avx2", "fma"} <= _cpu_flags(), reason="needs an x86-64 CPU with AVX2 and FMA")
def test_llvm_target_uses_this_cpus_vector_units():
    """Before: `resolve("llvm")` set no -mcpu and a vectorised a*b+c compiled to SSE mulps/addps on
    xmm registers (the 2-core Xeon box: 4 mulps, 4 addps, no vfmadd); now it is FMA on ymm/zmm."""
    target = targets.resolve("llvm")
    assert target.attrs["mcpu"] == codegen.llvm_get_system_cpu()
    assert int(target.attrs["num-cores"]) >= 1
    asm = _fma_kernel_asm(target)
    assert re.search(r"vfmadd\w*ps\s+.*%[yz]mm", asm), asm[:2000]
    baseline = _fma_kernel_asm(tvm.target.Target({"kind": "llvm"}))
    assert "vfmadd" not in baseline  # what the old target gave: the check above means something
    assert targets.facts(target)["mcpu"] == codegen.llvm_get_system_cpu()


def test_llvm_target_options():
    t = targets.resolve("llvm -mcpu=znver3 -mattr=-avx512f -num-cores=3")
    assert (t.attrs["mcpu"], list(t.attrs["mattr"]), int(t.attrs["num-cores"])) == ("znver3", ["-avx512f"], 3)
    if X86:
        assert "%ymm" in _fma_kernel_asm(t) and "vfmadd" in _fma_kernel_asm(t)
    for bad, why in [("llvm -mcpu=pentium9", "knows no CPU 'pentium9'"), ("llvm -O3", "bad target option '-O3'"),
                     ("llvm -mattr=avx2", "each feature is"), ("llvm -num-cores=two", "bad -num-cores"),
                     ("tpu", "unknown target")]:
        with pytest.raises(UserError, match=why):
            targets.resolve(bad)


@pytest.mark.skipif(not X86, reason="x86 feature names")
def test_load_refuses_a_module_for_a_cpu_with_more_features(tmp_path):
    """A module compiled for a CPU with vector instructions this one lacks would die of SIGILL."""
    extra = next((f for f, flag in targets._ISA_FLAGS.items() if flag not in _cpu_flags()), None)
    if extra is None:
        pytest.skip("this CPU has every vector ISA feature checked")
    other = targets.resolve(f"llvm -mcpu=sapphirerapids -mattr=+{extra}")
    manifest = {"target_kind": "llvm", "arch": platform.machine(), "target": str(other),
                "device": {"mcpu": "sapphirerapids"}, "workload": {"file": "w.py", "size": "small"}}
    with pytest.raises(UserError, match=rf"compiled for sapphirerapids, which has .*{extra}.*this CPU does not"):
        export._check_device(tmp_path, manifest)
    export._check_device(tmp_path, {**manifest, "target": str(targets.resolve("llvm"))})  # this CPU: fine
    assert json.loads(str(other))["mcpu"] == "sapphirerapids"


@pytest.mark.parametrize("name, arch", [("llvm", None), ("cuda", "sm_90a"), ("h200", None)])
def test_each_target_kind_is_one_entry_whose_device_is_tvms(name, arch):
    """What the code outside target.py asks of a kind comes from its KINDS entry, and the entry's device is
    the one TVM derives from the target (the runner's device type), and one PyTorch names the same."""
    import torch

    from schedsearch import measure, shared_memory

    target = targets.resolve(name, arch)
    kind = targets.kind(target)
    assert kind is targets.KINDS[target.kind.name]
    assert measure.device_type(target) == kind.device == str(targets.device(target)).split(":")[0]
    assert torch.device(kind.device).type == targets.torch_device(target) == kind.device
    assert targets.is_gpu(target) == kind.gpu == (name != "llvm")
    assert (shared_memory.limit(target) is not None) == kind.shared_memory
    assert measure.evaluator_config(target).min_repeat_ms == (10 if kind.gpu else 0)
    with pytest.raises(UserError, match="target kind 'rocm': schedsearch knows cuda, llvm"):
        targets.kind("rocm")
