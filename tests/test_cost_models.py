"""Pretrained cost models on LLVM: train on a database made here, round-trip the files, refuse mismatched
ones, and `tune --cost-model auto` starting from it."""
import json
import shutil

import numpy as np
import pytest
import tvm
import xgboost as xgb
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.cost_model import xgb_model

from conftest import ROOT
from schedsearch import cost_models, records as schedsearch_records, target as targets
from schedsearch.cli import main
from schedsearch.errors import UserError
from schedsearch.options import Evaluation, Tuning

SOFTMAX = str(ROOT / "workloads/level1/softmax.py")
TUNE = ["--size", "small", "--target", "llvm", "--validation-seeds", "1", "--repeats", "2"]


@pytest.fixture(scope="module")
def llvm():
    return targets.resolve("llvm")


@pytest.fixture(scope="module")
def trained(softmax_run, tmp_path_factory, llvm):
    """conftest's run of 4 trials and the model trained on it, in a cost_models/ root of its own: (run dir,
    model dir)."""
    model_dir = tmp_path_factory.mktemp("cm") / "cost_models" / targets.device_slug(targets.device_name(llvm))
    assert main(["train-cost-model", str(softmax_run.root), "-o", str(model_dir), "--holdout", "0.5"]) == 0
    return softmax_run.root, model_dir


def records_of(run):
    [w] = cost_models.read_workloads(run / "database", ["softmax"])
    return w


def candidates_of(run):
    """The records as read_workloads reads them (records.load: in the file's order; TVM's JSONDatabase
    sorts them by run time), so that the two predictions compared below are of the same candidates in turn."""
    records = schedsearch_records.load(run / "database").get_all_tuning_records()
    cands = []
    for r in records:
        sch = tvm.s_tir.Schedule(tvm.ir.load_json(tvm.ir.save_json(r.workload.mod)))
        r.trace.apply_to_schedule(sch, remove_postproc=False)
        cands.append(ms.MeasureCandidate(sch, r.args_info))
    ctx = ms.TuneContext(mod=records[0].workload.mod, target=records[0].target, num_threads=1)
    return ctx, cands, [ms.runner.RunnerResult([float(s) for s in r.run_secs], None) for r in records]


def test_train_writes_xgboost_file_and_manifest(trained, llvm):
    run, model_dir = trained
    m = json.loads((model_dir / "MANIFEST.json").read_text())
    assert m["device"] == {"name": targets.device_name(llvm), "slug": model_dir.name, "kind": "llvm"}
    assert m["versions"] == {"tvm": tvm.__version__, "xgboost": xgb.__version__}
    assert m["features"] == cost_models.feature_version() and m["features"]["length"] == 164
    assert m["records"] == {"total": 4, "train": 2, "held_out": 2}
    [w] = m["workloads"]
    assert (w["name"], w["records"], w["train"], w["held_out"]) == ("softmax", 4, 2, 2)
    scores = w["held_out_scores"]
    # tau of two records is undefined (None) when the model scores both the same: trained on the other two only,
    # it did in one CI run (which two are held out follows the database's record order)
    tau = scores["kendall_tau"]
    assert scores["records"] == 2 and (tau is None or -1 <= tau <= 1) and scores["chance_recall"] == 1.0
    assert "unseen_scores" not in w and m["scores"]["unseen"] is None  # one workload: no other to train on
    booster = model_dir / m["model"]["file"]
    assert m["model"]["bytes"] == booster.stat().st_size and booster.read_bytes()[:1] == b"{"  # UBJSON, no tar
    assert xgb.Booster(model_file=str(booster)).num_boosted_rounds() == m["model"]["trees"] > 0


def test_pretrained_model_ranks_with_its_booster_from_the_start_and_goes_on_learning(trained, llvm):
    run, model_dir = trained
    start = cost_models.start(model_dir, llvm)
    assert start.kind == "pretrained" and start.record()["records"] == 2
    model = start.model()
    ctx, cands, results = candidates_of(run)
    first = model.predict(ctx, cands)  # no records of its own yet: the stock model would draw random scores
    features = [x.numpy().astype("float32") for x in cost_models.extractor().extract_from(ctx, cands)]
    d = xgb_model.PackSum(xs=features, ys=None)
    on_disk = d.predict_with_score(xgb.Booster(model_file=str(model_dir / "model.ubj")).predict(d.dmatrix))
    np.testing.assert_array_equal(first, on_disk)
    rounds = model.booster.num_boosted_rounds()
    model.update(ctx, cands, results)  # the run's own records: boosting goes on from the pretrained trees
    assert model.booster.num_boosted_rounds() > rounds and model.base.num_boosted_rounds() == rounds
    first_trees = model.booster.predict(d.dmatrix, iteration_range=(0, rounds))
    np.testing.assert_array_equal(d.predict_with_score(first_trees), first)
    assert not np.array_equal(model.predict(ctx, cands), first)


def test_fit_trains_as_xgbmodel_update_does(trained):
    """train-cost-model extracts features once and trains XGBModel itself: the same booster as update()."""
    run, _ = trained
    ctx, cands, results = candidates_of(run)
    stock = ms.cost_model.XGBModel(extractor=cost_models.extractor(), adaptive_training=False,
                                   num_warmup_samples=0, num_tuning_cores=1)
    stock.update(ctx, cands, results)
    w = records_of(run)
    ours = cost_models.fit([w], [np.ones(len(w.costs), bool)])
    np.testing.assert_array_equal(cost_models.predict(ours, w.features), stock.predict(ctx, cands))


def test_a_mismatched_model_is_refused_with_a_reason(trained, llvm, tmp_path, capsys):
    _, model_dir = trained
    for change, reason in [(lambda m: m["device"].update(name="NVIDIA H100 80GB HBM3", slug="nvidia-h100",
                                                         kind="cuda"), "trained on NVIDIA H100 80GB HBM3 (cuda)"),
                           (lambda m: m["versions"].update(tvm="0.26.0"), "trained with TVM 0.26.0"),
                           (lambda m: m["features"].update(length=163), "trained on features")]:
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(model_dir, bad)
        m = json.loads((bad / "MANIFEST.json").read_text())
        change(m)
        (bad / "MANIFEST.json").write_text(json.dumps(m))
        with pytest.raises(UserError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            cost_models.start(bad, llvm)
    rc = main(["tune", SOFTMAX, "--trials", "1", "-o", str(tmp_path / "r"), "--cost-model", str(bad), *TUNE])
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert rc == 2 and line.startswith("schedsearch: error: ") and "trained on features" in line
    assert not (tmp_path / "r").exists()  # refused before any work


def test_the_committed_gpu_models_are_refused_on_a_cpu(llvm):
    committed = sorted(cost_models.ROOT.glob("nvidia-*"))
    assert committed
    for directory in committed:
        with pytest.raises(UserError, match=r"trained on NVIDIA H\d00.* \(cuda\), this target is .* \(llvm\)"):
            cost_models.start(directory, llvm)


def test_auto_without_a_model_for_this_device_starts_from_nothing(tmp_path, monkeypatch, llvm):
    monkeypatch.setattr(cost_models, "ROOT", tmp_path)
    start = cost_models.start("auto", llvm)
    assert start.kind == "none" and start.record()["note"].startswith("no pretrained model for this device")


def test_every_named_cost_model_start_is_started_by_its_function_and_listed_in_the_help(llvm, tmp_path,
                                                                                       monkeypatch, capsys):
    from schedsearch.options import COST_MODELS

    monkeypatch.setattr(cost_models, "ROOT", tmp_path)  # auto: no model for this device
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name, entry in COST_MODELS.items():
        assert cost_models.start(name, llvm) == getattr(cost_models, entry.start)(llvm)
        assert cost_models.start(name, llvm).requested == name
        assert f"{name} ({entry.help}" in help_text or f"{name} (default: {entry.help}" in help_text
    with pytest.raises(UserError, match=r"cost model file not found: atuo \(--cost-model takes none, auto, a DIR"):
        cost_models.start("atuo", llvm)


def test_cost_model_that_is_neither_a_tar_nor_a_model_dir_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "empty").mkdir()
    for spec, says in [("notes.txt", "not a tar archive"), ("empty", "not a cost model directory (no MANIFEST.json")]:
        rc = main(["tune", SOFTMAX, "--trials", "1", "-o", str(tmp_path / "r"), "--cost-model", str(tmp_path / spec),
                   *TUNE])
        assert rc == 2 and f"schedsearch: error: --cost-model {tmp_path / spec}: {says}" in capsys.readouterr().err


def test_tune_with_cost_model_auto_starts_from_it(trained, tmp_path, monkeypatch):
    _, model_dir = trained
    monkeypatch.setattr(cost_models, "ROOT", model_dir.parent)
    out = tmp_path / "auto"
    assert main(["tune", SOFTMAX, "--trials", "2", "-o", str(out), "--cost-model", "auto", *TUNE]) == 0
    record = json.loads((out / "results.json").read_text())["cost_model"]
    assert record == {"requested": "auto", "start": "pretrained", "path": str(model_dir),
                      "device": targets.device_name(targets.resolve("llvm")), "records": 2, "workloads": ["softmax"]}
    saved = ms.cost_model.XGBModel()
    with cost_models.quiet_xgboost_file_format():
        saved.load(str(out / "cost_model.tar"))  # our own run's file: trusted
    base = xgb.Booster(model_file=str(model_dir / "model.ubj")).num_boosted_rounds()
    assert saved.booster.num_boosted_rounds() > base  # it learned from the run's 2 records on top


def test_ranking_scores():
    costs = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 1e10])  # the last: not measured, throughput 0
    best_first = cost_models.ranking(np.array([7.0, 6, 5, 4, 3, 2, 1]), costs)
    assert best_first == {"records": 7, "kendall_tau": 1.0, "top_k_recall": 1.0, "chance_recall": round(5 / 7, 4),
                          "top1_throughput_ratio": 1.0}
    worst_first = cost_models.ranking(np.array([1.0, 2, 3, 4, 5, 6, 7]), costs)
    assert worst_first["kendall_tau"] == -1.0 and worst_first["top1_throughput_ratio"] == 0.0
    assert worst_first["top_k_recall"] == 0.6  # 5 of 7 in both top fives: 3 in common


def test_device_slug():
    assert targets.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100"
    assert targets.device_slug("NVIDIA H200") == "nvidia-h200"
    assert targets.device_slug("NVIDIA H100 PCIe") == "nvidia-h100-pcie"
    assert targets.device_slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4"


def test_compare_starts_every_arm_from_the_cost_model_asked_for(tmp_path, monkeypatch):
    import schedsearch.tune
    from schedsearch.compare import compare

    asked = []
    monkeypatch.setattr(schedsearch.tune, "tune_workload",
                        lambda wl, target, run, tuning, evaluation, **kw: asked.append(tuning.cost_model))
    with pytest.raises(UserError, match="cost model file not found"):
        compare([SOFTMAX], tmp_path / "bad", ["ansor"], 1, Tuning(trials=1, cost_model="/nope"), size="small",
                target_name="llvm")
    assert not (tmp_path / "bad").exists()  # refused before writing anything
    compare([SOFTMAX], tmp_path / "cmp", ["ansor", "rules"], 1, Tuning(trials=1, cost_model="auto"),
            Evaluation(repeats=2), size="small", target_name="llvm", compile_baselines=False)
    assert asked == ["auto", "auto"]
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["cost_model"] == "auto"


def test_training_leaves_out_records_tvm_cannot_lower_or_reapply(tmp_path, capsys):
    """Two records of the first H200 hybrid matmul arm: the model's program and an evolution mutant whose
    threadIdx.x loops disagree (512 vs 256), which failed the whole feature batch; and a third whose trace
    names a block that does not exist, which failed TVM's database loader for every record."""
    data = ROOT / "tests/data/h200-matmul-mutant"
    shutil.copytree(data, tmp_path / "db")
    records_file = tmp_path / "db/database_tuning_record.json"
    good = records_file.read_text().splitlines()[0]
    records_file.write_text(records_file.read_text() + good.replace('"matmul"', '"no_such_block"', 1) + "\n")
    [w] = cost_models.read_workloads(tmp_path / "db", ["matmul"])
    assert len(w.features) == 1 and w.features[0].shape[1] == 164
    assert w.costs[0] == pytest.approx(np.median(json.loads(good)[1][1]))
    err = capsys.readouterr().err
    assert "line 3: left out, its schedule does not re-apply" in err
    assert "a record TVM cannot lower is left out" in err and "threadIdx.x" in err
