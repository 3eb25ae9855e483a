"""Package a compiled module as a self-describing directory, and load one as a checked torch callable.

    <dist>/module.so        the compiled Relax module (export_library)
    <dist>/manifest.json    inputs, outputs, target and arch, versions, provenance, validation
    <dist>/database/        the MetaSchedule database the module was built from
    <dist>/<workload file>  a copy of the program it computes: `run --check` compares against it

Nothing heavy (TVM, torch) is imported at module level: the CLI imports this file for its parsers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import UserError
from .options import Evaluation, evaluation_options
from .rundir import RunDir, file_identity, write_json

MANIFEST_SCHEMA = 1
MODULE, MANIFEST, DATABASE = "module.so", "manifest.json", "database"
ALIGNMENT = 64  # what TVM's from_dlpack requires of a tensor's data ("FromDLPack: Data is not aligned")


# ---------------------------------------------------------------- packaging

def export_run(run_dir: str | Path, dist_dir: str | Path) -> dict:
    """A finished, validated run directory -> dist dir. Returns the manifest."""
    run = RunDir(Path(run_dir))
    for path, why in ((run.results, "tune writes it at the end"), (run.module, "the compiled module")):
        if not path.is_file():
            raise UserError(f"{run.root} is not a finished run directory: no {path.name} ({why})")
    try:
        res = run.read_results()
    except (ValueError, KeyError) as e:
        raise UserError(str(e)) from e
    vouched = res.module  # None in runs made before results.json named its module
    if vouched is not None and file_identity(run.module) != vouched:
        raise UserError(f"{run.module} is not the module {run.results.name} validated (its size or sha256 differs: "
                        "a tune was stopped between writing the two): run the same tune command again, then export")
    if not res.validation["passed"] and res.validation["failed"]:
        raise UserError(f"{run.root}: the module FAILED validation when it was tuned ({res.validation['failed']} "
                        f"of {res.validation['checks']} checks): it computes something else, not exporting it")
    if not res.validation["passed"]:
        raise UserError(f"{run.root}: no validation check could be made when it was tuned (the reference was NaN/Inf "
                        "everywhere: declare the inputs' domains with INPUT_DOMAINS and tune again): not exporting it")
    wl = res.workload
    source = _checked_source(Path(wl["path"]), wl["sha256"], f"the workload recorded in {run.results}")
    inputs = wl["inputs"]
    outputs = _output_specs(source if source.suffix == ".onnx" else run.onnx, {i["name"]: i["shape"] for i in inputs})
    device = res.device
    with _staged(Path(dist_dir)) as dist:
        shutil.copytree(run.database, dist / DATABASE)
        shutil.copyfile(run.module, dist / MODULE)
        module = file_identity(dist / MODULE)
        if vouched is not None and module != vouched:  # changed while being copied (another tune finishing)
            raise UserError(f"{run.module} changed while it was exported: export again")
        manifest = {
            "schema": MANIFEST_SCHEMA, "made_by": "export", "inputs": inputs, "outputs": outputs,
            "target": res.target, "target_kind": device["kind"], "arch": _arch(device),
            "device": device, "versions": res.versions,
            "workload": {**_copy_workload(source, wl["sha256"], wl["size"], wl["name"], dist),
                         "weights_sha256": wl.get("weights_sha256")},  # None where tune did not record it
            "module": module,
            "strategy": res.strategy, "trials_per_task": res.trials_per_task,
            "tasks": [{k: v for k, v in t.items() if k != "curve"} for t in res.tasks],
            "validation": res.validation, "timing": res.timing,
            "source": {"run_dir": str(run.root.resolve()), "command": res.command},
        }
        write_json(dist / MANIFEST, manifest)
    return manifest


def build(workload_path: str | Path, schedules: str | Path | None, dist_dir: str | Path, size: str = "default",
          target=None, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict:
    """Compile a workload with the records in `schedules` (a database dir or a run dir; None: no records),
    TVM's defaults for tasks without one; no search. `target`: a tvm Target (default: this machine's).
    A CUDA target builds without a GPU (cross-compilation). Returns the manifest."""
    from tvm.s_tir import meta_schedule as ms

    from . import frontend, records, target as targets, workload as workloads
    from .tune import versions

    wl = workloads.load(workload_path, size, input_shapes)
    target = target if target is not None else targets.resolve("auto")
    targets.prepare_build(target)
    database_src = _database_dir(Path(schedules)) if schedules is not None else None
    with tempfile.TemporaryDirectory() as tmp:  # the .onnx only lives until its weights are bound
        mod = frontend.import_onnx(frontend.export_onnx(wl, Path(tmp) / "model.onnx"), wl.shapes())
    fallback = "dlight default schedule" if targets.is_gpu(target) else "untuned (TVM default lowering)"
    device = (targets.facts(target) if not targets.is_gpu(target) or targets.cuda_visible()
              else {"kind": target.kind.name, "arch": str(target.arch), "name": "none at build time (cross-compiled)"})
    run_config = Path(schedules) / "run.json" if schedules is not None else None
    with _staged(Path(dist_dir)) as dist:
        # Build from the copy: what the dist holds is exactly what the module was built from.
        if database_src is not None:
            shutil.copytree(database_src, dist / DATABASE)
        else:
            (dist / DATABASE).mkdir()
        # Not TVM's JSONDatabase loader: it re-applies the traces in threads to one shared module, which
        # some traces change in place (records.py): the H200 layernorm database corrupted the heap.
        database = records.load(dist / DATABASE) if database_src is not None else ms.database.MemoryDatabase()
        extracted = frontend.extract_tasks(mod, target)
        _check_records_target(database, extracted, target, schedules)
        tasks = [_task_entry(database, t, target, fallback) for t in extracted]
        frontend.compile_module(mod, target, database).export_library(str(dist / MODULE))
        manifest = {
            "module": file_identity(dist / MODULE),
            "schema": MANIFEST_SCHEMA, "made_by": "build",
            "inputs": [{"name": n, "shape": list(s), "dtype": _dtype_name(d)}
                       for n, (s, d) in zip(wl.input_names, wl.input_specs)],
            "outputs": _ret_specs(mod),
            "target": str(target), "target_kind": device["kind"], "arch": _arch(device),
            "device": device, "versions": versions(),
            "workload": {**_copy_workload(wl.path, wl.sha256, wl.size, wl.name, dist),
                         "weights_sha256": wl.weights_sha256},
            "strategy": (json.loads(run_config.read_text()).get("strategy")
                         if run_config is not None and run_config.is_file() else None),
            "trials_per_task": None,
            "tasks": tasks,
            "validation": None, "timing": None,  # `schedsearch run DIST --check` measures both
            "source": {"schedules": str(Path(schedules).resolve()) if schedules is not None else None,
                       "command": sys.argv},
        }
        write_json(dist / MANIFEST, manifest)
    return manifest


@contextlib.contextmanager
def _staged(dist: Path):
    """Write into a sibling folder, then swap it in: a failure never leaves half a dist dir, and an
    earlier dist dir is replaced whole (never merged). Someone's folder of other things is refused."""
    if dist.exists() and not dist.is_dir():
        raise UserError(f"{dist} exists and is not a directory")
    if dist.is_dir() and any(dist.iterdir()) and not (dist / MANIFEST).is_file():
        raise UserError(f"{dist} is not empty and holds no {MANIFEST}: choose another -o")
    dist.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dist.name}.", dir=dist.parent))
    old = dist.with_name(f".{dist.name}.old.{os.getpid()}")
    try:
        yield stage
        if dist.exists():  # renames only: a kill leaves the old dist dir, or the new one, never a mix
            dist.rename(old)
        stage.rename(dist)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _checked_source(path: Path, sha256: str, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{what} is missing: {path}")
    if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise UserError(f"{what}, {path}, changed since it was compiled (sha256 differs): "
                        "the module would be checked against another program")
    return path


def _copy_workload(path: Path, sha256: str, size: str, name: str, dist: Path) -> dict:
    files = [path.name]
    if path.suffix == ".onnx":  # its weights may live in files beside it, named relative to it
        import onnx

        model = onnx.load(str(path), load_external_data=False)
        files += sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    for file in files:
        (dist / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path.parent / file, dist / file)
    return {"name": name, "size": size, "path": str(path.resolve()), "file": path.name, "sha256": sha256}


def _database_dir(schedules: Path) -> Path:
    for d in (schedules / "database", schedules):
        if (d / "database_workload.json").is_file() and (d / "database_tuning_record.json").is_file():
            return d
    raise UserError(f"{schedules}: no MetaSchedule database (database_workload.json and "
                    "database_tuning_record.json, in it or in its database/ folder)")


def _check_records_target(database, tasks, target, schedules) -> None:
    """A CUDA schedule applied for a CPU (or the reverse) fails deep in TVM's lowering ("Unknown device
    id in current IR" for thread bindings on llvm): refuse it here, in one line."""
    from . import target as targets

    for task in tasks:
        record = database.query_tuning_record(task.mod, target, task.name)
        if record is not None and record.target is not None and record.target.kind.name != target.kind.name:
            gpu = targets.is_gpu(record.target)
            tuned = record.target.kind.name + (f" {record.target.arch}" if gpu else "")
            hint = (" and no CUDA GPU is visible here: build on a machine with that GPU, or from Python with "
                    "export.build(..., target=tvm.target.Target(...)) to cross-compile"
                    if gpu and not targets.cuda_visible() else "")
            raise UserError(f"{schedules}: task {task.name} was tuned for {tuned}, this build is for "
                            f"{target.kind.name}{hint}")


def _task_entry(database, task, target, fallback: str) -> dict:
    record = database.query_tuning_record(task.mod, target, task.name)
    records = (len(database.get_top_k(database.commit_workload(task.mod), 1 << 30))
               if database.has_workload(task.mod) else 0)
    best_us = (1e6 * sum(float(s) for s in record.run_secs) / len(record.run_secs)
               if record is not None and record.run_secs else None)
    return {"name": task.name, "weight": task.weight, "flops": task.flops,
            "schedule": "tuned (database record)" if record is not None else fallback,
            "records": records, "best_us": best_us}


def _output_specs(onnx_path: Path, shapes: dict[str, list[int]]) -> list[dict]:
    from . import frontend

    return _ret_specs(frontend.import_onnx(onnx_path, shapes))


def _ret_specs(mod) -> list[dict]:
    ret = mod["main"].ret_ty
    fields = list(ret.fields) if hasattr(ret, "fields") else [ret]
    return [{"shape": [int(v) for v in f.shape.values], "dtype": str(f.dtype)} for f in fields]


def _arch(device: dict) -> str:
    from . import target as targets

    return device["arch"] if targets.kind(device["kind"]).gpu else device["machine"]


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- loading

def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    if not (root / MANIFEST).is_file():
        if RunDir(root).results.is_file():
            dist = Path("dist") / root.resolve().name  # export's default
            raise UserError(f"{root} is a run directory of `schedsearch tune`, not an exported module: export it "
                            f"with `schedsearch export {root} -o {dist}`, then `schedsearch run {dist}`")
        raise UserError(f"{root} is not an exported module: no {MANIFEST} "
                        f"(make one with `schedsearch export RUN_DIR -o {root}` or `schedsearch build`)")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{root / MANIFEST}: not valid JSON ({e})") from e
    if manifest.get("schema") != MANIFEST_SCHEMA:
        raise UserError(f"{root / MANIFEST}: schema {manifest.get('schema')}, this schedsearch reads {MANIFEST_SCHEMA}")
    if not (root / MODULE).is_file():
        raise UserError(f"{root}: {MODULE} is missing")
    return manifest


def _check_module_file(root: Path, manifest: dict) -> None:
    """Before loading: a cut or changed module.so kills the loading process (SIGBUS, rc 135, not an exception:
    issue 23), so compare it with the size and sha256 the manifest holds (manifests made before it held
    them are not checked)."""
    want = manifest.get("module")
    if not want:
        return
    size = (root / MODULE).stat().st_size
    if size != want["bytes"]:
        raise UserError(f"{root / MODULE} is {size} bytes, the manifest says {want['bytes']} (cut short by a full "
                        "disk or an interrupted copy?): export or build it again")
    if file_identity(root / MODULE)["sha256"] != want["sha256"]:
        raise UserError(f"{root / MODULE} changed since it was exported (sha256 differs from the manifest's): "
                        "export or build it again")


def arch_problem(arch: str, compute_version: str) -> str | None:
    """Why a cubin for `arch` (sm_90a) cannot run on a GPU of `compute_version` ("9.0"), or None.
    TVM emits one cubin (nvrtc): it runs on the same major version with an equal or newer minor,
    and the arch-specific "a" variants only on exactly their own version."""
    m = re.fullmatch(r"sm_(\d+)(a?)", arch)
    if m is None:
        return None  # a spelling we don't know: let the driver decide
    need = divmod(int(m[1]), 10)
    have = tuple(int(x) for x in compute_version.split("."))
    need_text = f"{need[0]}.{need[1]}"
    if have < need:
        return f"compiled for {arch} (compute capability {need_text}) but this GPU is older ({compute_version})"
    if m[2] and have != need:
        return (f"compiled for {arch}, whose arch-specific code runs only on compute capability {need_text}, "
                f"but this GPU has {compute_version}")
    if have[0] != need[0]:
        return f"compiled for {arch}, which runs only on compute capability {need[0]}.x, but this GPU has {compute_version}"
    return None


def _check_device(root: Path, manifest: dict) -> None:
    arch = manifest["arch"]
    from . import target as targets

    if not targets.kind(manifest["target_kind"]).gpu:
        if arch != platform.machine():
            raise UserError(f"{root} was compiled for {arch} CPUs, this machine is {platform.machine()}")
        missing = targets.missing_cpu_features(_manifest_target(manifest))
        if missing:  # it would die of SIGILL at its first call
            wl = manifest["workload"]
            raise UserError(f"{root} was compiled for {manifest['device'].get('mcpu') or 'another CPU'}, which has "
                            f"{', '.join(missing)}; this CPU does not: rebuild it here: schedsearch build "
                            f"{root / wl['file']} --size {wl['size']} --schedules {root / DATABASE} -o DIR")
        return

    if not targets.cuda_visible():
        raise UserError(f"{root} was compiled for CUDA ({arch}, {manifest['device'].get('name')}), "
                        "but no CUDA GPU is visible on this machine")
    import tvm

    problem = arch_problem(arch, tvm.cuda(0).compute_version)
    if problem:
        wl = manifest["workload"]
        raise UserError(f"{root}: {problem} ({tvm.cuda(0).device_name}); rebuild it for this GPU: schedsearch build "
                        f"{root / wl['file']} --size {wl['size']} --schedules {root / DATABASE} --target cuda -o DIR")


def _manifest_target(manifest: dict):
    import tvm

    try:
        return tvm.target.Target(json.loads(manifest["target"]))
    except (ValueError, TypeError, RuntimeError) as e:
        raise UserError(f"the manifest's target {manifest['target']!r} does not parse ({e})") from e


class ExportedModule:
    """A dist dir as a function: torch tensors in, a tensor (one output) or a tuple (several) out.
    Every call checks the inputs against the manifest. Contiguous tensors on the module's device
    are passed by DLPack, without copies; a non-contiguous one is refused, not silently copied."""

    def __init__(self, root: Path, manifest: dict):
        import tvm

        from . import target as targets
        from .runtime import CompiledModule

        self.root, self.manifest = root, manifest
        kind = targets.kind(manifest["target_kind"])
        # as PyTorch names a tensor's device: with its index on a GPU ("cuda:0"), none on the CPU ("cpu")
        self.device = f"{kind.device}:0" if kind.gpu else kind.device
        try:
            lib = tvm.runtime.load_module(str(root / MODULE))
        except Exception as e:
            lines = str(e).strip().splitlines()
            raise UserError(f"{root / MODULE} does not load with TVM {tvm.__version__} (built with "
                            f"{manifest['versions'].get('tvm')}): {lines[-1] if lines else type(e).__name__}") from e
        self.compiled = CompiledModule(lib, self.device)

    def __call__(self, *inputs):
        self.check_inputs(inputs)
        outs = self.compiled(*[x.detach() for x in inputs])  # detach: a view, DLPack refuses grad tensors
        return outs[0] if len(self.manifest["outputs"]) == 1 else tuple(outs)

    def check_inputs(self, inputs) -> None:
        import torch

        specs = self.manifest["inputs"]
        if len(inputs) != len(specs):
            raise UserError(f"{self.root.name}: expected {len(specs)} input{'s' * (len(specs) != 1)} "
                            f"({', '.join(s['name'] for s in specs)}), got {len(inputs)}")
        for i, (x, spec) in enumerate(zip(inputs, specs)):
            want = f"{tuple(spec['shape'])} {spec['dtype']} on {self.device}"
            if not isinstance(x, torch.Tensor):
                raise UserError(f"input {i} ({spec['name']}): expected a torch.Tensor of shape {want}, "
                                f"got {type(x).__name__}")
            if (tuple(x.shape) != tuple(spec["shape"]) or _dtype_name(x.dtype) != spec["dtype"]
                    or x.device != torch.device(self.device)):
                raise UserError(f"input {i} ({spec['name']}): expected shape {want}, "
                                f"got {tuple(x.shape)} {_dtype_name(x.dtype)} on {x.device}")
            if not x.is_contiguous():
                raise UserError(f"input {i} ({spec['name']}): not contiguous (strides {x.stride()}); the module "
                                "reads the caller's memory in place: pass x.contiguous()")
            if x.numel() and x.data_ptr() % ALIGNMENT:
                raise UserError(f"input {i} ({spec['name']}): its data is not {ALIGNMENT}-byte aligned (a view at "
                                "an offset into another tensor?); the module reads it in place: pass x.clone()")

    def __repr__(self) -> str:
        io = lambda specs: ", ".join(f"{tuple(s['shape'])} {s['dtype']}" for s in specs)
        return f"<schedsearch module {self.root} on {self.device}: ({io(self.manifest['inputs'])}) -> " \
               f"({io(self.manifest['outputs'])})>"


def load(path: str | Path) -> ExportedModule:
    root = Path(path)
    manifest = read_manifest(root)
    _check_device(root, manifest)
    _check_module_file(root, manifest)
    return ExportedModule(root, manifest)


# ---------------------------------------------------------------- checking

def check(path: str | Path, seeds: int = Evaluation.validation_seeds, repeats: int = Evaluation.repeats) -> dict:
    """Validate a dist dir against its copy of the workload (several seeds and distributions)
    and time it against PyTorch eager: evaluate.evaluate's dict."""
    from .evaluate import evaluate

    module, workload = _load_with_workload(path)
    return evaluate(workload, module.compiled, seeds=seeds, repeats=repeats)


def time_only(path: str | Path, repeats: int = Evaluation.repeats) -> dict:
    """Time a dist dir and PyTorch eager on the workload's inputs, without validating."""
    from .evaluate import time_against_eager

    module, workload = _load_with_workload(path)
    return time_against_eager(workload, module.compiled, repeats)


def _load_with_workload(path: str | Path):
    from . import workload as workloads

    module = load(path)
    wl, inputs = module.manifest["workload"], module.manifest["inputs"]
    source = _checked_source(module.root / wl["file"], wl["sha256"], f"the workload copy in {module.root}")
    workload = workloads.load(source, wl["size"], {i["name"]: tuple(i["shape"]) for i in inputs})
    compiled, now = wl.get("weights_sha256"), workload.weights_sha256
    if compiled is not None and compiled != now:
        raise UserError(f"{source} builds a model with other weights than the ones compiled into {module.root} "
                        "(drawn at random with another seed or torch version?): checking against it would "
                        "compare two different programs")
    if compiled is None and workload.model is not None and len(workload.model.state_dict()):
        print(f"schedsearch: warning: {module.root}'s manifest has no weights fingerprint: if validation fails, "
              "the reference model may have drawn other random weights than the compiled ones", file=sys.stderr)
    return module, workload


# ---------------------------------------------------------------- command line

def add_commands(sub) -> dict:
    """Adds export, build and run to an argparse subparsers object; returns {command: handler}."""
    from .options import add_evaluation_options, add_target_options, shape_arg

    e = sub.add_parser("export", help="package a tuned run directory as a loadable module")
    e.add_argument("run_dir", help="run directory written by `schedsearch tune`")
    e.add_argument("-o", "--output", help="dist directory (default dist/<run dir name>)")

    b = sub.add_parser("build", help="compile a workload from a tuning database, without search")
    b.add_argument("workload", help="KernelBench-format .py problem file or .onnx file")
    b.add_argument("--schedules", required=True, metavar="DIR", help="a run directory or a MetaSchedule database")
    b.add_argument("-o", "--output", help="dist directory (default dist/<workload>)")
    b.add_argument("--size", default="default", help="workload size from its SIZES dict, e.g. small")
    add_target_options(b, cross_compile=False)
    b.add_argument("--input-shape", type=shape_arg, action="append", default=[],
                   help="NAME=D0,D1,... for an ONNX input with dynamic dimensions (repeatable)")

    r = sub.add_parser("run", help="time an exported module against PyTorch eager; --check validates it too")
    r.add_argument("dist", help="dist directory written by export or build")
    r.add_argument("--check", action="store_true", help="validate against the PyTorch reference first")
    add_evaluation_options(r)
    return {"export": cmd_export, "build": cmd_build, "run": cmd_run}


def cmd_export(args) -> int:
    out = Path(args.output or f"dist/{Path(args.run_dir).resolve().name}")
    manifest = export_run(args.run_dir, out)
    v = manifest["validation"]
    print(f"exported {manifest['workload']['name']} ({manifest['target_kind']}, {manifest['arch']}) -> {out}; "
          f"validation at tuning time: {'passed' if v['passed'] else 'FAILED'}")
    return 0


def cmd_build(args) -> int:
    from . import target as targets
    from .report import table

    out = Path(args.output or f"dist/{Path(args.workload).stem}")
    manifest = build(args.workload, args.schedules, out, args.size, targets.resolve(args.target),
                     dict(args.input_shape))
    print(table(["task", "weight", "schedule"], [[t["name"], t["weight"], t["schedule"]] for t in manifest["tasks"]]))
    print(f"built {manifest['workload']['name']} ({manifest['target_kind']}, {manifest['arch']}) -> {out}; "
          f"not validated yet: schedsearch run {out} --check")
    return 0


def cmd_run(args) -> int:
    from .report import fmt_us, speedup_text

    if args.check:
        evaluation = evaluation_options(args)
        measured = check(args.dist, seeds=evaluation.validation_seeds, repeats=evaluation.repeats)
        from .validate import verdict

        v, tm = measured["validation"], measured["timing"]
        print(f"validation: {verdict(v)}: {v['checks']} checks (seeds {v['seeds']}, {', '.join(v['distributions'])}), "
              f"max abs {v['max_abs']:.2e}, max rel {v['max_rel']:.2e}, normwise {v['rel_l2']:.2e}, "
              f"tolerance {v['tolerance']:g}")
        for f in v["failures"]:
            print(f"  seed {f['seed']} {f['distribution']}: {f['problem']}")
    else:
        v, tm = None, time_only(args.dist, repeats=evaluation_options(args).repeats)
    line = f"TVM median {fmt_us(tm['tvm']['median_us'])}"
    if "torch_eager" in tm:
        line += f", PyTorch eager {fmt_us(tm['torch_eager']['median_us'])}; {speedup_text(tm)}"
    print(line)
    return 0 if v is None or v["passed"] else 1
