"""What a MetaSchedule BuilderResult or RunnerResult says beyond a measurement. TVM's result types are
fixed (an error string, a list of seconds), so these facts travel inside them; this module is the only
place that writes or reads them (no TVM imported here).

- deferred: a candidate still building, or still waiting for the GPU, when its round was built
  (measure.WarmBuilder, WarmRunner); its measurement comes later under the token (tune.LateResults).
- capped: a hopeless kernel timed with one call instead of measure.REPEAT (measure.run_evaluator_capped).
- lost worker (RPC) and killed worker: TVM's own messages, recognised here; nothing of ours writes them.
"""
from __future__ import annotations

_DEFERRED = "deferred #"


def deferred(token: int, why: str) -> str:
    """The error message of a deferred candidate."""
    return f"{_DEFERRED}{token}: {why}"


def deferred_token(error_msg) -> int | None:
    """The token of a deferred candidate, from its build or run error; None for any other result."""
    msg = str(error_msg or "")
    return int(msg[len(_DEFERRED):msg.index(":")]) if msg.startswith(_DEFERRED) else None


def capped(seconds: float) -> list[float]:
    """The run_secs of a capped kernel: its one call (a full measurement has measure.REPEAT > 1 samples)."""
    return [seconds]


def is_capped(run_secs) -> bool:
    return len(run_secs) == 1


# How a lost worker looks from the tuning side, as opposed to a kernel's own error: the connection
# dropped mid-call (a reply other than kReturn: kShutdown), no worker could be reached, or none
# answered within the pool's timeout.
# A kernel that crashes its session process looks the same and is tried once more: it costs one session.
LOST_WORKER = ("RPCCode::kReturn) is false", "Cannot request", "Connection refused", "Connection reset", "Broken pipe",
               "RPCRunner: Timeout")


def lost_worker(error_msg: str | None) -> bool:
    return error_msg is not None and any(m in error_msg for m in LOST_WORKER)


# What a candidate's worker process reports when it was killed rather than when the kernel failed: popen_pool's
# ChildProcessError, as the builder (measure.WarmBuilder._outcome) and runner (WarmRunner.result) word it.
WORKER_KILLED = "Subprocess terminated"


def worker_killed(error_msg) -> bool:
    return error_msg is not None and WORKER_KILLED in str(error_msg)
