"""Measure candidates on many GPUs and hosts through TVM's RPC tracker.

Candidates are built on the tuning machine; TVM's tracker hands each one to whichever worker
(a TVM RPC server for one GPU, registered under a device key) is free. This module only
wires TVM's own tracker, server and `RPCRunner` together and adds what they lack: a timeout
for workers that stop answering, and one more try for candidates whose worker was lost.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

from .errors import UserError
from .result_codes import lost_worker

log = logging.getLogger("schedsearch.ms.rpc")  # lands in the run dir's tune.log


@functools.cache
def _retrying_runner_class():
    """Defined on first use: `import schedsearch.rpc` (the CLI's parser) must not import TVM (~2.5 s)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class RetryOnceFuture(ms.runner.PyRunnerFuture):
        def __init__(self, runner, runner_input, future):
            super().__init__()
            self.runner, self.input, self.future, self.retried = runner, runner_input, future, False

        def _retry_if_lost(self) -> None:
            error = self.future.result().error_msg
            if not self.retried and lost_worker(error):
                log.warning("worker lost a candidate; measuring it once more: %s", error.strip().splitlines()[-1])
                self.future, self.retried = self.runner.run([self.input])[0], True

        def done(self) -> bool:
            if self.future.done():
                self._retry_if_lost()
            return self.future.done()

        def result(self):
            self._retry_if_lost()
            return self.future.result()

    @derived_object
    class RetryingRunner(ms.runner.PyRunner):
        def __init__(self, inner, before_run=None):
            super().__init__()
            self.inner, self.before_run = inner, before_run

        def run(self, runner_inputs):
            if self.before_run is not None:
                self.before_run()
            futures = self.inner.run(runner_inputs)
            return [RetryOnceFuture(self.inner, i, f) for i, f in zip(runner_inputs, futures)]

    return RetryingRunner


def retrying_runner(inner, before_run: Callable[[], object] | None = None):
    """`inner`'s results, except that a candidate lost with its worker is submitted to `inner` once more.
    `before_run` is called before each batch."""
    return _retrying_runner_class()(inner, before_run)


def _run_evaluator_capped(_session, rt_mod, device, evaluator_config, repeated_args):
    """measure.run_evaluator_capped with RPCRunner's signature (it runs here, timing the remote device)."""
    from .measure import run_evaluator_capped

    return run_evaluator_capped(rt_mod, device, evaluator_config, repeated_args)


def count_workers(config) -> tuple[int, list[str]]:
    """Workers registered under config's key, and all keys the tracker knows."""
    try:  # TVM's own client retries for a minute with a warning a line: say it once instead
        socket.create_connection((config.tracker_host, config.tracker_port), timeout=10).close()
    except OSError as e:
        raise UserError(f"cannot reach the RPC tracker at {config.tracker_host}:{config.tracker_port} ({e}): "
                        f"start it with `schedsearch tracker --port {config.tracker_port}`") from None
    tracker = config.connect_tracker()
    try:
        servers = tracker.summary()["server_info"]
    finally:
        tracker.close()
    keys = [s["key"].split(":", 1)[1] for s in servers]
    return keys.count(config.tracker_key), sorted(set(keys))


def wait_for_workers(config, limit_s: float | None) -> int:
    """Block until a worker is registered under the key; UserError after `limit_s` (None: wait for ever)."""
    t0, said = time.time(), False
    while True:
        n, keys = count_workers(config)
        if n:
            return n
        if limit_s is not None and time.time() - t0 > limit_s:
            raise UserError(f"no worker registered under key {config.tracker_key!r} at the tracker "
                            f"{config.tracker_host}:{config.tracker_port} (keys there: {', '.join(keys) or 'none'}): "
                            f"start one with `schedsearch worker --tracker {config.tracker_host}:"
                            f"{config.tracker_port} --key {config.tracker_key}`")
        if not said and limit_s is None:
            print(f"schedsearch: no worker under key {config.tracker_key!r} is left: waiting for one to register",
                  file=sys.stderr)
            said = True
        time.sleep(1.0)


def make_rpc_runner(host: str, port: int, key: str, target, evaluator_config,
                    session_timeout_sec: float | None = None, max_workers: int | None = None, wait_s: float = 30.0):
    """A runner measuring on the workers registered under `key` at the tracker host:port.

    One candidate per worker is in flight at once (`max_workers`: default the workers registered now).
    A session running past `session_timeout_sec` is ended by its worker and recorded as an error; a
    worker that answers nothing for twice that (plus slack for queueing) is given up on."""
    from tvm.s_tir import meta_schedule as ms

    from . import target as targets
    from .measure import worker_pool

    timeout = session_timeout_sec or targets.kind(target).run_timeout_s  # as measure.WarmRunner
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_timeout_sec=timeout)
    workers = max_workers or wait_for_workers(config, limit_s=wait_s)
    inner = ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator_config,
                                f_run_evaluator=_run_evaluator_capped, max_workers=workers)
    # RPCRunner's pool waits for ever, so one hung worker would stall the tune: give each job a
    # deadline (the pool kills and replaces the process, the candidate gets "RPCRunner: Timeout").
    inner.pool.shutdown()
    inner.pool = worker_pool(workers, 2 * timeout + 10)
    return retrying_runner(inner, before_run=lambda: wait_for_workers(config, limit_s=None))


class WorkerModule:
    """A compiled module (module.so) run on a worker the tracker hands out, for a target whose device is not on
    this machine: CPU torch tensors in and out, copied to the worker's device and back. An input the kernel
    modified stays on the worker: the validation's mutation check cannot see it."""

    device = "cpu"  # where the tensors given and returned live

    def __init__(self, path, host: str, port: int, key: str, target):
        from tvm import relax
        from tvm.s_tir import meta_schedule as ms

        from . import target as targets

        # The worker ends a session after its timeout: an hour is past any validation (and the tracker's connect).
        config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=3600)
        wait_for_workers(config, limit_s=None)
        self.session = config.connect_server()
        self.session.upload(str(path))
        lib = self.session.load_module(os.path.basename(path))
        self.dev = self.session.device(targets.kind(target).device, 0)
        # The worker's CPU for the shape functions (VirtualMachine would add this machine's).
        self.vm = relax.VirtualMachine(lib, [self.dev, self.session.cpu(0)] if targets.is_gpu(target) else [self.dev])

    def _args(self, inputs) -> list:
        import tvm

        return [tvm.runtime.tensor(x.detach().cpu().numpy(), device=self.dev) for x in inputs]

    def __call__(self, *inputs) -> list:
        import torch
        import tvm_ffi

        out = self.vm["main"](*self._args(inputs))
        return [torch.from_numpy(o.numpy()) for o in (list(out) if isinstance(out, (tuple, list, tvm_ffi.Array)) else [out])]

    def time(self, inputs, repeats: int) -> dict:
        """Single calls of the whole module on the worker, after one warm-up (timing.summarize's statistics)."""
        from .timing import summarize

        self.vm.set_input("main", *self._args(inputs))
        result = self.vm.time_evaluator("invoke_stateful", self.dev, number=1, repeat=repeats)("main")
        return summarize([1e6 * s for s in result.results])


# ---- command line: `schedsearch tracker` and `schedsearch worker` ----

def add_commands(sub) -> dict:
    t = sub.add_parser("tracker", help="run TVM's RPC tracker, which hands candidates to free workers")
    t.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: all)")
    t.add_argument("--port", type=int, default=9190, help="port to listen on (default 9190)")

    w = sub.add_parser("worker", help="run a TVM RPC server that measures candidates on one GPU (or the CPU)")
    w.add_argument("--tracker", required=True, metavar="HOST:PORT", help="the tracker to register with")
    w.add_argument("--key", required=True, help="device key, the same for identical devices (e.g. h100)")
    w.add_argument("--gpu", type=int, metavar="N",
                   help="GPU index on this host; the worker sees only that GPU (default: all, it measures on the first)")
    w.add_argument("--port", type=int, default=9090, help="first port to try (default 9090; the next free one is taken)")
    w.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: all)")
    w.add_argument("--address", help="address the tuning machine reaches this worker at, if not the one "
                                     "the tracker sees (NAT, several interfaces)")
    return {"tracker": cmd_tracker, "worker": cmd_worker}


def cmd_tracker(args) -> int:
    if importlib.util.find_spec("tornado") is None:
        raise UserError("schedsearch tracker needs tornado (TVM's tracker imports it): pip install tornado")
    with socket.socket() as probe:  # say so plainly if the port is taken (by an old tracker, say)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((args.host, args.port))
        except OSError as e:
            raise UserError(f"cannot listen on {args.host}:{args.port}: {e.strerror} (a tracker running there "
                            f"already?): choose another --port") from None
    name = socket.gethostname() if args.host == "0.0.0.0" else args.host
    print(f"tracker listening on {args.host}:{args.port} (Ctrl-C stops it)\n"
          f"  workers: schedsearch worker --tracker {name}:{args.port} --key KEY [--gpu N]\n"
          f"  tuning:  schedsearch tune ... --runner rpc://{name}:{args.port}/KEY", flush=True)
    # --port-end: exactly this port, as workers and tunes are told it.
    return _run_tvm_program(["tvm.exec.rpc_tracker", "--host", args.host, "--port", str(args.port),
                             "--port-end", str(args.port + 1)])


def cmd_worker(args) -> int:
    host, _, port = args.tracker.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--tracker {args.tracker!r}: expected HOST:PORT, e.g. 10.0.0.5:9190")
    # TVM's server forks a process per session. tvm_ffi's import asks torch.cuda.is_available(), which
    # initializes CUDA in the server, and a forked child then cannot: on the H200 every measurement and the
    # validation failed with "cudaErrorInitializationError (3)" until this was set.
    env = dict(os.environ, TVM_FFI_DISABLE_TORCH_C_DLPACK="1")
    if args.gpu is not None:  # the server's device 0 is this GPU
        env["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    print(f"worker for {'GPU ' + str(args.gpu) if args.gpu is not None else 'this host'} registering with "
          f"{args.tracker} under key {args.key!r} (Ctrl-C stops it)", flush=True)
    try:
        wait_for_tracker(host, int(port))
    except KeyboardInterrupt:
        return 0
    return _run_tvm_program(["tvm.exec.rpc_server", "--tracker", args.tracker, "--key", args.key,
                             "--host", args.host, "--port", str(args.port), "--port-end", str(args.port + 100),
                             *(["--custom-addr", args.address] if args.address else [])], env)


TRACKER_WAIT_SAY_S = 60


def wait_for_tracker(host: str, port: int, say_every_s: float = TRACKER_WAIT_SAY_S) -> None:
    """Until the tracker accepts connections, with a line now and then each minute. TVM's server, started
    first, retried 12 times, printed a thread traceback and stayed alive unregistered for good (issue 23)."""
    t0, said = time.time(), None
    while True:
        try:
            socket.create_connection((host, port), timeout=5).close()
            if said is not None:
                print(f"tracker {host}:{port} is up after {time.time() - t0:.0f} s: registering", flush=True)
            return
        except OSError as e:
            if said is None or time.time() - said >= say_every_s:
                print(f"no tracker at {host}:{port} yet ({e.strerror or e}): retrying every second "
                      "(start it with `schedsearch tracker`; Ctrl-C stops this worker)", flush=True)
                said = time.time()
        time.sleep(1.0)


def _run_tvm_program(module_args: list[str], env: dict | None = None) -> int:
    """Run one of TVM's RPC programs until it ends or this command is stopped (Ctrl-C, SIGTERM).

    It runs in a process group of its own, ended as a whole: TVM serves from helper processes
    that outlive their parent otherwise."""
    proc = subprocess.Popen([sys.executable, "-m", *module_args], env=env, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait()
