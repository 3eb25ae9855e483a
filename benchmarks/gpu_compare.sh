#!/usr/bin/env bash
# Runs (or resumes) `schedsearch compare` on the lent GPU machine, stopping it (SIGINT: the round in flight is
# measured and kept) after DEADLINE seconds, with the log in $OUT/log.txt and the comparison packed into
# $OUT/compare.tar.xz (less modules and ONNX files). A fresh machine resumes from .gpu/compare.tar.xz, the
# last call's pack carried back. The device tool returns at most 8 files.
#   DEADLINE=540 bash benchmarks/gpu_compare.sh DIR WORKLOAD.py... [compare options]
# The checkout travels with .devdeps (~62 MiB) under the tool's 64 MiB: on 2026-12-01 that held only with
# schedules/ and docs/reports/ moved out of the working tree for the calls (nothing there is needed on the
# GPU), and the bundle's site.tar.xz as packed (libtvm_ffi_testing.so in it is imported by tvm_ffi.core).
set -uo pipefail
source .devdeps/activate.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
dir=$1; shift
if [[ ! -d $dir && -f .gpu/compare.tar.xz ]]; then tar -xJf .gpu/compare.tar.xz; fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
timeout --signal=INT --kill-after=60 "${DEADLINE:-540}" python3 -m schedsearch compare "$@" -o "$dir" 2>&1 |
  grep --line-buffered -v "Warning\|__new__" | tee "$OUT/log.txt"
echo "compare exit ${PIPESTATUS[0]}"
tar -cJf "$OUT/compare.tar.xz" --exclude=module.so --exclude='*.onnx' --exclude='*.onnx.data' "$dir"
ls -la "$OUT"
