#!/usr/bin/env bash
# Tunes workloads on the lent GPU machine, one `schedsearch tune` each, in one Python process
# (TVM's tensor_intrin import costs ~50 s a process there), streams the log to $OUT/log.txt and
# packs the run dirs into $OUT/runs.tgz after each workload (the device tool returns at most 8
# files). Stops starting new workloads after DEADLINE seconds; interrupted tunes resume.
#   DEADLINE=540 bash benchmarks/gpu_tune.sh STRATEGY SIZE WORKLOAD.py@TRIALS...
set -uo pipefail
source .devdeps/activate.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
timeout --signal=INT "${DEADLINE:-540}" python3 - "$@" <<'PY' 2>&1 | grep --line-buffered -v "Warning\|__new__" | tee "$OUT/log.txt"
import os, subprocess, sys, time, traceback
from schedsearch.cli import main
strategy, size, *jobs = sys.argv[1:]
for job in jobs:
    path, trials = job.rsplit("@", 1)
    name = os.path.basename(path)[:-3]
    t0 = time.time()
    try:
        rc = main(["tune", path, "--trials", trials, "--strategy", strategy, "--size", size,
                   "-o", f"runs/gpu/{strategy}/{name}"])
    except Exception as e:  # report and go on to the next workload
        traceback.print_exc()
        rc = repr(e)
    print(f"== {name}: rc {rc}, {time.time() - t0:.0f} s wall", flush=True)
    subprocess.run(["tar", "czf", os.environ["OUT"] + "/runs.tgz", "--exclude=module.so",
                    "--exclude=*.onnx", "--exclude=*.onnx.data", "runs/gpu"], check=True)
    if rc == 130:  # the deadline's SIGINT: stop here
        break
PY
