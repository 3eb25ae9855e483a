"""Pretrained cost models: MetaSchedule's XGBoost model trained on measured databases, written as XGBoost's
own booster file plus a JSON manifest, loaded without unpickling anything, and where a search's model starts.

    cost_models/<device>/model.ubj       the booster, XGBoost's UBJSON format (xgboost.Booster.load_model)
    cost_models/<device>/MANIFEST.json   device, TVM/XGBoost/feature versions, training records, held-out scores

<device> is target.device_slug of the device the records were measured on. `--cost-model` (start()):
a name of options.COST_MODELS (none, auto: cost_models/<this device>/ if there, else none), each started by its
function here, else DIR (such a model) | FILE (a run's cost_model.tar: XGBModel.save pickles its data, so trusted
run directories only).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.cost_model import xgb_model as _xgb
from tvm.s_tir.schedule import Schedule

from . import records, target as targets
from .errors import UserError
from .options import COST_MODELS, Tuning
from .rundir import RunDir

ROOT = Path(__file__).resolve().parent.parent / "cost_models"
FORMAT = 1
MODEL_FILE, MANIFEST_FILE = "model.ubj", "MANIFEST.json"
# The search's features (XGBModel's default "per-store-feature"): a booster is usable only with the same ones.
FEATURES = {"buffers_per_store": 5, "arith_intensity_curve_num_samples": 10, "cache_line_bytes": 64,
            "extract_workload": False}
TOP_K = 5  # held-out top-k recall: of a workload's k fastest held-out records, how many the model ranks top k


def extractor() -> ms.feature_extractor.PerStoreFeature:
    return ms.feature_extractor.PerStoreFeature(**FEATURES)


def feature_version() -> dict:
    return {"extractor": "per-store-feature", **FEATURES, "length": int(extractor().feature_vector_length)}


def new_model(num_tuning_cores: int = 1, warmup: int = 100) -> ms.cost_model.XGBModel:
    """MetaSchedule's XGBoost model as the search uses it, from nothing (random ranks for its first `warmup`
    records; stock: 100)."""
    return ms.cost_model.XGBModel(extractor=extractor(), adaptive_training=True, num_tuning_cores=num_tuning_cores,
                                  num_warmup_samples=warmup)


@derived_object
class PretrainedXGBModel(ms.cost_model.XGBModel._cls):
    """MetaSchedule's XGBModel starting from a trained booster: it ranks with it from the first candidate (no
    random warm-up: num_warmup_samples=0), and each retraining on the run's own records goes on boosting from
    it (xgboost.train(xgb_model=base)) where the stock model starts from nothing, so the run learns on top."""

    def __init__(self, base, num_tuning_cores: int = 1):
        super().__init__(extractor=extractor(), adaptive_training=True, num_tuning_cores=num_tuning_cores,
                         num_warmup_samples=0)
        base.set_param({"nthread": self.config.nthread})
        self.base = base
        self.booster = base

    def _train(self, xs, ys) -> None:  # XGBModel._train, plus xgb_model=self.base
        import xgboost as xgb

        self.d_train = _xgb.PackSum(xs=xs, ys=ys)
        d_train = self.d_train
        self.booster = xgb.train(
            self.config.to_dict(), d_train.dmatrix, num_boost_round=10000, xgb_model=self.base,
            obj=lambda pred, _: d_train.obj_square_error(pred),
            callbacks=[_xgb._get_custom_call_back(
                early_stopping_rounds=self.early_stopping_rounds, verbose_eval=self.verbose_eval,
                fevals=[lambda pred, _: d_train.rmse(pred),
                        lambda pred, _: d_train.average_peak_score(pred, self.average_peak_n)],
                evals=[(d_train.dmatrix, "tr")], cvfolds=None)])
        del self.d_train


# ---- where a search's model starts -------------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    """Where a search's cost model starts; record() is what results.json keeps under "cost_model"."""
    requested: str  # as given: none | auto | a path
    kind: str  # "none" | "pretrained" (a cost_models/ directory) | "run" (a run's cost_model.tar)
    path: str | None = None
    note: str | None = None  # auto: why it started from nothing
    manifest: dict = field(default_factory=dict, compare=False)

    def model(self, num_tuning_cores: int = 1, warmup: int = 100) -> ms.cost_model.XGBModel:
        """`warmup`: records before a model from nothing ranks by its predictions (a pretrained one: at once)."""
        if self.kind == "pretrained":
            return PretrainedXGBModel(read_booster(Path(self.path), self.manifest), num_tuning_cores)
        model = new_model(num_tuning_cores, warmup)
        if self.kind == "run":
            with quiet_xgboost_file_format():
                model.load(self.path)  # unpickles: only files the user vouches for (their own runs)
        return model

    def record(self) -> dict:
        out = {"requested": self.requested, "start": self.kind, "path": self.path}
        if self.note:
            out["note"] = self.note
        if self.kind == "pretrained":
            m = self.manifest
            out.update(device=m["device"]["name"], records=m["records"]["train"],
                       workloads=[w["name"] for w in m["workloads"]])
        return out


def start(spec: str | Path | None, target: tvm.target.Target) -> Start:
    """`--cost-model` checked against `target`, before any work; a bad one is a UserError. `spec`: a name of
    options.COST_MODELS, else a path."""
    spec = Tuning.cost_model if spec is None else str(spec)
    named = COST_MODELS.get(spec)
    return globals()[named.start](target) if named else start_from_path(spec, target)


def start_from_nothing(target: tvm.target.Target) -> Start:
    return Start("none", "none")


def start_auto(target: tvm.target.Target) -> Start:
    """cost_models/<this device>/ where there is a model usable here; else from nothing, saying why."""
    spec = "auto"
    directory = ROOT / targets.device_slug(targets.device_name(target))
    if not (directory / MANIFEST_FILE).is_file():
        return Start(spec, "none", note=f"no pretrained model for this device ({directory} has no {MANIFEST_FILE})")
    try:
        manifest = check(directory, target)
    except UserError as e:  # auto: use it where it applies, else say why not and start from nothing
        print(f"schedsearch: --cost-model auto: {e}; starting from nothing", file=sys.stderr)
        return Start(spec, "none", note=str(e))
    return Start(spec, "pretrained", str(directory), manifest=manifest)


def start_from_path(spec: str, target: tvm.target.Target) -> Start:
    """A directory from train-cost-model, or a run's cost_model.tar."""
    path = Path(spec)
    if path.is_dir():
        if not (path / MANIFEST_FILE).is_file():
            raise UserError(f"--cost-model {path}: not a cost model directory (no {MANIFEST_FILE}; "
                            "make one with schedsearch train-cost-model)")
        return Start(spec, "pretrained", str(path), manifest=check(path, target))
    if not path.exists():
        raise UserError(f"cost model file not found: {path} (--cost-model takes {', '.join(COST_MODELS)}, a DIR "
                        "or a FILE)")
    if not tarfile.is_tarfile(path):
        raise UserError(f"--cost-model {path}: not a tar archive (a run's cost_model.tar) "
                        f"nor a directory with {MANIFEST_FILE}")
    try:  # here, before any work: a tar of something else fails in TVM's loader with a RuntimeError
        with quiet_xgboost_file_format():
            new_model().load(str(path))
    except Exception as e:
        lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
        raise UserError(f"--cost-model {path}: not a cost model saved by `schedsearch tune` "
                        f"({lines[-1] if lines else type(e).__name__})") from e
    return Start(spec, "run", str(path))


def check(directory: Path, target: tvm.target.Target) -> dict:
    """The manifest of the model in `directory` if it is usable for `target`; else a UserError saying why not."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{directory / MANIFEST_FILE}: unreadable ({e})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{directory}: cost model format {manifest.get('format')}, this schedsearch reads {FORMAT}")
    device, here = manifest["device"], targets.device_name(target)
    if device["kind"] != target.kind.name or device["slug"] != targets.device_slug(here):
        raise UserError(f"{directory}: trained on {device['name']} ({device['kind']}), this target is {here} "
                        f"({target.kind.name})")
    if manifest["versions"]["tvm"] != tvm.__version__:
        raise UserError(f"{directory}: trained with TVM {manifest['versions']['tvm']}, this is TVM {tvm.__version__} "
                        "(features may differ): retrain it with schedsearch train-cost-model")
    if manifest["features"] != feature_version():
        raise UserError(f"{directory}: trained on features {manifest['features']}, the search uses "
                        f"{feature_version()}")
    return manifest


def read_booster(directory: Path, manifest: dict):
    """XGBoost's own file only (no pickle); the early-stopping state it was saved with is dropped, or
    retraining from it would compare the run's errors with the pretraining's best."""
    import xgboost as xgb

    booster = xgb.Booster()
    try:
        booster.load_model(str(directory / manifest["model"]["file"]))
    except xgb.core.XGBoostError as e:
        raise UserError(f"{directory}: XGBoost cannot read {manifest['model']['file']}: "
                        f"{str(e).strip().splitlines()[0]}") from None
    booster.set_attr(best_score=None, best_iteration=None, best_msg=None)
    return booster


@contextlib.contextmanager
def quiet_xgboost_file_format():
    """XGBModel keeps its booster in a file without extension: XGBoost warns on each save and load that
    it chose UBJSON, which is right, and the user can do nothing about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r".*(Saving model in the UBJSON format|Unknown file format)")
        yield


# ---- training ------------------------------------------------------------------------------------------------

@dataclass
class Workload:
    """One task's records from one database, as features and costs: what XGBModel groups (and normalises) by."""
    name: str
    database: str
    mod: tvm.IRModule
    target: tvm.target.Target
    features: list  # per record: float32 [stores, length], as XGBModel.update extracts them
    costs: np.ndarray  # per record: XGBModel's cost, the median of its run_secs (1e10 when it has none)


def find_databases(paths: list[Path]) -> list[Path]:
    """Every MetaSchedule JSON database at or under `paths` (run dirs, schedules/<gpu>/, database dirs)."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: not found")
        here = sorted({p.parent for p in path.rglob("database_workload.json")})
        if not here:
            raise UserError(f"{path}: no MetaSchedule database (database_workload.json) at or under it")
        found += [d for d in here if d not in found]
    return found


def measured_on(database: Path, device: str | None) -> tuple[str, list[str]]:
    """The device that measured `database` and its tasks' names, from the run's results.json beside it."""
    for run in (RunDir(database), RunDir(database.parent)):
        if run.results.is_file():
            results = run.read_results()
            return results.device["name"], [t["name"] for t in results.tasks]
    if device is None:
        raise UserError(f"{database}: no results.json beside it says which device measured it: pass --device NAME")
    return device, []


def read_workloads(database: Path, task_names: list[str]) -> list[Workload]:
    """Each workload's records, rebuilt as the candidates that were measured, and their features."""
    db = records.load(database, skip_bad=True)  # TVM's JSONDatabase fails on (or corrupts memory with) LLM traces
    order = [json.loads(line)[0] for line in (database / "database_workload.json").read_text().splitlines() if line]
    names = task_names if len(task_names) == len(order) else [f"workload{i}" for i in range(len(order))]
    groups: dict[str, tuple] = {}  # the workloads' structural hash -> (mod, target, candidates, costs)
    for record in db.get_all_tuning_records():
        key = str(tvm_ffi.structural_hash(record.workload.mod))
        mod, target, candidates, costs = groups.setdefault(key, (record.workload.mod, record.target, [], []))
        sch = Schedule(tvm.ir.load_json(tvm.ir.save_json(mod)))  # a copy: see schedule_lang.fresh_schedule
        record.trace.apply_to_schedule(sch, remove_postproc=False)  # the candidate as it was measured
        candidates.append(ms.MeasureCandidate(sch, record.args_info))
        costs.append(float(np.median([float(s) for s in record.run_secs])) if record.run_secs else 1e10)
    out = []
    for key, (mod, target, candidates, costs) in groups.items():
        context = ms.TuneContext(mod=mod, target=target, num_threads=len(os.sched_getaffinity(0)))
        features = extract_features(context, candidates, database)
        kept = [i for i, f in enumerate(features) if f is not None and len(f)]  # XGBModel.update drops those too
        out.append(Workload(names[order.index(key)] if key in order else f"workload{len(out)}", str(database), mod,
                            target, [features[i] for i in kept], np.array(costs, "float32")[kept]))
    return out


def extract_features(context, candidates: list, database: Path) -> list:
    """Each candidate's features; None where TVM cannot lower it (the H200 compare's database holds an evolution
    mutant whose threadIdx.x loops disagree, 512 vs 256: one such record failed the whole batch)."""
    try:
        return [x.numpy().astype("float32") for x in extractor().extract_from(context, candidates)]
    except Exception:  # noqa: BLE001  TVM raises RuntimeError/TVMError; find which ones, keep the rest
        out = []
        for candidate in candidates:
            try:
                out.append(extractor().extract_from(context, [candidate])[0].numpy().astype("float32"))
            except Exception as e:  # noqa: BLE001
                print(f"{database}: a record TVM cannot lower is left out: {str(e).splitlines()[-1][:160]}",
                      file=sys.stderr)
                out.append(None)
        return out


def fit(workloads: list[Workload], masks: list[np.ndarray]) -> ms.cost_model.XGBModel:
    """XGBModel trained on the masked records, as its update() retrains: each record labelled with its
    workload's best cost over its own (tests/test_cost_models.py checks it predicts as update() would)."""
    model = ms.cost_model.XGBModel(extractor=extractor(), adaptive_training=False, num_warmup_samples=0,
                                   num_tuning_cores=len(os.sched_getaffinity(0)))
    xs, ys = [], []
    for w, mask in zip(workloads, masks):
        if mask.any():
            costs = w.costs[mask]
            xs += [f for f, m in zip(w.features, mask) if m]
            ys.append(np.divide(costs.min(), costs, out=np.zeros_like(costs), where=costs != 0))
    model._train(xs=xs, ys=np.concatenate(ys))
    return model


def predict(model, features: list) -> np.ndarray:
    return model._predict(xs=features)


def train(paths: list[Path], out: Path, device: str | None, holdout: float, seed: int,
          command: list[str] | None = None) -> dict:
    """Trains the search's XGBModel on every record of `paths` less `holdout` of each workload's records
    (seeded), scores its ranking on those, and each workload's when trained on the other workloads only;
    writes out/model.ubj + out/MANIFEST.json; returns the manifest."""
    import xgboost

    if not 0 <= holdout < 1:
        raise UserError(f"--holdout must be in [0, 1), got {holdout}")
    t0 = time.time()
    workloads, devices = [], {}
    for database in find_databases(paths):
        name, tasks = measured_on(database, device)
        devices[str(database)] = name
        workloads += [w for w in read_workloads(database, tasks) if w.features]
    slugs = {targets.device_slug(n) for n in devices.values()}
    if len(slugs) != 1:
        raise UserError("records measured on different devices: " + ", ".join(sorted(set(devices.values()))))
    if not workloads:
        raise UserError("no tuning records in " + ", ".join(devices))
    kinds = {w.target.kind.name for w in workloads}
    if len(kinds) != 1:
        raise UserError(f"records for several target kinds ({', '.join(sorted(kinds))})")
    rng = np.random.default_rng(seed)
    held = []
    for w in workloads:
        h = np.zeros(len(w.costs), bool)
        h[rng.permutation(len(h))[:round(holdout * len(h))]] = True
        held.append(h)
    model = fit(workloads, [~h for h in held])
    entries = []
    for i, (w, h) in enumerate(zip(workloads, held)):
        entry = {"name": w.name, "database": w.database, "structural_hash": str(tvm_ffi.structural_hash(w.mod)),
                 "records": len(h), "train": int((~h).sum()), "held_out": int(h.sum())}
        if h.sum() >= 2:
            entry["held_out_scores"] = ranking(predict(model, [f for f, m in zip(w.features, h) if m]), w.costs[h])
        if len(workloads) > 1 and len(w.costs) >= 2:  # transfer: trained on the other workloads only
            others = fit(workloads, [(~hh if j != i else np.zeros_like(hh)) for j, hh in enumerate(held)])
            entry["unseen_scores"] = ranking(predict(others, w.features), w.costs)
        entries.append(entry)
        print(f"{w.database} {w.name}: {len(h)} records, {int(h.sum())} held out: "
              f"{entry.get('held_out_scores')}; as an unseen workload: {entry.get('unseen_scores')}", file=sys.stderr)

    out.mkdir(parents=True, exist_ok=True)
    model.booster.set_attr(best_score=None, best_iteration=None, best_msg=None)
    model.booster.save_model(str(out / MODEL_FILE))
    manifest = {
        "format": FORMAT,
        "device": {"name": next(iter(devices.values())), "slug": slugs.pop(), "kind": kinds.pop()},
        "target": str(workloads[0].target),
        "versions": {"tvm": tvm.__version__, "xgboost": xgboost.__version__},
        "features": feature_version(),
        "model": {"file": MODEL_FILE, "bytes": (out / MODEL_FILE).stat().st_size,
                  "trees": model.booster.num_boosted_rounds(),
                  "xgb_config": {k: v for k, v in model.config.to_dict().items() if k != "nthread"}},
        "databases": devices,
        "records": {"total": sum(len(h) for h in held), "train": sum(int((~h).sum()) for h in held),
                    "held_out": sum(int(h.sum()) for h in held)},
        "split": f"{holdout:.0%} of each workload's records held out at random (numpy default_rng({seed})); "
                 "the booster here is the one trained on the rest, the one scored",
        "scores": {
            "how": f"Kendall tau-b between predicted score and measured throughput, top-{TOP_K} recall (of the "
                   f"{TOP_K} fastest records, how many the model ranks top {TOP_K}; chance: {TOP_K}/records), "
                   "throughput of the model's first choice over the best; held_out: the records kept out; "
                   "unseen: all of a workload's records, by a model trained on the other workloads' training records only",
            "held_out": summary([e.get("held_out_scores") for e in entries]),
            "unseen": summary([e.get("unseen_scores") for e in entries])},
        "workloads": entries,
        "command": command or sys.argv,
        "created": time.strftime("%Y-%m-%d"),
        "train_wall_s": round(time.time() - t0, 1),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def ranking(predicted: np.ndarray, costs: np.ndarray) -> dict:
    """How well `predicted` (higher: faster) orders records of one workload with these measured costs."""
    from scipy.stats import kendalltau  # xgboost requires scipy

    throughput = np.where(costs < 1e10, 1.0 / costs, 0.0)
    k = min(TOP_K, len(costs))
    hits = len(set(np.argsort(-throughput)[:k]) & set(np.argsort(-predicted)[:k]))
    return {"records": len(costs), "kendall_tau": _round(kendalltau(predicted, throughput).statistic),
            "top_k_recall": _round(hits / k), "chance_recall": _round(k / len(costs)),
            "top1_throughput_ratio": _round(throughput[int(np.argmax(predicted))] / throughput.max())}


def summary(scores: list[dict | None]) -> dict | None:
    """Means over workloads (each workload counts once, whatever its record count)."""
    scores = [s for s in scores if s]
    if not scores:
        return None
    mean = lambda key: _round(np.mean([s[key] for s in scores if s[key] is not None]))
    return {"workloads": len(scores), "records": sum(s["records"] for s in scores),
            **{f"mean_{k}": mean(k) for k in ("kendall_tau", "top_k_recall", "chance_recall", "top1_throughput_ratio")}}


def _round(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else round(float(x), 4)
