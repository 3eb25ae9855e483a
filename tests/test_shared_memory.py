"""--shared-memory: the search's limit reaches the target VerifyGPUCode reads, and a kernel over 48 KB of shared
memory is built with dynamic shared memory, in the builder's workers and in the final build (no GPU needed: CUDA
source is generated without one)."""
import os
import subprocess
import sys

import pytest
import tvm
from tvm import relax, te, topi
from tvm.s_tir import meta_schedule as ms

from conftest import ROOT
from schedsearch import frontend, measure, shared_memory, target as targets
from schedsearch.errors import UserError
from schedsearch.tune import import_tensor_intrinsics

# An H100/H200 as target.resolve reads it from the device: 48 KB of shared memory per block.
HOPPER = tvm.target.Target({"kind": "cuda", "arch": "sm_90a", "max_threads_per_block": 1024, "max_num_threads": 1024,
                            "max_shared_memory_per_block": 49152, "thread_warp_size": 32,
                            "registers_per_block": 65536}, host={"kind": "llvm"})
HOPPER_227 = shared_memory.with_limit(HOPPER, 227 << 10)
N = 256


def tiled_matmul(func: tvm.tirx.PrimFunc, tile: int, k_tile: int) -> tvm.s_tir.Schedule:
    """A tile x tile block of an N x N x N matmul, both inputs' tile x k_tile slices cached in shared memory:
    2 * 4 * tile * k_tile bytes (128, 64: 64 KB; 64, 32: 16 KB)."""
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    i, j, k = sch.get_loops(block)
    bi, ti = sch.split(i, [None, tile])
    bj, tj = sch.split(j, [None, tile])
    ko, ki = sch.split(k, [None, k_tile])
    ty, ii = sch.split(ti, [16, None])
    tx, jj = sch.split(tj, [16, None])
    sch.reorder(bi, bj, ty, tx, ko, ki, ii, jj)
    for loop, thread in [(bi, "blockIdx.y"), (bj, "blockIdx.x"), (ty, "threadIdx.y"), (tx, "threadIdx.x")]:
        sch.bind(loop, thread)
    for index in (0, 1):
        cached = sch.cache_read(block, index, "shared")
        sch.compute_at(cached, ko)
        _, t1, t2 = sch.split(sch.fuse(*sch.get_loops(cached)[-2:]), [None, 16, 16])
        sch.bind(t1, "threadIdx.y")
        sch.bind(t2, "threadIdx.x")
    return sch


def te_matmul() -> tvm.tirx.PrimFunc:
    a, b = te.placeholder((N, N), name="A"), te.placeholder((N, N), name="B")
    return te.create_prim_func([a, b, topi.matmul(a, b)])


def shared_declarations(cuda_source: str) -> list[str]:
    return [line.strip() for line in cuda_source.splitlines() if "__shared__" in line]


def test_search_limit_per_strategy():
    assert shared_memory.search_limit("stock", HOPPER, "hybrid") == 49152
    assert shared_memory.search_limit("227", HOPPER, "hybrid") == shared_memory.search_limit("227", HOPPER, "rules") \
        == shared_memory.limit(HOPPER_227) == 232448
    assert shared_memory.search_limit("227", HOPPER, "ansor") == 49152  # the stock arm keeps TVM's limit
    assert str(HOPPER_227.host) == str(HOPPER.host) and HOPPER_227.arch == HOPPER.arch
    for option, why in [("lots", "bad --shared-memory 'lots'"), ("0", "positive number of KB")]:
        for strategy in ("hybrid", "ansor"):  # ansor keeps TVM's limit, and is refused a bad one all the same
            with pytest.raises(UserError, match=why):
                shared_memory.search_limit(option, HOPPER, strategy)
    with pytest.raises(UserError, match="only CUDA targets"):
        shared_memory.search_limit("227", tvm.target.Target({"kind": "llvm"}), "rules")
    assert shared_memory.search_limit("stock", tvm.target.Target({"kind": "llvm"}), "rules") is None


def test_the_prompts_facts_say_the_limit_searched_with():
    h200 = targets.resolve("h200")  # the table's H200, no GPU needed
    assert targets.facts(h200)["shared_memory_per_block"] == 49152
    wide = shared_memory.with_limit(h200, 232448)
    assert targets.facts(wide)["shared_memory_per_block"] == 232448 and targets.facts(wide)["name"] == "NVIDIA H200"


@pytest.mark.skipif(targets._find_nvcc() is None, reason="nvcc is not installed (the test extra has it)")
def test_tune_gives_the_strategy_the_target_it_searches(tmp_path, monkeypatch):
    """The proposers' facts (the LLM's prompt) come from the target the strategy is made with: tune's search
    target, 227 KB under --shared-memory 227, not the device's 48 KB."""
    from schedsearch import strategies, workload
    from schedsearch.options import Tuning
    from schedsearch.rundir import RunDir
    from schedsearch.tune import tune_workload

    made = []

    def make(name, target, **kwargs):
        made.append(target)
        raise KeyboardInterrupt  # stop before the export: the strategy is what this test is about
    monkeypatch.setattr(strategies, "make", make)
    with pytest.raises(KeyboardInterrupt):
        tune_workload(workload.load(ROOT / "workloads/level1/softmax.py", "small"), targets.resolve("h200"),
                      RunDir(tmp_path / "run"), Tuning(strategy="rules", shared_memory="227",
                                                        runner="rpc://127.0.0.1:9/h200"))
    [target] = made
    assert shared_memory.limit(target) == 227 << 10 and targets.facts(target)["shared_memory_per_block"] == 227 << 10


@pytest.mark.parametrize("strategy", ["ansor", "rules"])
@pytest.mark.parametrize("value, message", [
    ("lots", "bad --shared-memory 'lots': use stock | max | KB"),
    ("0", "bad --shared-memory 0: expected a positive number of KB"),
    ("999999", "--shared-memory 999999: only CUDA targets have shared memory (the target is llvm); leave it at stock"),
])
def test_a_bad_shared_memory_is_refused_before_any_work(tmp_path, capsys, strategy, value, message):
    """Whatever the strategy (ansor searches with the stock limit, but a value the target cannot take is refused
    for it too, as compare refuses it for every arm): exit 2, one line, no run dir; a value that is not one
    --shared-memory takes is refused when the options are built, before the workload is even loaded."""
    from schedsearch.cli import main

    out = tmp_path / "run"
    rc = main(["tune", str(ROOT / "workloads/level1/softmax.py"), "--size", "small", "--target", "llvm",
               "--strategy", strategy, "--shared-memory", value, "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert (rc, err[-1]) == (2, f"schedsearch: error: {message}")
    assert len(err) == (2 if value.isdigit() and int(value) > 0 else 1)  # the target's check: after "tuning softmax ..."
    assert not out.exists()


def test_verify_gpu_code_follows_the_searched_limit():
    """VerifyGPUCode, the postprocessor that refused most conv samples, reads the limit from the search's target."""
    import_tensor_intrinsics()  # what TuneContext imports, the quick way (it took 603 s on the busy CPU box)
    sch = tiled_matmul(te_matmul(), 128, 64)  # 64 KB
    for target, passes in [(HOPPER, False), (HOPPER_227, True)]:
        verify = ms.postproc.VerifyGPUCode()
        verify._initialize_with_tune_context(ms.TuneContext(mod=sch.mod, target=target))
        assert verify.apply(sch.copy()) == passes, target


def test_builder_workers_move_kernels_over_48kb_to_dynamic_shared_memory():
    """The search's builder (measure.WarmBuilder: build_kernel in its worker processes) gets each candidate with the
    search's target. Over 48 KB with the larger limit: one `extern __shared__` buffer (TVM's runtime raises the
    kernel's dynamic limit at its first launch); within 48 KB, or at the stock limit, the static arrays it always
    built. Without a GPU the built module holds the CUDA source: in a fresh process, since once a test has set up
    cross-compiling (test_cross_compile) the workers build cubins instead."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_CUDA_COMPILE_MODE", "LD_LIBRARY_PATH")}
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tests'); import test_shared_memory as "
                           "t; t.builder_workers_move_kernels_over_48kb()"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def builder_workers_move_kernels_over_48kb():
    cases = [(HOPPER_227, 128, 64, True), (HOPPER_227, 64, 32, False), (HOPPER, 128, 64, False)]
    builder = measure.WarmBuilder()
    try:
        results = builder.build([ms.builder.BuilderInput(tiled_matmul(te_matmul(), tile, k_tile).mod, target)
                                 for target, tile, k_tile, _ in cases])
    finally:
        builder.close()
    for (target, tile, k_tile, dynamic), result in zip(cases, results):
        assert result.error_msg is None, result.error_msg
        built = open(result.artifact_path, "rb").read()
        assert (b"extern __shared__ __align__(64) uchar buf_dyn_shmem_ptr[];" in built) == dynamic, (tile, k_tile)
        assert (b"__shared__ alignas(64) float A_shared_ptr[" in built) != dynamic, (tile, k_tile)
    measure.remove_candidate_dirs(only_pid=os.getpid())


def test_final_build_uses_dynamic_shared_memory_for_a_record_over_48kb():
    """frontend.compile_module (tune's final build, `schedsearch build`) builds a database record that needs 64 KB
    with dynamic shared memory, whatever limit its target names."""
    bb = relax.BlockBuilder()
    a, b = relax.Var("a", relax.TensorType((N, N), "float32")), relax.Var("b", relax.TensorType((N, N), "float32"))
    with bb.function("main", [a, b]):
        bb.emit_func_output(bb.emit(relax.op.matmul(a, b)))
    mod = bb.get()
    (task,) = frontend.extract_tasks(mod, HOPPER)
    db = ms.database.MemoryDatabase()
    db.commit_tuning_record(ms.database.TuningRecord(
        tiled_matmul(task.mod["main"], 128, 64).trace, db.commit_workload(task.mod), [1e-3], HOPPER_227,
        ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])))
    executable = frontend.compile_module(mod, HOPPER, db)
    modules, sources = [executable.mod], []
    while modules:  # the VM executable imports the host module, which imports the CUDA one
        module = modules.pop()
        modules.extend(module.imports)
        sources += [module.inspect_source()] if module.kind == "cuda" else []
    assert [shared_declarations(s) for s in sources] == [["extern __shared__ __align__(64) uchar buf_dyn_shmem_ptr[];"]]
