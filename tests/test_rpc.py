"""Measuring through TVM's RPC tracker: a tracker and CPU workers on 127.0.0.1, started and killed here."""
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from schedsearch.errors import UserError
from schedsearch.result_codes import lost_worker
from schedsearch.options import parse_runner_spec
from schedsearch.rpc import retrying_runner

ROOT = Path(__file__).resolve().parent.parent

# `schedsearch tracker|worker` through rpc.add_commands alone, whether or not cli.py lists them yet.
CLI = ("import argparse, sys\nfrom schedsearch import rpc\np = argparse.ArgumentParser()\n"
       "handlers = rpc.add_commands(p.add_subparsers(dest='command'))\n"
       "args = p.parse_args()\nsys.exit(handlers[args.command](args))")


def test_importing_it_for_the_cli_parser_does_not_import_tvm():
    code = "import sys, schedsearch.rpc; print('tvm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_parse_runner_spec():
    assert parse_runner_spec("local") is None
    assert parse_runner_spec("rpc://10.0.0.5:9190/h100") == ("10.0.0.5", 9190, "h100")
    assert parse_runner_spec("rpc://gpu-box.lan:9190/h100-sxm") == ("gpu-box.lan", 9190, "h100-sxm")
    for bad in ("rpc://host/h100", "rpc://host:99999/h100", "rpc://host:9190", "tcp://host:9190/k", "remote"):
        with pytest.raises(UserError, match="expected local or rpc://HOST:PORT/KEY"):
            parse_runner_spec(bad)


def test_the_worker_serves_without_torch_touching_cuda_and_the_tracker_names_a_missing_tornado(monkeypatch):
    """On the H200 a GPU worker measured nothing: tvm_ffi's import asked torch.cuda.is_available() in TVM's server,
    and each forked session then failed "cudaErrorInitializationError" (a child forked after `import tvm` did; with
    TVM_FFI_DISABLE_TORCH_C_DLPACK=1 it reached the GPU). The tracker without tornado died in a traceback."""
    import argparse
    import importlib.util

    from schedsearch import rpc

    started = []
    monkeypatch.setattr(rpc, "wait_for_tracker", lambda host, port: None)
    monkeypatch.setattr(rpc, "_run_tvm_program", lambda module_args, env=None: started.append(env) or 0)
    rpc.cmd_worker(argparse.Namespace(tracker="127.0.0.1:9190", key="h200", gpu=0, port=9090, host="0.0.0.0",
                                      address=None))
    assert started[0]["TVM_FFI_DISABLE_TORCH_C_DLPACK"] == "1" and started[0]["CUDA_VISIBLE_DEVICES"] == "0"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tornado" else find_spec(name, *a))
    with pytest.raises(UserError, match="schedsearch tracker needs tornado.*pip install tornado"):
        rpc.cmd_tracker(argparse.Namespace(host="127.0.0.1", port=9190))


class _Done:
    def __init__(self, error_msg):
        from tvm.s_tir import meta_schedule as ms

        self._result = ms.runner.RunnerResult(None if error_msg else [1e-3], error_msg)

    def done(self):
        return True

    def result(self):
        return self._result


class ScriptedRunner:
    """Answers the n-th submission of an input with script[input's artifact path][n]; counts submissions."""

    def __init__(self, script):
        self.script, self.submitted = script, {k: 0 for k in script}

    def run(self, inputs):
        futures = []
        for i in inputs:
            name = str(i.artifact_path)
            futures.append(_Done(self.script[name][self.submitted[name]]))
            self.submitted[name] += 1
        return futures


def test_lost_candidates_are_measured_once_more_kernel_errors_are_not():
    from tvm.s_tir import meta_schedule as ms

    shutdown = ("RPCRunner: An exception occurred\n...\ntvm.error.InternalError: "
                "Check failed: (code == RPCCode::kReturn) is false: code=kShutdown")
    broken = "RPCRunner: An exception occurred\n...\ntvm.error.InternalError: Socket SockChannel::Send Error:Broken pipe"
    timeout = "RPCRunner: Timeout, killed after 10 seconds"
    kernel = "RPCRunner: An exception occurred\n...\nRPCError: CUDA: an illegal memory access was encountered"
    session_expired = "RPCSessionTimeoutError: Your 10s session has expired"
    assert lost_worker(shutdown) and lost_worker(broken) and lost_worker(timeout)
    assert not lost_worker(kernel) and not lost_worker(session_expired) and not lost_worker(None)

    inner = ScriptedRunner({"lost-then-ok": [shutdown, None], "kernel-error": [kernel],
                            "lost-twice": [timeout, shutdown, None], "ok": [None]})
    inputs = [ms.runner.RunnerInput(name, "cpu", []) for name in inner.script]
    futures = retrying_runner(inner).run(inputs)
    assert [f.done() for f in futures] == [True] * 4
    errors = [f.result().error_msg for f in futures]
    assert errors == [None, kernel, shutdown, None]
    assert inner.submitted == {"lost-then-ok": 2, "kernel-error": 1, "lost-twice": 2, "ok": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def _wait(predicate, limit_s, what):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > limit_s:
            raise AssertionError(f"timed out after {limit_s} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path):
    """start(name, *command args) -> (command process, its log); tvm_group(command process) -> the process
    group of the TVM program it runs. Every process started is killed afterwards."""
    commands, groups = [], []

    def start(name, *args):
        log = tmp_path / f"{name}.log"
        with open(log, "w") as f:
            commands.append(subprocess.Popen([sys.executable, "-c", CLI, *args], cwd=ROOT, stdout=f,
                                             stderr=subprocess.STDOUT, start_new_session=True,
                                             env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        return commands[-1], log

    def tvm_group(command):
        groups.append(psutil.Process(command.pid).children()[0].pid)
        return groups[-1]

    yield start, tvm_group
    for command in commands:
        with contextlib.suppress(psutil.NoSuchProcess):
            groups.extend(c.pid for c in psutil.Process(command.pid).children())
    for pgid in groups + [c.pid for c in commands]:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    for command in commands:
        command.wait()


@pytest.mark.slow
def test_tune_through_tracker_survives_a_dead_and_a_hung_worker(tmp_path, cluster):
    """Three CPU workers; one is killed while measuring, one stops answering. The tune still measures
    every candidate: those the lost workers held are measured again on the third."""
    from tvm.s_tir import meta_schedule as ms

    from schedsearch import frontend, target as targets, tune, workload
    from schedsearch.rpc import count_workers, make_rpc_runner
    from schedsearch.rundir import RunDir

    start, tvm_group = cluster
    _, tracker_log = start("tracker", "tracker", "--host", "127.0.0.1", "--port", str(_free_port()))
    _wait(lambda: "tracker listening on" in tracker_log.read_text(), 60, "the tracker's address")
    port = int(re.search(r"tracker listening on 127\.0\.0\.1:(\d+)", tracker_log.read_text())[1])
    _wait(lambda: _accepts(port), 60, "the tracker")
    workers = [start(f"worker{i}", "worker", "--tracker", f"127.0.0.1:{port}", "--key", "cpu",
                       "--host", "127.0.0.1", "--port", str(_free_port())) for i in range(3)]
    config = ms.runner.RPCConfig("127.0.0.1", port, "cpu", session_timeout_sec=10)
    _wait(lambda: count_workers(config)[0] == 3, 90, "three workers to register")

    target = targets.resolve("llvm")
    wl = workload.load(ROOT / "workloads/level1/matmul.py", "small")
    tasks = frontend.extract_tasks(frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "m.onnx"),
                                                        wl.shapes()), target)
    # min_repeat_ms stretches each session to ~0.3 s, so the kill below most likely lands inside one.
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=3, min_repeat_ms=100, enable_cpu_cache_flush=False)
    # A frozen worker is given up on after 2 * 3 + 10 s.
    runner = make_rpc_runner("127.0.0.1", port, "cpu", target, evaluator, session_timeout_sec=3)

    def sessions(log):
        return log.read_text().count("connected from")

    # Worker 1 stops answering before the tune: the tracker still hands it a candidate (its free slot
    # is queued ahead of the slots the others free again). Worker 0 is killed at its first session.
    dead, frozen, healthy = workers
    frozen_group = tvm_group(frozen[0])
    os.killpg(frozen_group, signal.SIGSTOP)
    # Should the runner wait for it for ever, end it after 2 minutes: the test then fails, not hangs.
    unfreeze = threading.Timer(120, os.killpg, (frozen_group, signal.SIGKILL))
    unfreeze.daemon = True
    unfreeze.start()

    def kill_dead():
        _wait(lambda: sessions(dead[1]) >= 1, 120, "a session on the worker to kill")
        os.killpg(tvm_group(dead[0]), signal.SIGKILL)

    killer = threading.Thread(target=kill_dead, daemon=True)
    killer.start()
    run = RunDir(tmp_path / "run").create()
    # No stub for tvm.s_tir.tensor_intrin: on a CPU with AVX-512 VNNI the host -mcpu's x86 rules use its
    # intrinsics ("TensorIntrin 'dot_16x4_vnni' is not registered" with a stub, this file alone on the CPU box);
    # tune.search imports it the fast way.
    trials = 16
    try:
        tune.search(tasks, target, run, "ansor", lambda t: "evolutionary", trials=trials, runner=runner)
    finally:
        unfreeze.cancel()
    killer.join(timeout=1)
    assert not killer.is_alive(), "the worker was not killed while the tune ran"

    assert sessions(dead[1]) >= 1 and sessions(healthy[1]) >= 1
    assert count_workers(config)[0] == 2  # the tracker dropped the dead one; the frozen one holds on
    records = [json.loads(line) for line in run.trials.read_text().splitlines()]
    assert len(records) == trials
    # The candidate the frozen worker held (and the dead one's, if it held one right then, which TVM's
    # own retry of the connection may also cover) was measured again on a live worker.
    assert [r["error"] for r in records if r["latency_us"] is None] == []
    assert "measuring it once more: RPCRunner: Timeout" in run.log.read_text()
