"""Tuning for a GPU from a machine without one: CUDA candidates built here with nvcc (CI installs the
nvidia-cuda-nvcc wheel with the test extra), measured elsewhere through --runner rpc://."""
import os
import random
import re
import struct

import pytest

from conftest import ROOT
from schedsearch import peaks, target as targets
from schedsearch.cli import main
from test_rpc import _accepts, _free_port, _wait, cluster  # noqa: F401  (cluster: the fixture)

MATMUL = str(ROOT / "workloads/level1/matmul.py")
FATBIN_MAGIC = struct.pack("<I", 0xBA55ED50)  # a fatbin's header
EM_CUDA = 190  # the ELF machine of a cubin

needs_nvcc = pytest.mark.skipif(targets._find_nvcc() is None,
                                reason="nvcc is not installed: pip install 'nvidia-cuda-nvcc>=13,<14' (the test extra)")


def _cubin_sms(blob: bytes) -> list[int]:
    """The SM (90 for sm_90a) of each cubin, a CUDA ELF image, inside a fatbin or a library that embeds one."""
    return [(struct.unpack_from("<I", blob, m.start() + 48)[0] >> 8) & 0xFF  # e_flags
            for m in re.finditer(rb"\x7fELF\x02\x01\x01", blob)
            if struct.unpack_from("<H", blob, m.start() + 18)[0] == EM_CUDA]


@needs_nvcc
def test_cuda_candidates_of_a_small_matmul_build_here_without_a_gpu(tmp_path):
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.schedule import Schedule, Trace

    from schedsearch import frontend, measure, workload
    from schedsearch.tune import import_tensor_intrinsics

    target = targets.resolve("cuda", "sm_90a")
    targets.prepare_build(target)
    assert target.kind.name == "cuda" and str(target.arch) == "sm_90a"
    import_tensor_intrinsics()  # the CUDA schedule rules use it
    wl = workload.load(MATMUL, "small")
    [task] = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "m.onnx"), wl.shapes()),
                                    target)
    ctx = ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply", task_name=task.name,
                         num_threads=1, rand_state=0)
    spaces, postprocs = ctx.generate_design_space(), list(ctx.space_generator.postprocs)
    rng, candidates = random.Random(0), []
    while len(candidates) < 2:  # sampled as evolution's first population is: a space's trace, fresh decisions
        sch = Schedule(task.mod, seed=rng.randrange(1 << 30), debug_mask=0)
        Trace(rng.choice(spaces).trace.insts, {}).apply_to_schedule(sch, remove_postproc=True)
        sch.enter_postproc()
        if all(post.apply(sch) for post in postprocs):
            candidates.append(ms.builder.BuilderInput(sch.mod, target))

    builder = measure.WarmBuilder()  # the tune's builder, its workers in processes of their own
    try:
        results = builder.build(candidates)
    finally:
        builder.close()
    assert [r.error_msg for r in results] == [None] * 2
    for r in results:
        blob = open(r.artifact_path, "rb").read()
        assert FATBIN_MAGIC in blob, "the candidate holds no compiled CUDA (only source?)"
        assert _cubin_sms(blob) == [90]  # nvcc's sm_90a machine code, what the RPC worker loads and runs
    measure.remove_candidate_dirs(only_pid=os.getpid())


@needs_nvcc
def test_the_whole_module_builds_for_a_gpu_that_is_not_here(tmp_path):
    """What the tune compiles after its search, and `schedsearch build --target h200`: real CUDA too."""
    dist, empty = tmp_path / "dist", tmp_path / "database"  # no records: TVM's default GPU schedules
    empty.mkdir()
    for name in ("database_workload.json", "database_tuning_record.json"):
        (empty / name).write_text("")
    assert main(["build", MATMUL, "--size", "small", "--schedules", str(empty), "--target", "h200", "-o", str(dist)]) == 0
    blob = (dist / "module.so").read_bytes()
    assert FATBIN_MAGIC in blob and set(_cubin_sms(blob)) == {90}


@pytest.mark.skipif(targets.cuda_visible(), reason="a GPU is visible here")
@pytest.mark.parametrize("spec, says", [
    (["--target", "cuda", "--arch", "sm_90a"], "no CUDA sm_90a GPU on this machine"),
    (["--target", "cuda"], "--target cuda, but no CUDA GPU is visible on this machine"),
    (["--target", "h200"], "no NVIDIA H200 on this machine"),
])
def test_a_gpu_target_with_no_gpu_here_and_no_rpc_runner_fails_before_any_work(spec, says, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["tune", MATMUL, "--size", "small", *spec, "--trials", "2", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    [line] = [l for l in err.splitlines() if l.startswith("schedsearch: error:")]
    assert says in line and "--runner rpc://HOST:PORT/KEY" in line
    assert not (out / "model.onnx").exists()  # nothing exported, nothing built


@pytest.mark.skipif(targets.cuda_visible(), reason="a GPU is visible: the facts of a GPU that is here come from it")
def test_named_gpus_take_their_facts_from_the_table_not_the_device():
    for name, facts in targets.GPUS.items():
        t = targets.resolve(name)
        assert targets.facts(t) == facts and int(t.attrs["l2_cache_size_bytes"]) == facts["l2_bytes"]
        assert not targets.gpu_here(t)
        assert peaks.peak_for(facts["name"]) is not None  # the roofline knows it by that name
    bare = targets.facts(targets.resolve("cuda", "sm_80"))
    assert bare["arch"] == "sm_80" and bare["name"] == "CUDA sm_80 GPU"


def test_the_final_validation_and_timing_run_on_a_worker(cluster, tmp_path):
    """What a tune for a GPU that is not here does after its search, on a CPU worker through a tracker on
    127.0.0.1 (the module and the worker's device are llvm's here; for a GPU they are CUDA's)."""
    from tvm.s_tir import meta_schedule as ms

    from schedsearch import frontend, workload
    from schedsearch.evaluate import evaluate_on_worker
    from schedsearch.rpc import WorkerModule, count_workers

    start, _ = cluster
    _, tracker_log = start("tracker", "tracker", "--host", "127.0.0.1", "--port", str(_free_port()))
    _wait(lambda: "tracker listening on" in tracker_log.read_text(), 60, "the tracker's address")
    port = int(re.search(r"tracker listening on 127\.0\.0\.1:(\d+)", tracker_log.read_text())[1])
    _wait(lambda: _accepts(port), 60, "the tracker")
    start("worker", "worker", "--tracker", f"127.0.0.1:{port}", "--key", "gpu", "--host", "127.0.0.1",
          "--port", str(_free_port()))
    _wait(lambda: count_workers(ms.runner.RPCConfig("127.0.0.1", port, "gpu", 10))[0] == 1, 90, "the worker")

    target = targets.resolve("llvm")
    wl = workload.load(MATMUL, "small")
    mod = frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "m.onnx"), wl.shapes())
    frontend.compile_module(mod, target, None).export_library(str(tmp_path / "module.so"))
    measured = evaluate_on_worker(wl, WorkerModule(tmp_path / "module.so", "127.0.0.1", port, "gpu", target),
                                  seeds=1, repeats=3)
    v, tm = measured["validation"], measured["timing"]
    assert v["passed"] and v["checks"] == 4 and v["failed"] == 0
    assert tm["tvm"]["repeats"] == 3 and tm["tvm"]["median_us"] > 0 and "torch_eager" not in tm
    assert tm["method"].startswith("on the RPC worker")
