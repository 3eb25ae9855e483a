#!/usr/bin/env bash
# Tunes workloads on the lent GPU machine, one `schedsearch tune` each, in one Python process
# (TVM's tensor_intrin import costs ~50 s a process there), and packs the run dirs into
# $OUT/runs.tgz (the device tool returns at most 8 files). Resumable: a second call continues.
#   bash benchmarks/gpu_tune.sh TRIALS STRATEGY SIZE WORKLOAD.py...
set -uo pipefail
source .devdeps/activate.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
python3 - "$@" <<'PY' 2>&1 | grep --line-buffered -v "Warning\|__new__" | tee "$OUT/log.txt"
import os, subprocess, sys, time
from schedsearch.cli import main
trials, strategy, size, *workloads = sys.argv[1:]
for w in workloads:
    name = os.path.basename(w)[:-3]
    t0 = time.time()
    try:
        rc = main(["tune", w, "--trials", trials, "--strategy", strategy, "--size", size,
                   "-o", f"runs/gpu/{strategy}/{name}"])
    except Exception as e:  # report and go on to the next workload
        import traceback; traceback.print_exc(); rc = repr(e)
    print(f"== {name}: rc {rc}, {time.time() - t0:.0f} s wall", flush=True)
    subprocess.run(["tar", "czf", os.environ["OUT"] + "/runs.tgz", "--exclude=module.so",
                    "--exclude=*.onnx", "--exclude=*.onnx.data", "runs/gpu"], check=True)
PY
