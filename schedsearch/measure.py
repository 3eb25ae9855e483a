"""The builder and runner every strategy measures with.

Stock `LocalBuilder` starts a fresh process pool on every build call, and each fresh worker
imports `tvm.s_tir.tensor_intrin` (~18 s). `WarmBuilder` keeps one pool alive and builds
without that import (schedules here never reference tensor intrinsics by name at build time).
On a GPU, `WarmRunner` measures each candidate as soon as it is built, and a round waits neither for
its slowest compiles nor for the GPU's queue (those candidates are measured and reported with a
later round).
"""
from __future__ import annotations

import concurrent.futures
import functools
import logging
import os
import re
import signal
import subprocess
import time

import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.s_tir.meta_schedule.builder.local_builder import _worker_func as _build_worker_func
from tvm.s_tir.meta_schedule.runner.local_runner import _worker_func as _run_worker_func
from tvm.ir.utils import derived_object
from tvm.support.popen_pool import PopenPoolExecutor
from tvm.target import Target

from . import result_codes, target as targets
from .options import Tuning


def build_kernel(mod, target, _params):
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from . import shared_memory

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    if (shared_memory.limit(target) or 0) > shared_memory.STATIC_LIMIT:  # the stock limit builds as it did
        mod = shared_memory.dynamic_where_needed(mod, target)
    with target:  # nvcc reads the arch from the current target; without a GPU here there is nothing else
        return tvm_build(mod, target=target)


PR_SET_PDEATHSIG = 1


def worker_setup(parent_pid: int, cores: list[int] | None = None) -> None:
    """The first call in every worker process of our pools: it dies with its parent (a `kill -9` of tune left
    TVM's popen_worker processes alive, 2-3 each time: issue 21), ignores Ctrl-C (the parent decides when to
    stop; see _WorkersInTheirOwnSession) and runs on `cores`."""
    import ctypes

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)
    if cores is not None:
        os.sched_setaffinity(0, cores)


# A worker's first lines, before it imports TVM (seconds; ~10 s on the CPU box with its cores busy): from here
# on it dies with the pool thread that started it, and it exits if its parent is already gone. A worker
# still importing when its parent was killed lived on until the import was done.
_WORKER_BOOT = ("import ctypes, os, runpy, signal, sys\n"
                f"ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL)\n"
                "if os.getppid() != int(sys.argv.pop(1)):\n    os._exit(1)\n"
                "runpy.run_module('tvm.exec.popen_worker', run_name='__main__', alter_sys=True)\n")


class _WorkersInTheirOwnSession:
    """TVM's popen_pool module sees this as `subprocess`: its workers start with _WORKER_BOOT, in a session
    (so a process group) of their own, which a terminal's Ctrl-C does not reach. Ctrl-C's during a search
    killed workers that were still importing TVM (a traceback each on the console) or measuring (their
    candidates recorded as errors)."""

    def __getattr__(self, name):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(cmd, *args, **kwargs):  # noqa: N802  subprocess's name
        if list(cmd[1:3]) == ["-m", "tvm.exec.popen_worker"]:
            cmd = [cmd[0], "-c", _WORKER_BOOT, str(os.getpid()), *cmd[3:]]
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(cmd, *args, **kwargs)


def worker_pool(max_workers: int, timeout: float | None, cores: list[int] | None = None, **kwargs) -> PopenPoolExecutor:
    """TVM's PopenPoolExecutor whose workers start in their own session and run worker_setup first."""
    from tvm.support import popen_pool

    popen_pool.subprocess = _WorkersInTheirOwnSession()
    return PopenPoolExecutor(max_workers=max_workers, timeout=timeout,
                             initializer=functools.partial(worker_setup, os.getpid(), cores), **kwargs)


def _import_build_modules() -> None:
    """A build worker's first task, before the first round: the imports build_kernel needs."""
    from tvm.driver import build  # noqa: F401
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock  # noqa: F401

    from . import shared_memory  # noqa: F401  build_kernel's, past 48 KB


def export_shared_library(rt_mod) -> str:
    """Link the candidate here, in the parallel build pool. The stock export writes a .tar, which the
    runner's load_module links, one candidate at a time (CPU box, small matmul: 18 ms a load against
    0.3 ms for the .so, which costs 11 ms more to export in the pool)."""
    import tempfile

    # Named after the tuning process (this worker's parent): what a kill leaves is removed by the next search.
    path = os.path.join(tempfile.mkdtemp(prefix=f"{CANDIDATE_DIR_PREFIX}{os.getppid()}-"), "candidate.so")
    rt_mod.export_library(path)
    return path


CANDIDATE_DIR_PREFIX = "schedsearch-"


def remove_candidate_dirs(only_pid: int | None = None) -> None:
    """Candidates' build folders in the temp dir left by tuning processes that are gone (kill -9, a second
    Ctrl-C, deferred builds of an interrupted search), or all of `only_pid`'s."""
    import shutil
    import tempfile

    root = tempfile.gettempdir()
    for name in os.listdir(root):
        m = re.fullmatch(re.escape(CANDIDATE_DIR_PREFIX) + r"(\d+)-\w+", name)
        if m is None or not os.path.isdir(os.path.join(root, name)):
            continue
        pid = int(m[1])
        if pid == only_pid or (only_pid is None and not _alive(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@derived_object
class WarmBuilder(ms.builder.PyBuilder):
    """One pool of build workers for the whole search. Given a runner that overlaps (WarmRunner on a
    GPU), each candidate goes to the runner as soon as it is built, while the rest still build, and a
    round does not wait for its stragglers: once 90% of it is built, the rest get a quarter as long
    again (STRAGGLER_GRACE), then those still building are deferred to the runner (WarmRunner.defer,
    unless defer_stragglers is off). Their compile goes on while the search proposes the next round,
    and their runs join the results later (WarmRunner.take_late). A heavily unrolled kernel can take
    20x the median to compile, and it is often among the fastest: it is deferred, never dropped."""

    # Restart the pool now and then: PopenPool workers leak memory over many builds.
    RECYCLE_AFTER = 2000
    STRAGGLER_GRACE = 0.25  # x the time to 90% of the round built
    MIN_GRACE_S = 2.0

    def __init__(self, runner: "WarmRunner | None" = None, timeout_sec: float = 30.0, f_build=build_kernel,
                 defer_stragglers: bool = True):
        super().__init__()
        self.runner = runner if runner is not None and runner.overlap else None
        self.f_build, self.defer = f_build, defer_stragglers and self.runner is not None
        self.cores = self.runner.build_cores if self.runner else sorted(os.sched_getaffinity(0))
        self.timeout_sec = timeout_sec
        self._pool = None
        self._built = 0
        self._deferred: list = []  # build futures still compiling after their round

    def start_workers(self) -> None:
        """Start the pool's workers, if not yet, each importing what a build needs. tune.search calls this
        before the search proposes its first round, so they get ready meanwhile (H100 machine, matmul
        2048³: the first round's builds took 31-47 s when the workers started with them, 15-31 s so)."""
        if self._pool is None:
            remove_candidate_dirs()
            self._pool = worker_pool(len(self.cores), self.timeout_sec, self.cores)
            self._built = 0
            for _ in self.cores:  # a task per worker thread: each starts its own process
                self._pool.submit(_import_build_modules)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def build(self, build_inputs):
        self._deferred = [f for f in self._deferred if not f.done()]
        if self._built >= self.RECYCLE_AFTER and not self._deferred:
            self.close()
        self.start_workers()
        self._built += len(build_inputs)
        t0 = time.time()
        # The most unrolled first: they take longest to compile, and a round ends with its slowest build.
        order = sorted(range(len(build_inputs)), key=lambda i: -unroll_step(build_inputs[i].mod))
        futures = {self._pool.submit(_build_worker_func, self.f_build, export_shared_library,
                                     build_inputs[i].mod, build_inputs[i].target, None): i for i in order}
        results, done_s, waiting, deadline = [None] * len(build_inputs), [], set(futures), None
        while waiting:
            timeout = None if deadline is None else max(0.0, deadline - time.time())
            done, waiting = concurrent.futures.wait(waiting, timeout, concurrent.futures.FIRST_COMPLETED)
            for future in done:
                done_s.append(time.time() - t0)
                results[futures[future]] = ms.builder.BuilderResult(*self._outcome(future))
                if self.runner and results[futures[future]].error_msg is None:
                    self.runner.start(future.result(), self._args_info(build_inputs[futures[future]]))
            if self.defer and deadline is None and len(done_s) >= 0.9 * len(futures):
                deadline = t0 + max(done_s[-1] + self.MIN_GRACE_S, (1 + self.STRAGGLER_GRACE) * done_s[-1])
            if deadline is not None and time.time() >= deadline:
                break
        for future in waiting:
            token = self.runner.defer()
            results[futures[future]] = ms.builder.BuilderResult(None, result_codes.deferred(
                token, f"still building {time.time() - t0:.0f} s into its round; measured when built, reported later"))
            args = tuple(a.as_json() for a in self._args_info(build_inputs[futures[future]]))
            future.add_done_callback(functools.partial(self._built_late, token, args))
            self._deferred.append(future)
        if done_s:  # how far the last builds trail the rest
            logging.getLogger("schedsearch.ms").info(
                "built %d candidates on %d workers: half after %.1f s, 90%% after %.1f s, all after %.1f s%s",
                len(done_s), len(self.cores), done_s[len(done_s) // 2], done_s[int(0.9 * (len(done_s) - 1))],
                done_s[-1], f"; {len(waiting)} deferred, still building" if waiting else "")
        return results

    @staticmethod
    def _args_info(build_input):
        return ms.arg_info.ArgInfo.from_entry_func(build_input.mod, True)

    def _built_late(self, token: int, args_json: tuple, future) -> None:
        """A deferred candidate's build finished, in a pool thread (so plain Python only, no TVM objects,
        while the search runs TVM code in the main thread): run it."""
        self.runner.run_late(token, *self._outcome(future), args_json)

    def _outcome(self, future) -> tuple[str | None, str | None]:
        """(artifact path, None) or (None, error)."""
        try:
            return future.result(), None
        except TimeoutError:
            return None, f"build timed out after {self.timeout_sec} s"
        except Exception as e:  # the worker's exception, as the stock builder reports it
            return None, f"build failed: {e}"


def unroll_step(mod) -> int:
    """The largest auto-unroll step annotated in a scheduled kernel: what makes its source (and compile) big."""
    return max(map(int, re.findall(r'"pragma_auto_unroll_max_step": (\d+)', mod.script())), default=0)


# Hopeless candidates: a kernel already CAP_FACTOR times slower than the best full measurement of the
# task so far is recorded with one call, so seconds go to contenders. Its recorded latency then exceeds
# a latency recorded before it: a capped kernel is never the task's best. The runner works in its own
# process: the task's best reaches it through a small file (BEST_FILE_ENV), and it remembers the full
# measurements it made since that file last changed. Full measurements have REPEAT samples, capped ones
# one (result_codes.capped): that is how the caller tells them apart.
# The first call of a candidate also loads its module (on the H100, 48 heavy matmul candidates: 2.5 ms
# more than their next call at the median, 50 ms at most: benchmarks/first_call.py). Past the cap by more
# than LOAD_ALLOWANCE_S, that call is the record (a 2 s kernel costs 2 s, not 4 as with a warm-up call
# first); nearer the cap, the next call decides. Both are timed on the host's clock, as TVM's evaluator
# times a call (over RPC that adds the round trip).
# The cap's factor and floor are options (options.Tuning: --cap-factor, --min-cap-s); they reach the runner's
# worker processes as the task's best does, through their environment (share_cap), read when they start.
BEST_FILE_ENV = "SCHEDSEARCH_BEST_S_FILE"
CAP_FACTOR_ENV, MIN_CAP_S_ENV = "SCHEDSEARCH_CAP_FACTOR", "SCHEDSEARCH_MIN_CAP_S"
CAP_FACTOR = float(os.environ.get(CAP_FACTOR_ENV, Tuning.cap_factor))
MIN_CAP_S = float(os.environ.get(MIN_CAP_S_ENV, Tuning.min_cap_s))  # below this a full measurement is cheap
LOAD_ALLOWANCE_S = 0.2
REPEAT = 2
_best = {"file": None, "s": float("inf")}


def run_evaluator_capped(rt_mod, device, evaluator_config, repeated_args):
    from tvm.s_tir.meta_schedule.runner.utils import run_evaluator_common

    try:
        with open(os.environ[BEST_FILE_ENV]) as f:
            text = f.read()
    except (KeyError, OSError):
        text = ""
    if text != _best["file"]:  # a new task, or a new best
        _best.update(file=text, s=float(text or "inf"))
    cap = max(CAP_FACTOR * _best["s"], MIN_CAP_S)
    first = one_call_seconds(rt_mod, device, repeated_args[0])  # the kernel's time, plus its module's load
    if first > cap + LOAD_ALLOWANCE_S:
        return result_codes.capped(first)
    if first > cap:
        second = one_call_seconds(rt_mod, device, repeated_args[0])
        if second > cap:
            return result_codes.capped(second)
    if 0 < evaluator_config.min_repeat_ms < 1e3 * first:  # one call already fills a repeat: no need for two
        evaluator_config = evaluator_config._replace(number=1)
    costs = run_evaluator_common(rt_mod, device, evaluator_config, repeated_args)
    _best["s"] = min(_best["s"], sum(costs) / len(costs))
    return costs


def one_call_seconds(rt_mod, device, args) -> float:
    device.sync()
    t0 = time.perf_counter()
    rt_mod[rt_mod.entry_name](*args)
    device.sync()
    return time.perf_counter() - t0


# Arguments: the stock runner allocates and random-fills every buffer again for each candidate, on the
# host for a GPU (0.33 s per 64M floats on the CPU box; softmax has 512M). On the H200 the runner took
# 156 s for 32 softmax candidates whose mean latencies add up to 0.53 s. The runner's worker process lives
# across candidates, so keep one set of arguments per argument signature (the task's) and reuse it;
# kernels write only their outputs.
_args: dict = {"key": None, "args": None}


def alloc_args_cached(device, args_info, alloc_repeat):
    from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument

    key = (str(device), repr(args_info), alloc_repeat)
    if _args["key"] != key:
        _args.update(key=None, args=None)  # free the last task's buffers before allocating
        _args.update(key=key, args=default_alloc_argument(device, args_info, alloc_repeat))
    return _args["args"]


def evaluator_config(target: Target) -> ms.runner.EvaluatorConfig:
    # On CUDA 2 x 2 timed runs of at least 10 ms each (target.KINDS' min_repeat_ms) rank candidates well; the
    # final numbers come from timing.py (CUDA events, L2 flush), not from here.
    return ms.runner.EvaluatorConfig(number=2, repeat=REPEAT, min_repeat_ms=targets.kind(target).min_repeat_ms,
                                     enable_cpu_cache_flush=False)


def share_best_file(path) -> None:
    """Where the caller keeps the running task's best latency (seconds): set before a runner starts
    its processes, which inherit it."""
    os.environ[BEST_FILE_ENV] = str(path)


def share_cap(factor: float, min_s: float) -> None:
    """The cap for the runner processes started from now on (run_evaluator_capped)."""
    os.environ[CAP_FACTOR_ENV], os.environ[MIN_CAP_S_ENV] = repr(float(factor)), repr(float(min_s))


def device_type(target: Target) -> str:
    """The device name the tuner gives the runner for this target ("cpu" for llvm, "cuda")."""
    return str(tvm.runtime.device(target.get_target_device_type(), 0)).split(":")[0]


@derived_object
class WarmRunner(ms.runner.PyRunner):
    """Runs candidates one after another in one worker process that lives across candidates (one device,
    arguments cached). On a GPU the runs overlap the build (WarmBuilder hands candidates over as they
    are built): the worker gets a core of its own and the build pool the rest, so kernel launches do
    not queue behind the builds. On a CPU target the builds would disturb the timings, so there runs
    start after the whole build, as the stock runner does.
    With overlap, a round does not wait for its runs either: those still queued RUN_GRACE_S after the
    round is built are deferred (unless defer is off), and measured while the search proposes the next
    round. take_late() hands over every deferred candidate's measurement (builds deferred by WarmBuilder
    too), which tune.LateResults passes to the database, the cost model and the trial log."""

    RUN_GRACE_S = 2.0

    def __init__(self, target: Target, timeout_sec: float | None = None, overlap: bool | None = None,
                 defer: bool = True):
        super().__init__()
        self.timeout_sec = timeout_sec or targets.kind(target).run_timeout_s
        self.config = evaluator_config(target)
        self.device_type = device_type(target)
        cores = sorted(os.sched_getaffinity(0))
        self.overlap = (targets.is_gpu(target) if overlap is None else overlap) and len(cores) > 1
        run_cores, self.build_cores = (cores[:1], cores[1:]) if self.overlap else (cores, cores)
        self.pool = worker_pool(1, self.timeout_sec, run_cores, stderr=subprocess.DEVNULL)
        self.defer_runs = defer and self.overlap
        self._started: dict = {}  # artifact path -> future
        self._late: dict = {}  # token -> None while building, then (artifact path, build error, run future)
        self._tokens = 0

    def close(self) -> None:
        self.pool.shutdown()

    def start(self, artifact_path: str, args_info) -> None:
        """Start running a built candidate now, before the tuner asks (artifact paths are unique)."""
        self._started[artifact_path] = self._submit(artifact_path, self.device_type,
                                                    tuple(a.as_json() for a in args_info))

    def _submit(self, artifact_path, device_type, args):
        return self.pool.submit(_run_worker_func, alloc_args_cached, run_evaluator_capped, None, self.config, 1,
                                artifact_path, device_type, args)

    def run(self, runner_inputs):
        futures = []
        for r in runner_inputs:
            path = str(r.artifact_path)
            started = self._started.pop(path, None)
            args = tuple(a.as_json() for a in r.args_info)
            futures.append(started if started is not None else self._submit(path, str(r.device_type), args))
        if not self.defer_runs:
            return [self.result(f) for f in futures]
        concurrent.futures.wait(futures, self.RUN_GRACE_S)
        out, deferred = [], 0
        for r, f in zip(runner_inputs, futures):
            if f.done():
                out.append(self.result(f))
            else:  # its artifact stays until it has run: tune.LateResults removes it then
                token = self.defer((str(r.artifact_path), None, f))
                out.append(self._error(result_codes.deferred(
                    token, "still waiting for the GPU when its round was built; reported later")))
                deferred += 1
        if deferred:
            logging.getLogger("schedsearch.ms").info(
                "%d of %d runs deferred: still waiting for the GPU %.0f s after the round was built",
                deferred, len(futures), self.RUN_GRACE_S)
        return out

    def defer(self, entry=None) -> int:
        """A token for a candidate measured later: `entry` (artifact path, None, run future), or None
        while it still builds (then run_late)."""
        self._tokens += 1
        self._late[self._tokens] = entry
        return self._tokens

    def run_late(self, token: int, path: str | None, error: str | None, args_json: tuple) -> None:
        self._late[token] = (path, error, None if error else self._submit(path, self.device_type, args_json))

    def take_late(self, wait: bool = False) -> list:
        """(token, BuilderResult, RunnerResult) of deferred candidates whose measurement finished;
        `wait`: all of them, waiting for those still building or running."""
        out = []
        for token in list(self._late):
            while wait and self._late[token] is None:
                time.sleep(0.05)
            entry = self._late[token]
            if entry is None or (entry[2] is not None and not wait and not entry[2].done()):
                continue
            del self._late[token]
            path, error, run = entry
            out.append((token, ms.builder.BuilderResult(path, error),
                        self.result(run).result() if run is not None else ms.runner.RunnerResult(None, error)))
        return out

    def result(self, future):
        from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

        try:
            return LocalRunnerFuture(res=future.result(), error_message=None)
        except TimeoutError:
            return self._error(f"LocalRunner: Timeout, killed after {self.timeout_sec} seconds\n")
        except Exception as e:  # the worker's exception, worded as the stock runner words it
            return self._error("LocalRunner: An exception occurred\n" + str(e))

    @staticmethod
    def _error(msg: str):
        from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture

        return LocalRunnerFuture(error_message=msg)


def make_builder_and_runner(target: Target, overlap: bool | None = None,
                            defer_stragglers: bool = True) -> tuple[WarmBuilder, WarmRunner]:
    runner = WarmRunner(target, overlap=overlap, defer=defer_stragglers)
    return WarmBuilder(runner, defer_stragglers=defer_stragglers), runner


def update_cost_model(cost_model, ctx, candidates: list, results: list) -> None:
    """`cost_model.update`, less the candidates whose features TVM cannot extract: on the H200, mutants of
    an LLM matmul program built and ran, then failed there ("All loops that are bound to `threadIdx.x`
    should have the same extent"), which ended the search; one such kernel must not cost the rest."""
    try:
        cost_model.update(ctx, candidates, results)
        return
    except Exception:  # TVM raises RuntimeError, TVMError...
        pass
    extractor, keep = ms.feature_extractor.PerStoreFeature(), []
    for c, r in zip(candidates, results):
        try:
            extractor.extract_from(ctx, [c])
            keep.append((c, r))
        except Exception as e:
            logging.getLogger("schedsearch.ms").warning("a measured candidate left out of the cost model: %s",
                                                        str(e).strip().splitlines()[-1][:200] if str(e).strip() else e)
    if keep:
        cost_model.update(ctx, [c for c, _ in keep], [r for _, r in keep])

