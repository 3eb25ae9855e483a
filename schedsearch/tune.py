"""Run one search strategy over a workload's tasks with MetaSchedule's machinery; resume from the run dir."""
from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import tvm
import tvm_ffi
from tvm.s_tir import meta_schedule as ms
from tvm.ir.utils import derived_object

from . import cost_models, measure, result_codes
from .errors import DISK_FULL, INTERRUPTED, DiskFull, UserError, disk_nearly_full, note_disk_full, searching
from .frontend import Task
from .options import Evaluation, Tuning, parse_runner_spec
from .rundir import (RECORDS, Results, RunDir, append_line, drop_cut_tail, file_identity, open_database,
                     repair_database, write_bytes)


@derived_object
class TrialLog(ms.measure_callback.PyMeasureCallback):
    """Appends every measurement to trials.jsonl and draws the progress line."""

    def __init__(self, run: RunDir, task: Task, task_index: int, n_tasks: int, strategy: str,
                 done: int, budget: int, best_us: float | None, best_file: Path, capping_runner: bool):
        super().__init__()
        self.run, self.task, self.strategy, self.best_file = run, task, strategy, best_file
        self.capping_runner = capping_runner  # measure.WarmRunner: only it caps (and says so)
        self.label = f"[{task_index + 1}/{n_tasks} {task.name}]"
        self.done, self.budget, self.best_us, self.errors = done, budget, best_us, 0
        self.origin_of = None  # the strategy's `origin_of(candidate)`, where it says who made each one
        self.t0 = time.time()

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        try:
            self._append(measure_candidates, builder_results, runner_results)
        except OSError as e:  # raised into TVM's C++ it would come back as a RuntimeError traceback
            if not note_disk_full(e):
                raise

    def _append(self, measure_candidates, builder_results, runner_results):
        for cand, b, r in zip(measure_candidates, builder_results, runner_results):
            self.done += 1
            error = b.error_msg or r.error_msg
            us, capped = None, False
            if not error and r.run_secs:
                us = 1e6 * sum(float(s) for s in r.run_secs) / len(r.run_secs)
                capped = self.capping_runner and result_codes.is_capped(r.run_secs)
                self.best_us = us if self.best_us is None else min(self.best_us, us)
            else:
                self.errors += 1
            append_line(self.run.trials, json.dumps({
                "task": self.task.name, "trial": self.done, "strategy": self.strategy,
                "latency_us": us, "best_us": self.best_us, "capped": capped,
                "error": _short_error(error) if error else None,
                **({"origin": self.origin_of(cand)} if self.origin_of else {}),
                "elapsed_s": round(time.time() - self.t0, 3), "started": round(self.t0, 3),
            }))
        self.write_best()
        progress(self.label, self.done, self.budget, self.best_us, self.errors)

    def write_best(self) -> None:
        if self.best_us is None:
            self.best_file.unlink(missing_ok=True)
        else:
            write_bytes(self.best_file, repr(self.best_us * 1e-6).encode())


@derived_object
class LateResults(ms.measure_callback.PyMeasureCallback):
    """Hands each round's results to the database, the cost model and `callbacks`, less the deferred
    candidates (still compiling or waiting for the GPU when the rest of the round was built:
    measure.WarmBuilder, measure.WarmRunner), plus the deferred ones measured since. `finish()`, after
    the search, waits for the last of them."""

    def __init__(self, take_late, callbacks: list, strategy, cost_model, ctx, records_file: Path):
        super().__init__()
        self.take_late, self.strategy, self.cost_model, self.ctx = take_late, strategy, cost_model, ctx
        self.add, self.remove = ms.measure_callback.AddToDatabase(), ms.measure_callback.RemoveBuildArtifact()
        self.callbacks, self.records_file = callbacks, records_file
        self.waiting: dict = {}  # token -> MeasureCandidate
        self.scheduler = None

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        self.scheduler = (task_scheduler, task_id)
        now = []
        for row in zip(measure_candidates, builder_results, runner_results):
            token = result_codes.deferred_token(row[1].error_msg or row[2].error_msg)
            if interrupted_candidate(row[1].error_msg or row[2].error_msg):
                continue  # not a measurement: not recorded, so a resumed search may measure it again
            if token is None:
                now.append(row)
            else:
                self.waiting[token] = row[0]
        self._pass_on(now + self._late(wait=False))

    def finish(self) -> None:
        if self.waiting:
            self._pass_on(self._late(wait=True))

    def _late(self, wait: bool) -> list:
        late = [(t, b, r) for t, b, r in (self.take_late(wait) if self.take_late else []) if t in self.waiting]
        for t, b, r in late:
            if interrupted_candidate(b.error_msg or r.error_msg):
                self.waiting.pop(t)
        late = [(t, b, r) for t, b, r in late if t in self.waiting]
        if late and hasattr(self.strategy, "notify_late_results"):
            self.strategy.notify_late_results([t for t, _, _ in late], [r for _, _, r in late])
        return [(self.waiting.pop(t), b, r) for t, b, r in late]

    def _pass_on(self, rows: list) -> None:
        if not rows:
            return
        t0 = time.time()
        cands, builds, runs = map(list, zip(*rows))
        self.remove.apply(*self.scheduler, cands, builds, runs)
        if DISK_FULL:  # nothing more is written: what is there stays whole
            return
        size = self.records_file.stat().st_size if self.records_file.exists() else 0
        self.add.apply(*self.scheduler, cands, builds, runs)  # a line each; on a full disk TVM cuts one silently
        kept = whole_lines_since(self.records_file, size)
        if kept < len(rows):
            note_disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), self.records_file)
            rows = rows[:kept]  # the trial log and the cost model get what the database holds
            if not rows:
                return
            cands, builds, runs = map(list, zip(*rows))
        for callback in self.callbacks:
            callback.apply(*self.scheduler, cands, builds, runs)
        t1 = time.time()
        # What the stock UpdateCostModel learns from (it needs the round in flight: not usable after the search).
        learn = [(c, r) for c, b, r in rows
                 if b.error_msg is None and (r.error_msg or sum(map(float, r.run_secs or [])) > 0)]
        if learn:
            measure.update_cost_model(self.cost_model, self.ctx, [c for c, _ in learn], [r for _, r in learn])
        # Part of the time between a round's build and the next round's candidates, for tune.log.
        logging.getLogger("schedsearch.ms").info("recorded %d results in %.1f s, cost model updated in %.1f s",
                                                 len(rows), t1 - t0, time.time() - t1)


def interrupted_candidate(error_msg) -> bool:
    """A candidate whose worker died while the user was stopping the search (Ctrl-C reaches the whole
    process group): an interruption, not a measured failure."""
    return INTERRUPTED.is_set() and result_codes.worker_killed(error_msg)


def whole_lines_since(path: Path, size: int) -> int:
    """Lines appended to `path` past byte `size`; a cut last line (a full disk) is cut off again."""
    with open(path, "rb+") as f:
        f.seek(size)
        added = f.read()
        whole = added[:added.rfind(b"\n") + 1]
        if len(whole) < len(added):
            f.truncate(size + len(whole))
    return whole.count(b"\n")


def _short_error(msg: str) -> str:
    lines = [l for l in str(msg).strip().splitlines() if l.strip()]
    useful = [l for l in lines if "Error" in l or "error" in l]
    return (useful[-1] if useful else lines[-1] if lines else "error")[:300]


def progress(label: str, done: int, total: int, best_us: float | None, errors: int) -> None:
    width = 24
    filled = int(width * min(done, total) / max(total, 1))
    best = f"{best_us:,.1f} us" if best_us is not None else "-"
    line = f"{label} {'#' * filled}{'.' * (width - filled)} {done}/{total} trials  best {best}  errors {errors}"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line + ("\n" if done >= total else ""))
    else:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


def trials_done(run: RunDir) -> dict[str, list[dict]]:
    by_task: dict[str, list[dict]] = {}
    for rec in run.read_trials():
        by_task.setdefault(rec["task"], []).append(rec)
    return by_task


StrategyFactory = Callable[[Task], "ms.search_strategy.SearchStrategy | str"]


def search(tasks: list[Task], target: tvm.target.Target, run: RunDir, strategy_name: str,
           make_strategy: StrategyFactory, trials: int, seed: int = Tuning.seed,
           runner: ms.runner.Runner | None = None, builder: ms.builder.Builder | None = None,
           cost_model: cost_models.Start | None = None, capping_runner: bool | None = None,
           stop: Callable[[], bool] | None = None, cost_model_warmup: int = 100) -> dict[str, dict]:
    """Give each task `trials` hardware measurements in total (earlier runs in `run` count).
    `runner`/`builder`: where candidates are measured/built (default: measure.py's, on this machine);
    `cost_model`: where the XGBoost model starts (cost_models.start(); default from nothing);
    `capping_runner`: whether `runner` measures with measure.run_evaluator_capped (ours do);
    `stop`: asked before each round; True ends the search there (Ctrl-C does too, then raises);
    `cost_model_warmup`: measurements before XGBoost's predictions replace random ones (stock: 100)."""
    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    DISK_FULL.clear()
    _log_to_file(run.log)
    database = open_database(run.database)
    drop_cut_tail(run.trials)
    import_tensor_intrinsics()
    best_file = run.root / "best_s.txt"  # the running task's best, for the runner's cap
    capping_runner = runner is None if capping_runner is None else capping_runner
    measure.share_best_file(best_file)
    mine = (builder is None, runner is None)  # what this call starts, it shuts down
    if runner is None:
        builder, runner = (builder, measure.WarmRunner(target)) if builder else measure.make_builder_and_runner(target)
    builder = builder or measure.WarmBuilder()
    owned = [x for x, m in zip((builder, runner), mine) if m]
    try:
        if hasattr(builder, "start_workers"):  # while the search prepares its first round
            builder.start_workers()
        # XGBoost on one thread: with many, an update stalls whenever some cores are busy (deferred builds, the
        # runner). H100 host, 16 cores, 2 kept busy, 64 matmul records an update: 8.9-11.5 s with 16 threads,
        # 0.21-0.28 s with 1, the same predictions to the bit; idle, 0.2 s either way (docs/results.md).
        # One model for every task; a pretrained one ranks from the first round (cost_models.PretrainedXGBModel).
        cost_model = (cost_model or cost_models.Start("none", "none")).model(1, warmup=cost_model_warmup)
        previous = trials_done(run)
        for i, task in enumerate(tasks):
            done = len(previous.get(task.name, []))
            remaining = trials - done
            bests = [r["latency_us"] for r in previous.get(task.name, []) if r["latency_us"] is not None]
            if remaining <= 0:
                progress(f"[{i + 1}/{len(tasks)} {task.name}]", done, trials, min(bests, default=None), 0)
                continue
            log = TrialLog(run, task, i, len(tasks), strategy_name, done, trials, min(bests, default=None), best_file,
                           capping_runner)
            log.write_best()
            strategy = make_strategy(task)
            if isinstance(strategy, str):
                strategy = ms.search_strategy.SearchStrategy.create(strategy)
            log.origin_of = getattr(strategy, "origin_of", None)
            stoppable = Stoppable(strategy, lambda: INTERRUPTED.is_set() or bool(DISK_FULL)
                                  or (stop is not None and stop()))
            ctx = ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply",
                                 search_strategy=stoppable, task_name=task.name,
                                 num_threads=len(os.sched_getaffinity(0)), rand_state=seed + i,
                                 logger=logging.getLogger("schedsearch.ms"))
            results = LateResults(getattr(runner, "take_late", None), [log], stoppable, cost_model, ctx,
                                  run.database / RECORDS)
            with searching():
                ms.tune_tasks(tasks=[ctx], task_weights=[float(task.weight)], work_dir=str(run.root),
                              max_trials_global=remaining, max_trials_per_task=remaining,
                              num_trials_per_iter=min(64, remaining), builder=builder, runner=runner,
                              database=database, cost_model=cost_model, measure_callbacks=[results],
                              task_scheduler="round-robin")
                results.finish()
            if DISK_FULL:
                raise DISK_FULL[0]
            if INTERRUPTED.is_set():
                raise KeyboardInterrupt
            if getattr(strategy, "error", None) is not None:
                raise strategy.error
            if stoppable.stopped:
                break
            ended = why_ended(getattr(strategy, "ended", None), log.done)
            if log.done < trials and ended:
                print(f"{log.label} search ended after {log.done} trials: {ended}", file=sys.stderr)
            elif log.done < trials:  # the space ran dry before the budget: say so instead of looping
                print(f"{log.label} space exhausted after {log.done} trials: the search has no other schedules to "
                      "measure (an elementwise kernel's space can be one)", file=sys.stderr)
        with cost_models.quiet_xgboost_file_format():
            cost_model.save(str(run.root / "cost_model.tar"))  # reusable with --cost-model on the same device
        return trials_done(run)
    finally:  # pools left to the GC can deadlock (TVM's PopenPoolExecutor says so)
        for x in owned:
            x.close()
        if mine[0]:  # our builder's candidates still on disk (deferred builds of an interrupted search)
            measure.remove_candidate_dirs(only_pid=os.getpid())


def import_tensor_intrinsics() -> None:
    """`tvm.s_tir.tensor_intrin`, which TuneContext imports, parses ~250 TVMScript kernels, and each
    `@T.prim_func` calls inspect.stack(), which reads the source of every frame on the stack and, for
    the import machinery's frames (no file), scans all of sys.modules. TVMScript reads the source line of
    frame 2 only (is_defined_in_class) and the locals of the others (closure variables): with a stack
    that reads only the first 3 frames' source, the import took 11 s instead of 31-62 s (CPU box, 2 busy
    cores, after torch's import)."""
    import inspect

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return

    def stack(context=1):
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            if len(frames) < 3:
                info = inspect.getframeinfo(frame, context)
                frames.append(inspect.FrameInfo(frame, *info, positions=info.positions))
            else:
                frames.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno,
                                                frame.f_code.co_name, None, None, positions=None))
            frame = frame.f_back
        return frames

    from tvm.s_tir import TensorIntrin

    def register(name, desc, impl, override=False):  # TVM has no list of them: note each as it comes
        TENSOR_INTRINSICS[name] = (sys._getframe(1).f_globals.get("__name__", ""), desc)
        return real_register(name, desc, impl, override)

    real, inspect.stack = inspect.stack, stack
    real_register, TensorIntrin.register = TensorIntrin.register, register
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack, TensorIntrin.register = real, real_register


# The tensor intrinsics `tensorize` can name: name -> (the module that registered it, its description PrimFunc).
# Filled by import_tensor_intrinsics (empty where something else imported them first).
TENSOR_INTRINSICS: dict[str, tuple[str, object]] = {}


@derived_object
class Stoppable(ms.search_strategy.PySearchStrategy):
    """A search strategy, unchanged, except that it proposes nothing more once `stop()` is true: the
    round in flight is measured and recorded, and the task scheduler ends the search."""

    def __init__(self, inner, stop: Callable[[], bool]):
        self.inner, self.stop, self.stopped = inner, stop, False

    def _initialize_with_tune_context(self, context) -> None:
        self.inner._initialize_with_tune_context(context)

    def pre_tuning(self, *args) -> None:
        self.inner.pre_tuning(*args)

    def post_tuning(self) -> None:
        self.inner.post_tuning()

    def generate_measure_candidates(self):
        self.stopped = self.stopped or self.stop()
        return None if self.stopped else self.inner.generate_measure_candidates()

    def notify_runner_results(self, *args) -> None:
        self.inner.notify_runner_results(*args)

    def notify_late_results(self, *args) -> None:
        if hasattr(self.inner, "notify_late_results"):
            self.inner.notify_late_results(*args)

    def clone(self):
        return Stoppable(self.inner.clone(), self.stop)


class RunLog(logging.FileHandler):
    """tune.log. On a full disk the search is told to stop (errors.note_disk_full) and nothing more is
    written, instead of logging's traceback for each line that follows (21 of them in issue 23)."""

    def emit(self, record) -> None:
        if not DISK_FULL:
            super().emit(record)

    def handleError(self, record) -> None:  # noqa: N802  logging's name
        e = sys.exc_info()[1]
        if not (isinstance(e, OSError) and note_disk_full(e, self.baseFilename)):
            super().handleError(record)


def _log_to_file(path: Path) -> None:
    """MetaSchedule logs every round to the console; keep that in the run dir instead."""
    handler = RunLog(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    for name in ("tvm.s_tir.meta_schedule", "schedsearch.ms"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def tune_workload(workload, target: tvm.target.Target, run: RunDir, tuning: Tuning = Tuning(),
                  evaluation: Evaluation = Evaluation(), strategy_options: dict | None = None,
                  command: list[str] | None = None) -> Results:
    """The whole job: tasks -> search -> compile -> validate -> time -> run dir. Returns what results.json holds.
    `strategy_options`: what the strategy's factory takes besides (options.strategy_options).
    The search allows tuning.shared_memory per block on CUDA (shared_memory.search_limit; the ansor arm always
    searches with the device's stock 48 KB). One process at a time per run dir (RunDir.locked)."""
    from . import shared_memory as smem, target as targets

    rpc_at = parse_runner_spec(tuning.runner)
    if rpc_at is None and targets.is_gpu(target) and not targets.gpu_here(target):
        raise UserError(f"no {targets.facts(target)['name']} on this machine: the candidates built here are measured on "
                        "one elsewhere: give it with --runner rpc://HOST:PORT/KEY "
                        "(see `schedsearch tracker` and `schedsearch worker`)")
    targets.prepare_build(target)
    model_start = cost_models.start(tuning.cost_model, target)  # a bad --cost-model fails before any work
    smem_bytes = smem.search_limit(tuning.shared_memory, target, tuning.strategy)
    search_target = target if smem_bytes == smem.limit(target) else smem.with_limit(target, smem_bytes)
    t0 = time.time()
    run.create()
    with run.locked(), disk_full_means(run.root):
        return _tune_locked(workload, target, search_target, run, tuning, evaluation, command, strategy_options,
                            model_start, rpc_at, t0)


def _tune_locked(workload, target, search_target, run: RunDir, tuning: Tuning, evaluation: Evaluation, command,
                 strategy_options, model_start, rpc_at, t0) -> Results:
    from . import frontend, rpc, shared_memory, strategies, target as targets

    smem = {"shared_memory_per_block": shared_memory.limit(search_target)} if targets.kind(target).shared_memory else {}
    _check_same_run(run, workload_sha256=workload.sha256, size=workload.size, target=str(target),
                    strategy=tuning.strategy, **smem)
    repair_database(run.database)  # a damaged database is refused before any work
    empty = [f"{n} {tuple(shape)}" for n, (shape, _) in zip(workload.input_names, workload.input_specs) if 0 in shape]
    if empty:
        raise UserError(f"{workload.name}: input {', '.join(empty)} has no elements: there is nothing to tune "
                        "(check the sizes, or --input-shape)")
    # Before the export and import (minutes on a big model): an unreachable LLM endpoint fails at once.
    factory = strategies.make(tuning.strategy, run=run, target=search_target, seed=tuning.seed,
                              **(strategy_options or {}))  # its prompt's facts: the shared memory searched with
    # Nothing else is printed until the first trial is measured: say what the time goes to.
    stage(t0, "exporting the workload to ONNX (torch.export), importing it into TVM, extracting its kernels")
    mod = frontend.import_onnx(frontend.export_onnx(workload, run.onnx), workload.shapes())
    tasks = frontend.extract_tasks(mod, target)
    if not tasks:
        raise UserError(f"{workload.name}: the model has no kernels to tune (TVM computes it without one, e.g. it "
                        "returns an input or a constant)")
    _check_same_run(run, tasks={t.name: str(tvm_ffi.structural_hash(t.mod)) for t in tasks})
    stage(t0, f"{len(tasks)} task(s): {', '.join(t.name for t in tasks)}; searching")
    earlier_s = search_seconds(run.read_trials())  # a resumed run: what earlier invocations spent searching
    measure.share_best_file(run.root / "best_s.txt")  # before the RPC runner starts its processes
    measure.share_cap(tuning.cap_factor, tuning.min_cap_s)
    runner = None if rpc_at is None else rpc.make_rpc_runner(*rpc_at, target, measure.evaluator_config(target))
    by_task = search(tasks, search_target, run, tuning.strategy, factory, tuning.trials, tuning.seed, runner=runner,
                     cost_model=model_start, capping_runner=True,
                     cost_model_warmup=getattr(factory, "cost_model_warmup", 100))
    tuning_s = time.time() - t0 + earlier_s
    t0 -= earlier_s  # total_wall_s counts the earlier invocations' search too: never less than tuning_wall_s

    return _compile_validate_write(workload, target, search_target, run, mod, tasks, by_task, tuning, evaluation,
                                   command, strategy_options, factory, model_start, tuning_s, t0)


@contextlib.contextmanager
def disk_full_means(directory: Path):
    """A tool's failure on a full disk (the linker writing module.so says only its command line) is reported
    as the full disk it is."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        if isinstance(e, OSError) and note_disk_full(e):
            raise DISK_FULL[-1] from None
        if "No space left on device" in str(e) or disk_nearly_full(directory):
            raise DiskFull(directory) from None
        raise


def _compile_validate_write(workload, target, search_target, run, mod, tasks, by_task, tuning: Tuning,
                            evaluation: Evaluation, command, strategy_options, factory, model_start, tuning_s,
                            t0) -> Results:
    from . import frontend, shared_memory, target as targets
    from .evaluate import evaluate
    from .runtime import CompiledModule
    from .validate import DISTRIBUTIONS

    stage(t0, "compiling the module with the best schedules")
    executable = frontend.compile_module(mod, target, open_database(run.database))
    # The module and the results that vouch for it are one unit: the new module waits beside the old one
    # until it is validated, results.json names its sha256, and export refuses a module.so it does not name
    # (a kill between the two renames below leaves exactly that).
    staged = run.root / ".module.staged.so"
    executable.export_library(str(staged))
    seeds, repeats = evaluation.validation_seeds, evaluation.repeats
    if targets.is_gpu(target) and not targets.gpu_here(target):  # its GPU is a worker's (--runner rpc://)
        from . import rpc
        from .evaluate import evaluate_on_worker

        stage(t0, f"validating ({seeds} seeds x {len(DISTRIBUTIONS)} input distributions) and timing on "
                  f"a worker of {tuning.runner}")
        worker = rpc.WorkerModule(staged, *parse_runner_spec(tuning.runner), target)
        measured = evaluate_on_worker(workload, worker, seeds=seeds, repeats=repeats)
    else:
        module = CompiledModule(executable, targets.torch_device(target))
        stage(t0, f"validating ({seeds} seeds x {len(DISTRIBUTIONS)} input distributions) and timing "
                  "against PyTorch eager")
        measured = evaluate(workload, module, seeds=seeds, repeats=repeats)

    stats = factory.stats() if hasattr(factory, "stats") else None
    ended = (stats or {}).get("ended", {})
    results = Results(
        workload={"name": workload.name, "path": str(workload.path), "sha256": workload.sha256,
                  "weights_sha256": workload.weights_sha256,
                  "size": workload.size,
                  "inputs": [{"name": n, "shape": list(s), "dtype": str(d).replace("torch.", "")}
                             for n, (s, d) in zip(workload.input_names, workload.input_specs)]},
        strategy=tuning.strategy, seed=tuning.seed, trials_per_task=tuning.trials, runner=tuning.runner,
        target=str(target), device=targets.facts(target), versions=versions(),
        shared_memory_per_block=shared_memory.limit(search_target) if targets.kind(target).shared_memory else None,
        command=command or sys.argv,
        cost_model=model_start.record(),
        tasks=[task_summary(t, by_task.get(t.name, []), tuning.trials, ended.get(t.name)) for t in tasks],
        **measured,
        module=file_identity(staged),
        tuning_wall_s=round(tuning_s, 1),
        total_wall_s=round(time.time() - t0, 1),
        strategy_options={k: v for k, v in strategy_options.items() if k != "client"} if strategy_options else None,
        search=stats)
    os.replace(staged, run.module)
    run.write_results(results)
    return results



def stage(t0: float, text: str) -> None:
    """What a tune is doing, with the seconds since t0: nothing else is printed until the first trial."""
    print(f"[{time.time() - t0:4.0f} s] {text}", file=sys.stderr, flush=True)


def search_seconds(trials: list[dict]) -> float:
    """Search time in trials.jsonl: elapsed_s counts from the start of each task in each invocation."""
    longest: dict = {}
    for r in trials:
        key = (r["task"], r.get("started", "?"))
        longest[key] = max(longest.get(key, 0.0), r["elapsed_s"])
    return sum(longest.values())


# A finished search that measured nothing: MetaSchedule's evolutionary search gives up when its samples fail the
# postprocessors ("Cannot sample enough initial population"); stock Ansor did so on the H200's conv2d at 48 KB of
# shared memory (1 valid of 200 samples, VerifyGPUCode refused the rest), and called that "space exhausted".
NO_VALID_SAMPLE = ("no schedule sampled from the task's design space passed TVM's checks (MetaSchedule: \"Cannot "
                   "sample enough initial population\"); rules and hybrid start from fewer valid schedules")


def why_ended(ended: str | None, measured: int) -> str | None:
    """Why a finished search measured fewer trials than asked, other than an exhausted space: the strategy's
    reason (`ended`), else none was valid when nothing was measured."""
    return ended or (None if measured else NO_VALID_SAMPLE)


def task_summary(task: Task, trials: list[dict], budget: int, ended: str | None = None) -> dict:
    """`budget`: the trials asked for; a finished search that measured fewer exhausted the task's space, unless
    it `ended` for another reason (a replayed transcript with no more answers, or no valid sample at all)."""
    ended = why_ended(ended, len(trials))
    curve, best = [], None
    for r in trials:
        if r["latency_us"] is not None and (best is None or r["latency_us"] < best):
            best = r["latency_us"]
            curve.append([r["trial"], best])
    causes = collections.Counter(r["error"] for r in trials if r["error"] is not None)
    out = {"name": task.name, "weight": task.weight, "flops": task.flops, "bytes": param_bytes(task.mod),
           "trials": len(trials), "errors": sum(causes.values()), "error_causes": causes.most_common(),
           "best_us": best, "curve": curve, "space_exhausted": len(trials) < budget and not ended}
    if ended and len(trials) < budget:
        out["ended"] = ended
    origins: dict[str, dict] = {}
    for r in trials:
        if r.get("origin"):
            o = origins.setdefault(r["origin"], {"trials": 0, "best_us": None})
            o["trials"] += 1
            if r["latency_us"] is not None and (o["best_us"] is None or r["latency_us"] < o["best_us"]):
                o["best_us"] = r["latency_us"]
    if origins:  # which proposer (or evolution) made the trials, and the best of each
        out["origins"] = origins
    return out


def param_bytes(mod: tvm.IRModule) -> int:
    """Bytes of the kernel's buffer parameters (inputs and outputs), each moved once: the roofline's memory term."""
    return sum(math.prod(int(d) for d in a.shape) * ((a.dtype.bits * a.dtype.lanes + 7) // 8)
               for a in ms.arg_info.ArgInfo.from_prim_func(mod["main"]))


def _check_same_run(run: RunDir, **key) -> None:
    """Resuming into a run dir made for other inputs would mix their databases and trial counts."""
    from .rundir import write_json

    try:
        old = json.loads(run.config.read_text()) if run.config.exists() else {}
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{run.config} is damaged (not JSON), so this run dir's workload cannot be checked: "
                        "delete that file to have it written again, or choose another -o") from None
    diff = [k for k in key if k in old and old[k] != key[k]]
    if diff == ["tasks"]:
        raise UserError(f"{run.root}: the workload's kernels changed since this run was made (another TVM or "
                        "schedsearch version?), so its trials do not count for them: choose another -o")
    if diff:
        raise UserError(f"{run.root} holds a run with another {', '.join(diff)} "
                        f"({', '.join(f'{k}={old[k]}' for k in diff)}): choose another -o")
    write_json(run.config, {**old, **key})


def versions() -> dict:
    import numpy
    import torch
    import tvm_ffi
    import xgboost

    out = {"python": platform.python_version(), "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__,
           "torch": torch.__version__, "numpy": numpy.__version__, "xgboost": xgboost.__version__}
    if torch.cuda.is_available():
        out["cuda_torch"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0)
        try:
            import subprocess
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.split("\n")[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return out
