"""Exported modules: package a tuned run, load it in a fresh process, check every call's inputs,
build from a database without search (tuned vs fallback tasks), and `run --check`."""
import argparse
import json
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch
import tvm
from tvm.s_tir import meta_schedule as ms

import schedsearch
from conftest import ROOT
from schedsearch import export, frontend, target as targets, workload
from schedsearch.errors import UserError

SOFTMAX = str(ROOT / "workloads/level1/softmax.py")
CONV = str(ROOT / "workloads/level1/conv2d_relu_maxpool.py")


def cli(*argv) -> int:
    """The export/build/run commands through their own parsers, as cli.py wires them."""
    p = argparse.ArgumentParser()
    handlers = export.add_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args([str(a) for a in argv])
    return handlers[args.command](args)


@pytest.fixture(scope="module")
def softmax_dist(softmax_run, tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist") / "softmax"
    assert cli("export", softmax_run.root, "-o", dist) == 0
    return dist


def commit_record(db, task, sch, target, run_secs):
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(task.mod), run_secs, target,
                                                     ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])))


def test_export_packages_the_run(softmax_run, softmax_dist):
    res = softmax_run.read_results()
    m = json.loads((softmax_dist / "manifest.json").read_text())
    assert sorted(p.name for p in softmax_dist.iterdir()) == ["database", "manifest.json", "module.so", "softmax.py"]
    assert m["made_by"] == "export" and m["target_kind"] == "llvm" and m["arch"] == platform.machine()
    assert m["inputs"] == [{"name": "input0", "shape": [8, 256], "dtype": "float32"}]
    assert m["outputs"] == [{"shape": [8, 256], "dtype": "float32"}]
    assert m["target"] == res.target and m["versions"]["tvm"] == tvm.__version__
    assert m["workload"] == {"name": "softmax", "size": "small", "path": SOFTMAX, "file": "softmax.py",
                             "sha256": res.workload["sha256"], "weights_sha256": res.workload["weights_sha256"]}
    assert (softmax_dist / "softmax.py").read_bytes() == (ROOT / "workloads/level1/softmax.py").read_bytes()
    assert m["strategy"] == "ansor" and m["trials_per_task"] == 4
    assert m["tasks"][0]["best_us"] == res.tasks[0]["best_us"] > 0 and "curve" not in m["tasks"][0]
    assert m["validation"] == res.validation and m["validation"]["passed"]
    assert m["timing"]["tvm"]["median_us"] > 0
    assert len(ms.database.JSONDatabase(work_dir=str(softmax_dist / "database"))) == 4


def test_loaded_in_a_fresh_process_matches_pytorch(softmax_dist, tmp_path):
    moved = tmp_path / "elsewhere"  # a dist dir is self-contained: it works after a move
    shutil.copytree(softmax_dist, moved)
    xs = [torch.randn(8, 256), torch.randn(8, 256) + 1e3, torch.rand(8, 256) * 1e-3]
    torch.save({"xs": xs, "ys": [torch.softmax(x, dim=1) for x in xs]}, tmp_path / "cases.pt")
    script = (
        "import sys, torch, schedsearch\n"
        "assert 'tvm' not in sys.modules, 'import schedsearch must not import tvm'\n"
        "fn = schedsearch.load(sys.argv[1])\n"
        "cases = torch.load(sys.argv[2])\n"
        "outs = [fn(x) for x in cases['xs']]\n"
        "assert all(type(o) is torch.Tensor for o in outs)\n"
        "print(max(float((o - y).abs().max()) for o, y in zip(outs, cases['ys'])))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(moved), str(tmp_path / "cases.pt")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 0 <= float(proc.stdout.strip().splitlines()[-1]) < 1e-4


def test_every_call_checks_its_inputs(softmax_dist):
    fn = schedsearch.load(softmax_dist)
    cases = [
        ((torch.randn(8, 255),), "input 0 (input0): expected shape (8, 256) float32 on cpu, got (8, 255) float32 on cpu"),
        ((torch.randn(8, 256, dtype=torch.float64),),
         "input 0 (input0): expected shape (8, 256) float32 on cpu, got (8, 256) float64 on cpu"),
        ((torch.empty(8, 256, device="meta"),),
         "input 0 (input0): expected shape (8, 256) float32 on cpu, got (8, 256) float32 on meta"),
        ((), "softmax: expected 1 input (input0), got 0"),
        ((torch.randn(8, 256), torch.randn(8, 256)), "softmax: expected 1 input (input0), got 2"),
        (([0.0] * 256,), "input 0 (input0): expected a torch.Tensor of shape (8, 256) float32 on cpu, got list"),
        ((torch.randn(256, 8).T,), "input 0 (input0): not contiguous (strides (1, 8))"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=re.escape(message)):
            fn(*args)
    x = torch.randn(8, 256, requires_grad=True)  # a grad tensor is passed as a detached view
    torch.testing.assert_close(fn(x), torch.softmax(x, 1).detach(), atol=1e-6, rtol=1e-5)


def test_inputs_go_by_dlpack_without_copies(softmax_dist, monkeypatch):
    """The TVM tensor the module runs on points at the caller's torch memory."""
    seen = []
    from_dlpack = tvm.runtime.from_dlpack
    monkeypatch.setattr(tvm.runtime, "from_dlpack", lambda t: seen.append(from_dlpack(t)) or seen[-1])
    fn = schedsearch.load(softmax_dist)
    x = torch.randn(8, 256)
    y = fn(x)
    assert [t.data_ptr() for t in seen] == [x.data_ptr()]
    torch.testing.assert_close(y, torch.softmax(x, 1), atol=1e-6, rtol=1e-5)


def test_load_errors(softmax_dist, tmp_path):
    with pytest.raises(UserError, match="nowhere: no such directory"):
        schedsearch.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty is not an exported module: no manifest\.json"):
        schedsearch.load(tmp_path / "empty")
    (tmp_path / "nomodule").mkdir()
    shutil.copyfile(softmax_dist / "manifest.json", tmp_path / "nomodule/manifest.json")
    with pytest.raises(UserError, match=r"nomodule: module\.so is missing"):
        schedsearch.load(tmp_path / "nomodule")
    foreign = tmp_path / "other-arch"
    shutil.copytree(softmax_dist, foreign)
    m = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**m, "arch": "riscv64"}))
    with pytest.raises(UserError, match=f"compiled for riscv64 CPUs, this machine is {platform.machine()}"):
        schedsearch.load(foreign)


@pytest.mark.skipif(targets.cuda_visible(), reason="tests the machine without a GPU")
def test_cuda_module_on_a_machine_without_gpu(tmp_path):
    dist = tmp_path / "cuda"
    m = export.build(SOFTMAX, None, dist, "small", tvm.target.Target("nvidia/nvidia-h100", host="llvm"))
    assert (dist / "module.so").stat().st_size > 0
    assert m["target_kind"] == "cuda" and m["arch"] == "sm_90a"
    assert [t["schedule"] for t in m["tasks"]] == ["dlight default schedule"]
    with pytest.raises(UserError, match=r"compiled for CUDA \(sm_90a, .*\), but no CUDA GPU is visible"):
        schedsearch.load(dist)


def test_arch_compatibility():
    assert export.arch_problem("sm_90a", "9.0") is None
    assert export.arch_problem("sm_80", "8.6") is None
    assert export.arch_problem("sm_100a", "10.0") is None
    assert "this GPU is older (8.0)" in export.arch_problem("sm_90a", "8.0")
    assert "this GPU is older (8.0)" in export.arch_problem("sm_86", "8.0")
    assert "arch-specific code runs only on compute capability 9.0" in export.arch_problem("sm_90a", "10.0")
    assert "runs only on compute capability 8.x" in export.arch_problem("sm_80", "9.0")


def test_build_lists_tuned_and_fallback_tasks(tmp_path, capsys):
    """A database with a record for one of conv2d_relu_maxpool's two tasks: the manifest says which."""
    wl = workload.load(CONV, "small")
    target = targets.resolve("llvm")
    tasks = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "m.onnx")), target)
    assert len(tasks) == 2
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    sch = tvm.s_tir.Schedule(tasks[0].mod)  # MetaSchedule ignores records with an empty trace
    sch.compute_inline(sch.get_sblock("pad_temp"))
    commit_record(ms.database.JSONDatabase(work_dir=str(db_dir)), tasks[0], sch, target, [1e-5])
    dist = tmp_path / "dist"
    assert cli("build", CONV, "--schedules", db_dir, "--size", "small", "--target", "llvm", "-o", dist) == 0
    m = json.loads((dist / "manifest.json").read_text())
    assert m["made_by"] == "build" and m["validation"] is None and m["strategy"] is None
    assert [(t["name"], t["schedule"], t["records"]) for t in m["tasks"]] == [
        (tasks[0].name, "tuned (database record)", 1), (tasks[1].name, "untuned (TVM default lowering)", 0)]
    assert m["tasks"][0]["best_us"] == pytest.approx(10.0) and m["tasks"][1]["best_us"] is None
    assert m["outputs"] == [{"shape": [2, 16, 3, 3], "dtype": "float32"}]
    assert len(ms.database.JSONDatabase(work_dir=str(dist / "database"))) == 1
    # The conv's weights are drawn at random when the workload loads: check sees the same ones.
    assert m["workload"]["weights_sha256"] == workload.load(CONV, "small").weights_sha256
    assert cli("run", dist, "--check", "--validation-seeds", "1", "--repeats", "2") == 0
    assert "validation: PASSED" in capsys.readouterr().out
    (dist / "manifest.json").write_text(json.dumps({**m, "workload": {**m["workload"], "weights_sha256": "0" * 64}}))
    with pytest.raises(UserError, match="builds a model with other weights than the ones compiled into"):
        cli("run", dist, "--check")


def test_build_from_another_workloads_database_falls_back_and_returns_tuples(softmax_run, write_problem, tmp_path):
    problem = write_problem(
        "class Model(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.relu(x), x.sum(dim=1)\n"
        "def get_inputs():\n    return [torch.randn(4, 16)]\n"
        "def get_init_inputs():\n    return []\n", name="two_outputs.py")
    dist = tmp_path / "dist"
    assert cli("build", problem, "--schedules", softmax_run.root, "--target", "llvm", "-o", dist) == 0
    m = json.loads((dist / "manifest.json").read_text())
    assert m["tasks"] and all(t["schedule"] == "untuned (TVM default lowering)" for t in m["tasks"])
    assert m["strategy"] == "ansor"  # the schedules came from a run dir: its strategy is recorded
    assert m["outputs"] == [{"shape": [4, 16], "dtype": "float32"}, {"shape": [4], "dtype": "float32"}]
    x = torch.randn(4, 16)
    out = schedsearch.load(dist)(x)
    assert isinstance(out, tuple) and len(out) == 2
    torch.testing.assert_close(out[0], torch.relu(x))
    torch.testing.assert_close(out[1], x.sum(dim=1), atol=1e-5, rtol=1e-5)


def test_run_check_validates_against_pytorch(softmax_dist, capsys):
    assert cli("run", softmax_dist, "--check", "--validation-seeds", "1", "--repeats", "2") == 0
    out = capsys.readouterr().out
    assert "validation: PASSED: 4 checks" in out and "max abs" in out
    assert re.search(r"TVM median [\d.,]+ us, PyTorch eager [\d.,]+ .s; speedup vs PyTorch eager: ([\d.]+x|none shown, )",
                     out)


def test_run_check_fails_on_a_wrong_module(softmax_run, tmp_path, capsys):
    """A record that stores softmax's exp in fp16: build ships it, `run --check` must catch it."""
    target = targets.resolve("llvm")
    [task] = frontend.extract_tasks(frontend.import_onnx(softmax_run.onnx), target)
    sch = tvm.s_tir.Schedule(task.mod)
    sch.unsafe_set_dtype(sch.get_sblock("T_softmax_exp"), 0, "float16")
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    commit_record(ms.database.JSONDatabase(work_dir=str(db_dir)), task, sch, target, [1e-9])
    dist = tmp_path / "dist"
    assert cli("build", SOFTMAX, "--schedules", db_dir, "--size", "small", "--target", "llvm", "-o", dist) == 0
    assert cli("run", dist, "--check", "--validation-seeds", "1", "--repeats", "2") == 1
    out = capsys.readouterr().out
    assert "validation: FAILED" in out and "normwise relative error" in out


def test_export_and_check_refuse_what_they_cannot_vouch_for(softmax_run, softmax_dist, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    with pytest.raises(UserError, match="busy is not empty and holds no manifest.json"):
        export.export_run(softmax_run.root, tmp_path / "busy")
    with pytest.raises(UserError, match="is not a finished run directory: no results.json"):
        export.export_run(tmp_path / "busy", tmp_path / "out")
    failed = tmp_path / "failed-run"
    shutil.copytree(softmax_run.root, failed)
    res = json.loads((failed / "results.json").read_text())
    res["validation"].update(passed=False, failed=1)
    (failed / "results.json").write_text(json.dumps(res))
    with pytest.raises(UserError, match="FAILED validation when it was tuned .1 of 4 checks.*not exporting it"):
        export.export_run(failed, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    edited = tmp_path / "edited"
    shutil.copytree(softmax_dist, edited)
    (edited / "softmax.py").write_text((edited / "softmax.py").read_text().replace("dim=1", "dim=0"))
    with pytest.raises(UserError, match=r"the workload copy in .*edited, .*softmax.py, changed since it was compiled"):
        export.check(edited, seeds=1, repeats=2)
    assert cli("export", softmax_run.root, "-o", edited) == 0  # a dist dir of ours is replaced
    assert (edited / "softmax.py").read_bytes() == (softmax_dist / "softmax.py").read_bytes()


def test_onnx_workload_travels_with_its_external_weights(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x):
            return torch.relu(self.fc(x))

    src = tmp_path / "src"
    src.mkdir()
    torch.onnx.export(Net().eval(), (torch.randn(2, 64),), str(src / "net.onnx"), dynamo=True, opset_version=18,
                      input_names=["x"], external_data=True)
    assert (src / "net.onnx.data").stat().st_size > 0
    dist = tmp_path / "dist"
    m = export.build(src / "net.onnx", None, dist, target=targets.resolve("llvm"))
    assert m["workload"]["name"] == "net" and m["workload"]["file"] == "net.onnx"
    assert (dist / "net.onnx.data").read_bytes() == (src / "net.onnx.data").read_bytes()
    shutil.rmtree(src)  # the dist dir alone is enough to check the module against its program
    assert export.check(dist, seeds=1, repeats=2)["validation"]["passed"]
