"""Databases load and build record by record without TVM's JSONDatabase loader (records.py), and
`build` refuses, in one line, records it cannot use."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from conftest import ROOT
from schedsearch import export, frontend, records, target as targets, workload
from schedsearch.errors import UserError

H200_LAYERNORM = ROOT / "tests/data/h200-layernorm/database"
LAYERNORM = str(ROOT / "workloads/level1/layernorm.py")
SOFTMAX = str(ROOT / "workloads/level1/softmax.py")


def h200_target() -> Target:
    """The H200's target as its records hold it (arch sm_90a, 1024 threads, 48 KiB shared, ...)."""
    line = json.loads(H200_LAYERNORM.joinpath("database_tuning_record.json").read_text().splitlines()[0])
    config = dict(line[1][2])
    return Target(config, host=config.pop("host"))


def test_h200_layernorm_database_builds_every_record():
    """The database `build` aborted on (heap corruption on the H200): every record loads, and each
    one's schedule, applied to the task the way MetaScheduleApplyDatabase does, compiles to CUDA."""
    database = records.load(H200_LAYERNORM)
    all_records = database.get_all_tuning_records()
    assert len(all_records) == 12
    # Both copies of the workload are one task: the best record over both rounds is round 2's.
    (workload_,) = {r.workload.mod.script(): r.workload for r in all_records}.values()
    best = database.query_tuning_record(workload_.mod, h200_target(), "layer_norm")
    assert 1e6 * sum(float(s) for s in best.run_secs) / len(best.run_secs) == pytest.approx(210.95, abs=0.01)
    target = h200_target()
    pristine = workload_.mod.script()
    for _ in range(2):  # what MetaScheduleApplyDatabase asks at compile time; TVM's own query_schedule
        assert database.query_schedule(_copy(workload_.mod), target, "layer_norm") is not None  # ...
    assert workload_.mod.script() == pristine  # ...changed the database's workload here (record 9)
    for record in all_records:
        sch = tvm.s_tir.Schedule(_copy(workload_.mod))  # as `build` queries: a module of its own
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        with target:  # nvcc, once a test has set up cross-compiling (test_cross_compile), reads the arch from it
            cuda = tvm.build(sch.mod, target=target).imports[0].inspect_source()
        assert "__global__" in cuda and "threadIdx.x" in cuda


def _copy(mod):
    return tvm.ir.load_json(tvm.ir.save_json(mod))


def _two_records_of_one_workload(directory: Path) -> Path:
    lines = H200_LAYERNORM.joinpath("database_tuning_record.json").read_text().splitlines()
    shutil.copy(H200_LAYERNORM / "database_workload.json", directory)
    (directory / "database_tuning_record.json").write_text(f"{lines[0]}\n{lines[0]}\n")
    return directory


def test_our_loader_loads_two_records_of_one_workload(tmp_path):
    assert len(records.load(_two_records_of_one_workload(tmp_path)).get_all_tuning_records()) == 2


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="why records.py exists: TVM 0.27's loader re-applies two traces of one workload to one shared "
                          "module; the second meets the loops the first one made (or the heap is corrupted). Passing "
                          "means upstream fixed it: records.py may be dropped")
def test_upstream_canary_tvm_loader_loads_two_records_of_one_workload(tmp_path):
    code = ("import sys\nfrom tvm.s_tir import meta_schedule as ms\n"
            "ms.database.JSONDatabase(work_dir=sys.argv[1])\n")
    tvm_loader = subprocess.run([sys.executable, "-c", code, str(_two_records_of_one_workload(tmp_path))],
                                capture_output=True, text=True)
    assert tvm_loader.returncode == 0, tvm_loader.stderr[-2000:]


def _layernorm_task(target, tmp_path):
    wl = workload.load(LAYERNORM, "small")
    mod = frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "ln.onnx"), wl.shapes())
    return frontend.extract_tasks(mod, target)[0]


def _write_database(path: Path, task, target, traces) -> None:
    path.mkdir(parents=True)
    db = ms.database.JSONDatabase(work_dir=str(path))
    wl = db.commit_workload(task.mod)
    args = ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])
    for i, trace in enumerate(traces):
        db.commit_tuning_record(ms.database.TuningRecord(trace, wl, [1e-5 * (i + 1)], target, args))


def _root_annotated_split(mod, factor: int):
    """The LLM programs' opening: annotate the root block, then split a loop below the root's
    SeqStmt: TVM then rewrites the loop of `mod` itself."""
    sch = tvm.s_tir.Schedule(_copy(mod))
    sch.annotate(sch.get_sblock("root"), "meta_schedule.unroll_explicit", 16)
    loops = sch.get_loops(sch.get_sblock("ln_stats"))
    sch.split(loops[2], [None, factor])
    return sch.trace


def test_build_uses_records_that_change_their_workload(tmp_path):
    """Two records of one workload whose traces change the module they are applied to: TVM's loader
    fails on them (as on the H200 database); `build` uses them, and the module validates."""
    target = targets.resolve("llvm")
    task = _layernorm_task(target, tmp_path)
    traces = [_root_annotated_split(task.mod, f) for f in (2, 4)]
    _write_database(tmp_path / "db", task, target, traces)
    manifest = export.build(LAYERNORM, tmp_path / "db", tmp_path / "dist", "small", target)
    assert [t["schedule"] for t in manifest["tasks"]] == ["tuned (database record)"]
    assert manifest["tasks"][0]["records"] == 2
    measured = export.check(tmp_path / "dist", seeds=1, repeats=2)
    assert measured["validation"]["passed"]


def test_build_refuses_a_record_that_does_not_reapply(tmp_path):
    target = targets.resolve("llvm")
    task = _layernorm_task(target, tmp_path)
    sch = tvm.s_tir.Schedule(_copy(task.mod))
    sch.split(sch.get_loops(sch.get_sblock("ln_stats"))[2], [None, 4])
    _write_database(tmp_path / "db", task, target, [sch.trace])
    path = tmp_path / "db/database_tuning_record.json"
    path.write_text(path.read_text().replace('"ln_stats"', '"no_such_block"'))
    with pytest.raises(UserError, match=r"database_tuning_record.json line 1: its schedule does not re-apply"):
        export.build(LAYERNORM, tmp_path / "db", tmp_path / "dist", "small", target)
    cli = subprocess.run([sys.executable, "-m", "schedsearch", "build", LAYERNORM, "--size", "small",
                          "--schedules", str(tmp_path / "db"), "-o", str(tmp_path / "dist"), "--target", "llvm"],
                         capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 2
    assert cli.stderr.startswith("schedsearch: error: ") and len(cli.stderr.strip().splitlines()) == 1, cli.stderr
    assert not (tmp_path / "dist").exists()


def test_build_refuses_gpu_schedules_for_a_cpu(tmp_path):
    """`build --schedules schedules/nvidia-h100/softmax` on a machine without a GPU printed TVM's
    "Unknown device id in current IR" traceback."""
    wl = workload.load(SOFTMAX, "small")
    llvm = targets.resolve("llvm")
    mod = frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "sm.onnx"), wl.shapes())
    task = frontend.extract_tasks(mod, llvm)[0]
    sch = tvm.s_tir.Schedule(_copy(task.mod))
    block = sch.get_sblock("T_softmax_norm")
    sch.bind(sch.fuse(*sch.get_loops(block)), "threadIdx.x")
    _write_database(tmp_path / "db", task, h200_target(), [sch.trace])
    with pytest.raises(UserError, match=r"task softmax was tuned for cuda sm_90a, this build is for llvm"):
        export.build(SOFTMAX, tmp_path / "db", tmp_path / "dist", "small", llvm)
