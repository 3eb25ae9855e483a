"""One timing method for TVM and PyTorch alike: warm-up, then `repeats` single calls, each
after flushing the cache, timed with CUDA events on GPU (perf_counter on CPU); median and spread."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np
import torch

L2_FLUSH_BYTES = 256 << 20  # larger than any current GPU's L2 (H100/H200: 50 MiB)
CPU_FLUSH_BYTES = 64 << 20
METHOD = ("median of single calls after a warm-up of 3; cache flushed before each call "
          "(256 MiB write on GPU, 64 MiB on CPU); CUDA events on GPU, perf_counter on CPU")


def time_call(fn: Callable[[], object], device: str, *, repeats: int, warmup: int = 3) -> dict:
    is_cuda = device.startswith("cuda")
    # On CPU flush with numpy, single-threaded: a parallel torch fill wakes torch's OpenMP team and
    # the next call then races TVM's pool for 2 cores (medians of 16 ms for a 70 us matmul, seen here).
    scratch = (torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if is_cuda
               else np.empty(CPU_FLUSH_BYTES, dtype=np.uint8))
    for _ in range(warmup):
        fn()
    if is_cuda:
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        if is_cuda:  # evict the inputs from cache: we time the cold-cache call, like a real layer
            scratch.fill_(1)
        else:
            scratch.fill(1)
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    return summarize(samples)


def summarize(samples_us: list[float]) -> dict:
    s = sorted(samples_us)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) >= 2 else [s[0]] * 9
    return {"median_us": statistics.median(s), "min_us": s[0], "p10_us": q[0], "p90_us": q[-1],
            "mean_us": statistics.fmean(s), "repeats": len(s)}


def spread(stats: dict) -> float:
    """Relative run-to-run spread (p90 - p10) / median: speedups inside it are noise."""
    return (stats["p90_us"] - stats["p10_us"]) / stats["median_us"]



# Above this spread a timing's calls are bimodal (some stalled), not one latency: no ratio is drawn from it.
# PyTorch eager, softmax 8x256 on the 2-core CPU box while other processes ran: spreads of 106-308% with its
# 2 intra-op threads (medians 4.0-8.6 ms, p10 0.14-1.3 ms), 34-37% with 1 thread (medians 106-110 us).
MAX_SPREAD = 1.0


def ratio_is_noise(a: dict, b: dict, names: tuple[str, str]) -> str | None:
    """Why the ratio of two timings' medians would be noise (a spread above MAX_SPREAD, or p10..p90 ranges
    that overlap), or None when it is not."""
    for name, stats in zip(names, (a, b)):
        if spread(stats) > MAX_SPREAD:
            return f"{name}'s p10..p90 spread is {100 * spread(stats):.0f}% of its median"
    if not (a["p90_us"] < b["p10_us"] or b["p90_us"] < a["p10_us"]):
        return "the p10..p90 ranges overlap"
    return None
