"""`schedsearch compare`: every strategy x seed on every workload at the same trial budget, each arm in
its own run dir with its own database, plus PyTorch baselines timed the same way in the same process;
then the report. `schedsearch report` rebuilds the report from what is stored here, tuning nothing.

    OUT/compare.json                        the experiment: workloads, strategies, seeds, budget, command
    OUT/<workload>/<strategy>-s<seed>/      one run dir per arm (see rundir.py)
    OUT/<workload>/<strategy>-s<seed>/reused.json   where --arms-from copied that arm from
    OUT/<workload>/<strategy>-s<seed>/error.txt     why the arm's last attempt failed (removed on success)
    OUT/<workload>/baselines.json           PyTorch eager / torch.compile timings, tensor bytes
    OUT/report.md, OUT/report.html, OUT/plots/*.png
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from . import strategies as known_strategies
from .baselines import same_baselines, time_baselines
from .errors import INTERRUPTED, DamagedFile, UserError
from .options import (Evaluation, Tuning, add_cost_model_option, add_evaluation_options, add_library_option,
                      add_llm_options, add_runner_option, add_shared_memory_option, evaluation_options, llm_options,
                      positive, strategy_options, tuning_options)
from .rundir import Results, RunDir, write_json

SCHEMA = 1


def add_commands(sub) -> dict:
    """Adds `compare` and `report` to the CLI's subparsers; returns {command: handler(args) -> exit code}."""
    c = sub.add_parser("compare", help="tune workloads with several strategies and seeds at equal budgets, "
                                       "time PyTorch baselines, write a report")
    c.add_argument("workloads", nargs="+", help="KernelBench-format .py problem files")
    c.add_argument("-o", "--output", required=True, help="comparison directory")
    c.add_argument("--strategies", default="ansor,llm",
                   help=f"comma-separated: {', '.join(known_strategies.NAMES)} (default ansor,llm)")
    c.add_argument("--trials", type=positive, default=Tuning.trials,
                   help=f"hardware measurements per task and arm (default {Tuning.trials})")
    c.add_argument("--seeds", type=positive, default=3, help="search seeds per strategy: 0..N-1 (default 3)")
    c.add_argument("--size", default="default", help="workload size from each file's SIZES dict, e.g. small")
    c.add_argument("--target", default="auto", help="auto | llvm | cuda | 'llvm -mcpu=CPU ...'")
    add_evaluation_options(c)
    c.add_argument("--arms-from", metavar="DIR", help="copy finished arms of an earlier comparison instead of tuning")
    c.add_argument("--parallel", type=positive, default=1, metavar="N",
                   help="run N jobs at once, one process each, CPU cores split between them; on CUDA each "
                        "process gets its own GPU (default 1). On CPU targets parallel measurements disturb "
                        "each other: use it there for smoke tests only")
    c.add_argument("--no-compile-baselines", action="store_true", help="time PyTorch eager only, not torch.compile")
    _add_peak_options(c)
    add_runner_option(c)
    add_cost_model_option(c)
    add_shared_memory_option(c)
    add_library_option(c)
    add_llm_options(c)

    r = sub.add_parser("report", help="rebuild report.md and report.html of a comparison from its stored results")
    r.add_argument("output", help="comparison directory (compare -o)")
    _add_peak_options(r)
    return {"compare": cmd_compare, "report": cmd_report}


def _add_peak_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peak-tflops", type=float, help="peak fp32 TFLOP/s for the roofline (default: datasheet table)")
    p.add_argument("--peak-gbs", type=float, help="peak memory bandwidth in GB/s for the roofline")


def cmd_compare(args) -> int:
    from .llm_client import PendingResponses

    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    _check_strategies(strategies)
    tuning, llm = tuning_options(args, strategies[0], 0), llm_options(args)
    out = Path(args.output)
    summary = compare(args.workloads, out, strategies, args.seeds, tuning, evaluation_options(args),
                      size=args.size, target_name=args.target,
                      strategy_options={s: strategy_options(args, s, llm) for s in strategies},
                      arms_from=Path(args.arms_from) if args.arms_from else None,
                      compile_baselines=not args.no_compile_baselines,
                      peaks={"tflops": args.peak_tflops, "gbs": args.peak_gbs},
                      command=args.command_line, parallel=args.parallel)
    paths = write_report(out)
    print(f"report: {', '.join(map(str, paths))}", file=sys.stderr)
    for arm, error in summary["errors"].items():
        print(f"schedsearch: error: arm {arm} failed: {error.splitlines()[-1]}", file=sys.stderr)
    for arm in summary["invalid"]:
        print(f"schedsearch: error: VALIDATION FAILED for arm {arm}", file=sys.stderr)
    if summary["pending"]:  # files backend: answer the requests, then run compare again to go on
        first = summary["pending"][0]
        raise PendingResponses(first.directory, [p for e in summary["pending"] for p in e.paths])
    return 1 if summary["errors"] or summary["invalid"] else 0


def cmd_report(args) -> int:
    paths = write_report(Path(args.output), {"tflops": args.peak_tflops, "gbs": args.peak_gbs})
    print("\n".join(map(str, paths)))
    return 0


def _check_strategies(strategies: list[str]) -> None:
    unknown = [s for s in strategies if s not in known_strategies.NAMES]
    if unknown or not strategies:
        raise UserError(f"--strategies: unknown {', '.join(unknown) or '(none given)'}: "
                        f"choose from {', '.join(known_strategies.NAMES)}")
    if len(set(strategies)) != len(strategies):
        raise UserError(f"--strategies names a strategy twice: {','.join(strategies)}")


def arm_name(strategy: str, seed: int) -> str:
    return f"{strategy}-s{seed}"


def compare(workload_paths: list[str], out: Path, strategies: list[str], seeds: int, tuning: Tuning = Tuning(),
            evaluation: Evaluation = Evaluation(), *, size: str = "default", target_name: str = "auto",
            strategy_options: dict[str, dict] | None = None, arms_from: Path | None = None, compile_baselines: bool = True,
            peaks: dict | None = None, command: list[str] | None = None, parallel: int = 1) -> dict:
    """Runs (or resumes) every arm and the baselines. Returns {"errors": {arm: traceback}, "invalid": [arm],
    "pending": [PendingResponses]}: one arm failing does not stop the others. `tuning`: every arm's, each with
    its own strategy and seed 0..seeds-1; `strategy_options`: {strategy: its options (options.strategy_options)}."""
    trials = tuning.trials
    from . import cost_models, target as targets, workload as workloads
    from .shared_memory import search_limit as shared_memory_limit
    from .llm_client import PendingResponses

    _check_strategies(strategies)
    if arms_from is not None and not (arms_from / "compare.json").is_file():
        raise UserError(f"--arms-from {arms_from}: not a comparison directory (no compare.json)")
    loaded = [workloads.load(p, size) for p in workload_paths]
    names = [w.name for w in loaded]
    if len(set(names)) != len(names):
        raise UserError(f"two workloads share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}): "
                        "their run dirs would collide")
    target = targets.resolve(target_name)
    if targets.is_gpu(target) and not targets.gpu_here(target):
        raise UserError(f"--target {target_name}: compare times PyTorch's baselines on the GPU itself, and "
                        f"{targets.facts(target)['name']} is not on this machine: run it on that GPU's host "
                        "(`schedsearch tune --runner rpc://...` tunes for it from here)")
    cost_models.start(tuning.cost_model, target)  # a bad --cost-model fails before any work (each arm starts its own)
    shared_memory_limit(tuning.shared_memory, target, "hybrid")  # a bad --shared-memory too
    for wl in loaded:  # refuse a mismatched directory before writing anything into it
        for strategy in strategies:
            for seed in range(seeds):
                finished(RunDir(out / wl.name / arm_name(strategy, seed)), wl, target, trials)
    out.mkdir(parents=True, exist_ok=True)
    old = json.loads((out / "compare.json").read_text()) if (out / "compare.json").is_file() else {}
    write_json(out / "compare.json", {
        "schema": SCHEMA, "command": command or sys.argv,
        "commands": [*old.get("commands", []), command or sys.argv],  # every invocation: resumed runs show all
        "strategies": strategies, "seeds": list(range(seeds)),
        "trials_per_task": trials, "size": size, "target": str(target),
        "workloads": [{"name": w.name, "path": str(w.path)} for w in loaded],
        "validation_seeds": evaluation.validation_seeds, "repeats": evaluation.repeats,
        "compile_baselines": compile_baselines,
        "peaks": peaks or {},
        **{s: {k: v for k, v in o.items() if k != "client"} for s, o in (strategy_options or {}).items() if o},
        "arms_from": str(arms_from) if arms_from else None, "parallel": parallel, "cost_model": tuning.cost_model})

    jobs = []  # baselines first: on several GPUs they then run while the first arms tune
    for wl in loaded:
        if not same_baselines(out / wl.name / "baselines.json", wl, target, compile_baselines):
            jobs.append({"kind": "baselines", "workload": wl.name})
    for wl in loaded:
        for strategy in strategies:
            for seed in range(seeds):
                run = RunDir(out / wl.name / arm_name(strategy, seed))
                if arms_from is not None and finished(run, wl, target, trials) is None:
                    _reuse(RunDir(arms_from / wl.name / arm_name(strategy, seed)), run, wl, target, trials)
                results = finished(run, wl, target, trials)
                if results is None:
                    jobs.append({"kind": "arm", "workload": wl.name, "strategy": strategy, "seed": seed})
                else:
                    print(f"{wl.name}/{arm_name(strategy, seed)}: finished earlier, skipped", file=sys.stderr)
    settings = {"out": str(out), "workloads": {w.name: str(w.path) for w in loaded}, "size": size,
                "target": target.kind.name, "target_str": str(target), "tuning": tuning, "evaluation": evaluation,
                "strategy_options": strategy_options or {}, "compile_baselines": compile_baselines, "command": command}
    if parallel > 1:
        outcomes = _run_parallel(jobs, settings, parallel, gpu=targets.is_gpu(target))
    else:
        context = {"workloads": {w.name: w for w in loaded}, "target": target}
        outcomes = []
        for job in jobs:
            outcomes.append(_run_job(job, settings, context))
            if outcomes[-1].get("user_error"):  # configuration the user must fix: later arms would fail alike
                break

    summary = {"errors": {}, "invalid": [], "pending": []}
    for o in outcomes:
        if o.get("user_error"):
            raise UserError(o["user_error"])
        if o.get("pending"):
            summary["pending"].append(PendingResponses(*o["pending"]))
        elif o.get("error"):
            summary["errors"][o["label"]] = o["error"]
    for wl in loaded:  # arms finished earlier count too
        for strategy in strategies:
            for seed in range(seeds):
                results = finished(RunDir(out / wl.name / arm_name(strategy, seed)), wl, target, trials)
                if results is not None and not results.validation["passed"]:
                    summary["invalid"].append(f"{wl.name}/{arm_name(strategy, seed)}")
    return summary


def _run_job(job: dict, settings: dict, context: dict) -> dict:
    """One baseline timing or one arm. Returns {"label", and "error" | "user_error" | "pending" if any}."""
    from .llm_client import PendingResponses, TranscriptExhausted
    from .tune import tune_workload

    out, wl, target = Path(settings["out"]), context["workloads"][job["workload"]], context["target"]
    if job["kind"] == "baselines":
        label = f"{wl.name}/baselines"
        print(f"timing PyTorch baselines for {wl.name}", file=sys.stderr)
        try:
            (out / wl.name).mkdir(parents=True, exist_ok=True)
            write_json(out / wl.name / "baselines.json",
                       time_baselines(wl, target, settings["evaluation"].repeats, settings["compile_baselines"]))
        except Exception:
            return {"label": label, "error": traceback.format_exc()}
        return {"label": label}
    strategy, seed = job["strategy"], job["seed"]
    tuning = replace(settings["tuning"], strategy=strategy, seed=seed)
    label = f"{wl.name}/{arm_name(strategy, seed)}"
    run = RunDir(out / wl.name / arm_name(strategy, seed))
    print(f"{label}: tuning with {strategy}, seed {seed}, {tuning.trials} trials per task", file=sys.stderr)
    try:
        tune_workload(wl, target, run, tuning, settings["evaluation"],
                      strategy_options=settings["strategy_options"].get(strategy) or None, command=settings["command"])
    except PendingResponses as e:
        return {"label": label, "pending": (e.directory, e.paths)}
    except TranscriptExhausted as e:  # a transcript of other workloads, not a setting wrong for every arm
        run.create()
        (run.root / "error.txt").write_text(f"{e}\n")
        print(f"{label}: FAILED: {e}", file=sys.stderr)
        return {"label": label, "error": str(e)}
    except UserError as e:
        return {"label": label, "user_error": str(e)}
    except Exception:  # a crash in one arm (TVM, a worker) must not cost the others
        if INTERRUPTED.is_set():  # Ctrl-C, come back out of TVM as another error: stop, don't record
            raise KeyboardInterrupt from None
        error = traceback.format_exc()
        run.create()
        (run.root / "error.txt").write_text(error)
        print(f"{label}: FAILED: {error.strip().splitlines()[-1]}", file=sys.stderr)
        return {"label": label, "error": error}
    (run.root / "error.txt").unlink(missing_ok=True)
    return {"label": label}


# Parallel jobs: one process per GPU (each sees only its GPU, as device 0), the CPU cores split between
# them for building; each process imports TVM once and takes jobs from a shared queue. A job's console
# output goes to a log file in the comparison dir; this process prints one line when a job starts and ends.
def _worker_main(slot: dict, settings: dict, jobs, results) -> None:
    import os
    import signal
    import time

    # Ctrl-C reaches every process of the terminal; the parent decides and sends SIGUSR1: stop taking
    # jobs and end the search after the round in flight (see errors.py).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, lambda *_: INTERRUPTED.set())
    from .measure import worker_setup  # dies with the parent, as the pools' workers do (a kill -9 of compare)

    import multiprocessing

    worker_setup(multiprocessing.parent_process().pid)
    if slot["gpu"] is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot["gpu"]
    os.sched_setaffinity(0, slot["cpus"])
    from . import target as targets, workload as workloads

    where = f"[gpu {slot['gpu']}]" if slot["gpu"] is not None else f"[worker {slot['index']}]"
    say = lambda text: os.write(terminal, f"{where} {text}\n".encode())
    terminal = os.dup(2)
    try:
        target = targets.resolve(settings["target"])
        if str(target) != settings["target_str"]:
            raise UserError(f"GPU {slot['gpu']} differs from the first GPU: {target} vs {settings['target_str']}")
        context = {"target": target,
                   "workloads": {n: workloads.load(p, settings["size"]) for n, p in settings["workloads"].items()}}
        while not INTERRUPTED.is_set() and (job := jobs.get()) is not None:
            name = "baselines" if job["kind"] == "baselines" else arm_name(job["strategy"], job["seed"])
            log = Path(settings["out"]) / job["workload"] / (f"{name}.log" if job["kind"] == "baselines"
                                                              else f"{name}/console.log")
            log.parent.mkdir(parents=True, exist_ok=True)
            say(f"{job['workload']}/{name}: started (log: {log})")
            t0 = time.time()
            with open(log, "a") as f:
                os.dup2(f.fileno(), 1), os.dup2(f.fileno(), 2)
                try:
                    outcome = _run_job(job, settings, context)
                finally:
                    sys.stdout.flush(), sys.stderr.flush()
                    os.dup2(terminal, 1), os.dup2(terminal, 2)
            results.put(outcome)
            status = ("FAILED: " + outcome["error"].strip().splitlines()[-1] if outcome.get("error")
                      else "error: " + outcome["user_error"] if outcome.get("user_error")
                      else "waiting for LLM responses" if outcome.get("pending") else "done")
            say(f"{job['workload']}/{name}: {status} ({time.time() - t0:.0f} s)")
        if INTERRUPTED.is_set():
            say("interrupted")
    except KeyboardInterrupt:  # a search ended by SIGUSR1; what was measured is in the run dirs
        say("interrupted")
    except Exception as e:
        say(f"worker failed: {type(e).__name__}: {e}")
        results.put({"label": where, "error": traceback.format_exc()})
    results.put(None)  # this worker is done


STOP_WAIT_S = 300  # a round of a slow GPU task (bad 4096³ matmul candidates) takes up to ~150 s


def _run_parallel(jobs: list[dict], settings: dict, n: int, gpu: bool) -> list[dict]:
    import multiprocessing
    import os
    import signal

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < n:
        raise UserError(f"--parallel {n}: this process may use only {len(cpus)} CPU cores")
    gpus = [None] * n
    if gpu:
        import tvm

        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(n) if tvm.cuda(i).exist]
        if len(gpus) < n:
            raise UserError(f"--parallel {n}: only {len(gpus)} GPU(s) visible")
    ctx = multiprocessing.get_context("spawn")  # fresh processes: CUDA and TVM state do not survive fork
    queue, results = ctx.Queue(), ctx.Queue()
    for job in jobs:
        queue.put(job)
    for _ in range(n):
        queue.put(None)
    print(f"{len(jobs)} job(s) on {n} parallel workers" + (f" (GPUs {','.join(gpus[:n])})" if gpu else ""),
          file=sys.stderr)
    workers = [ctx.Process(target=_worker_main, args=({"index": i, "gpu": gpus[i],
                                                         "cpus": cpus[i * len(cpus) // n:(i + 1) * len(cpus) // n]},
                                                        settings, queue, results)) for i in range(n)]
    for w in workers:
        w.start()
    outcomes, running = [], n
    try:
        while running:
            outcome = results.get()
            if outcome is None:
                running -= 1
            else:
                outcomes.append(outcome)
    except KeyboardInterrupt:
        print("schedsearch: waiting for the workers to end their rounds in flight (Ctrl-C again: at once)",
              file=sys.stderr)
        for w in workers:
            if w.is_alive():
                os.kill(w.pid, signal.SIGUSR1)
        try:
            for w in workers:
                w.join(timeout=STOP_WAIT_S)
        except KeyboardInterrupt:
            pass
        for w in workers:
            if w.is_alive():
                w.terminate()
        raise KeyboardInterrupt from None
    for w in workers:
        w.join()
    return outcomes


def finished(run: RunDir, workload, target, trials: int) -> Results | None:
    """The arm's results if it already spent exactly this budget on this workload/size/target, else None."""
    if not run.results.is_file():
        return None
    try:
        res = run.read_results()
    except DamagedFile as e:  # the arm is tuned again: it spends only the trials still missing, then rewrites it
        print(f"schedsearch: warning: {e.path} is damaged: rebuilding it from the arm's database", file=sys.stderr)
        return None
    if (res.workload["sha256"], res.workload["size"], res.target) != (workload.sha256, workload.size, str(target)):
        raise UserError(f"{run.root} holds a run of another workload, size or target: choose another -o")
    if res.trials_per_task > trials:
        raise UserError(f"{run.root} already spent {res.trials_per_task} trials per task, more than --trials "
                        f"{trials}: an unequal budget is no comparison; choose another -o or --trials")
    return res if res.trials_per_task == trials else None


def _reuse(source: RunDir, run: RunDir, workload, target, trials: int) -> None:
    try:
        usable = finished(source, workload, target, trials) is not None
    except UserError:  # another workload, target or budget there: tune this arm here instead
        usable = False
    if not usable:
        return
    if run.root.exists():
        shutil.rmtree(run.root)
    shutil.copytree(source.root, run.root)
    (run.root / "error.txt").unlink(missing_ok=True)
    if not (run.root / "reused.json").exists():  # keep the first origin when an arm is reused twice
        write_json(run.root / "reused.json", {"from": str(source.root.resolve())})
    print(f"{run.root}: copied from {source.root}", file=sys.stderr)


def load(out: Path) -> dict:
    """Everything the report reads, from the comparison directory alone."""
    path = out / "compare.json"
    if not path.is_file():
        raise UserError(f"{out}: not a comparison directory (no compare.json): run `schedsearch compare -o {out}` first")
    exp = json.loads(path.read_text())
    if exp.get("schema") != SCHEMA:
        raise UserError(f"{path}: schema {exp.get('schema')}, this schedsearch reads {SCHEMA}")
    workloads = []
    for w in exp["workloads"]:
        arms = []
        for strategy in exp["strategies"]:
            for seed in exp["seeds"]:
                run = RunDir(out / w["name"] / arm_name(strategy, seed))
                read = lambda name: (run.root / name).read_text() if (run.root / name).is_file() else None
                reused = read("reused.json")
                arms.append({"strategy": strategy, "seed": seed, "dir": str(run.root.relative_to(out)),
                             "results": run.read_results() if run.results.is_file() else None,
                             "trials": run.read_trials(), "error": read("error.txt"),
                             "reused_from": json.loads(reused)["from"] if reused else None})
        baselines = out / w["name"] / "baselines.json"
        workloads.append({**w, "arms": arms,
                          "baselines": json.loads(baselines.read_text()) if baselines.is_file() else None})
    return {"experiment": exp, "workloads": workloads}


def write_report(out: Path, peaks: dict | None = None) -> list[Path]:
    """report.md (+ plots/) and a self-contained report.html; `peaks` overrides those stored by compare."""
    from .report import write_comparison_report

    data = load(out)
    given = {k: v for k, v in (peaks or {}).items() if v is not None}
    data["experiment"]["peaks"] = {**data["experiment"].get("peaks", {}), **given}
    return write_comparison_report(data, out)
