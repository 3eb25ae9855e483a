"""The CPU pipeline end to end on LLVM: a real tune, compile, validation and timing, and resume."""
import json
import shutil

import pytest
import torch
import tvm
from tvm.s_tir import meta_schedule as ms

from conftest import ROOT
from schedsearch import frontend, target as targets, workload
from schedsearch.cli import main
from schedsearch.evaluate import evaluate
from schedsearch.rundir import RunDir
from schedsearch.runtime import CompiledModule

SOFTMAX = str(ROOT / "workloads/level1/softmax.py")


def test_tune_writes_a_complete_run_dir(softmax_run, capsys):
    res = softmax_run.read_results()
    assert res.workload["name"] == "softmax" and res.workload["size"] == "small"
    assert res.strategy == "ansor" and res.trials_per_task == 4
    assert res.target.startswith('{"kind":"llvm"')
    assert res.cost_model == {"requested": "none", "start": "none", "path": None}
    [task] = res.tasks
    assert task["name"] == "softmax" and task["trials"] == 4 and task["best_us"] > 0
    assert task["curve"][-1][1] == task["best_us"]
    v = res.validation
    assert v["passed"] and v["checks"] == 1 * 4 and v["distributions"] == ["normal", "offset", "small", "uniform"]
    assert 0 <= v["max_abs"] < 1e-4
    assert res.timing["tvm"]["median_us"] > 0 and res.timing["torch_eager"]["median_us"] > 0
    assert softmax_run.module.stat().st_size > 0
    trials = softmax_run.read_trials()
    assert [t["trial"] for t in trials] == [1, 2, 3, 4]
    db = ms.database.JSONDatabase(work_dir=str(softmax_run.database))
    assert len(db) == 4


def test_rerun_resumes_from_the_database(softmax_run, tmp_path):
    run = RunDir(tmp_path / "resumed")
    shutil.copytree(softmax_run.root, run.root)
    args = ["tune", SOFTMAX, "--size", "small", "-o", str(run.root), "--target", "llvm",
            "--validation-seeds", "1", "--repeats", "3"]
    assert main(args + ["--trials", "4"]) == 0
    assert len(run.read_trials()) == 4  # budget already spent: nothing new measured
    # as if the first invocation had searched for 1000 s: the resumed run's tuning time must count it
    earlier = [json.loads(l) for l in run.trials.read_text().splitlines()]
    run.trials.write_text("".join(json.dumps({**t, "elapsed_s": 1000.0}) + "\n" for t in earlier))
    assert main(args + ["--trials", "6", "--cost-model", str(softmax_run.root / "cost_model.tar")]) == 0
    trials = run.read_trials()
    assert [t["trial"] for t in trials] == [1, 2, 3, 4, 5, 6]
    results = run.read_results()
    assert results.tasks[0]["trials"] == 6
    assert 1000 + max(t["elapsed_s"] for t in trials[4:]) <= results.tuning_wall_s < 1100


def test_missing_cost_model_file_is_a_clear_error(tmp_path, capsys):
    rc = main(["tune", SOFTMAX, "--size", "small", "--trials", "1", "-o", str(tmp_path / "r"), "--target", "llvm",
               "--cost-model", str(tmp_path / "nope.tar")])
    assert rc == 2 and "cost model file not found" in capsys.readouterr().err


def test_rerun_into_a_run_of_another_workload_is_refused(softmax_run, tmp_path, capsys):
    run = tmp_path / "other"
    shutil.copytree(softmax_run.root, run)
    rc = main(["tune", str(ROOT / "workloads/level1/matmul.py"), "--size", "small", "--trials", "1", "-o", str(run)])
    assert rc == 2
    assert "holds a run with another workload_sha256" in capsys.readouterr().err


def test_rerun_after_the_kernels_changed_is_refused(softmax_run, tmp_path, capsys):
    """Trials counted for an older kernel (another TVM, another lowering) must not count for the new one."""
    run = tmp_path / "old"
    shutil.copytree(softmax_run.root, run)
    config = json.loads((run / "run.json").read_text())
    config["tasks"] = {"softmax": "12345"}
    (run / "run.json").write_text(json.dumps(config))
    rc = main(["tune", SOFTMAX, "--size", "small", "--trials", "1", "-o", str(run), "--target", "llvm"])
    assert rc == 2
    assert "the workload's kernels changed since this run was made" in capsys.readouterr().err


def test_a_corrupted_record_fails_validation(softmax_run, tmp_path):
    """A schedule that passes TVM's checks but stores an intermediate in fp16 (an `unsafe_` primitive,
    which our schedule language refuses) must be caught by validation, not shipped."""
    wl = workload.load(SOFTMAX, "small")
    target = targets.resolve("llvm")
    mod = frontend.import_onnx(softmax_run.onnx)
    [task] = frontend.extract_tasks(mod, target)
    db = ms.database.MemoryDatabase()
    sch = tvm.s_tir.Schedule(task.mod)
    sch.unsafe_set_dtype(sch.get_sblock("T_softmax_exp"), 0, "float16")
    db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(task.mod), [1e-9], target,
                                                     ms.arg_info.ArgInfo.from_prim_func(task.mod["main"])))
    module = CompiledModule(frontend.compile_module(mod, target, db), "cpu")
    bad = evaluate(wl, module, seeds=1, repeats=2)
    assert not bad["validation"]["passed"]
    assert "normwise relative error" in bad["validation"]["failures"][0]["problem"]
    good = evaluate(wl, CompiledModule(frontend.compile_module(mod, target, None), "cpu"), seeds=1, repeats=2)
    assert good["validation"]["passed"]


@pytest.mark.slow
def test_onnx_workload_with_input_shape(tmp_path, capsys):
    class Net(torch.nn.Module):
        def forward(self, x):
            return torch.relu(x) * 2

    path = tmp_path / "net.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(2, 8),), str(path), dynamo=True, opset_version=18,
                      input_names=["x"], dynamic_shapes=({0: torch.export.Dim("batch")},))
    with pytest.raises(Exception, match="dynamic shape.*--input-shape x="):
        workload.load(path)
    out = tmp_path / "run"
    with pytest.raises(Exception, match=r"x=4,16 does not fit the model's shape \['\?', 8\]"):
        workload.load(path, input_shapes={"x": (4, 16)})
    rc = main(["tune", str(path), "--input-shape", "x=4,8", "--trials", "2", "-o", str(out), "--target", "llvm",
               "--validation-seeds", "1", "--repeats", "2"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["workload"]["inputs"] == [{"name": "x", "shape": [4, 8], "dtype": "float32"}]
    assert res["validation"]["passed"] and "torch_eager" not in res["timing"]
    # relu(x) * 2 has one schedule: the search ends there and says why
    assert res["tasks"][0]["trials"] == 1 and res["tasks"][0]["space_exhausted"]
    out, err = capsys.readouterr()
    assert "space exhausted after 1 trials" in err and "1 (space exhausted)" in out
    # a proposer that has nothing new says that instead (rules stopped so on the H200's matmul after 63 trials)
    rc = main(["tune", str(path), "--input-shape", "x=4,8", "--trials", "3", "-o", str(tmp_path / "rules"), "--target",
               "llvm", "--strategy", "rules", "--validation-seeds", "1", "--repeats", "2"])
    [task] = json.loads((tmp_path / "rules/results.json").read_text())["tasks"]
    assert rc == 0 and task["trials"] == 1 and not task["space_exhausted"]
    assert task["ended"] == "3 rounds of proposals in a row gave no new valid candidate"
    assert "search ended after 1 trials: 3 rounds of proposals" in capsys.readouterr().err


@pytest.mark.slow
def test_a_proposal_round_asks_for_enough_programs_when_few_trials_are_left(tmp_path, monkeypatch):
    """With 2 trials left, 2 x oversample proposals can all be duplicates: a round asks for MIN_PROPOSALS."""
    from schedsearch import strategies
    from schedsearch.strategies import proposals, rules
    from schedsearch.tune import search

    asked, propose = [], rules.RuleProposer.propose
    monkeypatch.setattr(rules.RuleProposer, "propose", lambda self, view: asked.append(view.want) or propose(self, view))
    wl, target = workload.load(SOFTMAX, "small"), targets.resolve("llvm")
    run = RunDir(tmp_path / "run").create()
    [task] = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, run.onnx)), target)
    search([task], target, run, "rules", strategies.make("rules", run=run, target=target, seed=0), trials=2)
    assert asked and min(asked) == proposals.MIN_PROPOSALS and len(run.read_trials()) == 2


def test_eager_is_timed_in_a_process_of_its_own():
    """In the process that has run the TVM module, TVM's thread pool disturbs PyTorch: the small softmax took
    4,806 us there, 628 us in a fresh process. Here this process's model refuses to run: the timing must
    come from another one."""
    from schedsearch.evaluate import time_against_eager

    wl = workload.load(SOFTMAX, "small")

    def refuse(*inputs):
        raise AssertionError("PyTorch eager was timed in the process that ran the module")

    wl.model.forward = refuse

    class Module:
        device = "cpu"

        def __call__(self, x):
            return [torch.softmax(x, dim=1)]

    timing = time_against_eager(wl, Module(), repeats=3)
    assert timing["torch_eager"]["median_us"] > 0 and timing["torch_eager"]["repeats"] == 3
    assert timing["torch_eager"]["process"] == "its own, without TVM"


def stats(median, p10, p90):
    return {"median_us": median, "p10_us": p10, "p90_us": p90, "min_us": p10, "mean_us": median, "repeats": 20}


@pytest.mark.parametrize("eager, shown", [
    (stats(9900.0, 600.0, 12000.0), "none shown, eager's p10..p90 spread is 115% of its median"),  # issue 22
    (stats(280.0, 250.0, 310.0), "none shown, the p10..p90 ranges overlap"),
    (stats(628.0, 600.0, 700.0), "speedup vs PyTorch eager: 2.40x"),
])
def test_a_speedup_is_shown_only_when_the_spread_allows_it(eager, shown):
    from schedsearch.report import summary_table
    from schedsearch.rundir import Results

    results = Results(tasks=[{"name": "softmax", "weight": 1, "trials": 64, "errors": 1, "best_us": 24.0,
                              "error_causes": [["build timed out after 30.0 s", 1]]}],
                      validation={"passed": True, "failed": 0, "checks": 12, "seeds": [0, 1, 2], "max_abs": 1e-8,
                                  "max_rel": 1e-7, "tolerance": 1e-4, "distributions": ["normal"]},
                      timing={"tvm": stats(262.0, 255.0, 290.0), "torch_eager": eager,
                              "speedup_vs_eager": eager["median_us"] / 262.0},
                      device={"name": "cpu"}, tuning_wall_s=100.0, total_wall_s=110.0, workload={},
                      strategy="ansor", seed=0, trials_per_task=64, runner="local", target="llvm", versions={},
                      command=[], checks=[])
    text = summary_table(results)
    assert shown in text
    assert "softmax: 1 x build timed out after 30.0 s" in text  # the errors' cause, not only their count
    assert "best: each kernel alone as the tuner times it" in text


def test_a_search_that_measured_nothing_is_not_called_space_exhausted():
    """Stock Ansor on the H200's conv2d at 48 KB sampled no valid schedule and measured 0 trials: the summary said
    "space exhausted (an elementwise kernel's space can be one)"; it now names the cause."""
    import tvm
    from tvm import te

    from schedsearch.frontend import Task
    from schedsearch.tune import NO_VALID_SAMPLE, task_summary

    a = te.placeholder((4, 8), name="a")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((4, 8), lambda i, j: a[i, j] * 2, name="b")])})
    task = Task("double", 1, mod, 32.0)
    none = task_summary(task, [], 64)
    assert none["ended"] == NO_VALID_SAMPLE and "Cannot sample enough initial population" in none["ended"]
    assert not none["space_exhausted"]
    one = task_summary(task, [{"trial": 1, "latency_us": 1.0, "error": None}], 64)
    assert one["space_exhausted"] and "ended" not in one
