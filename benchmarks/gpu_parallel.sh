#!/usr/bin/env bash
# Runs one shell command per GPU of the lent machine at once, each with its own GPU
# (CUDA_VISIBLE_DEVICES) and an equal share of the cores (taskset), output in $OUT/gpu<i>.txt.
# Packs runs/ (without modules, ONNX files and CUDA caches) into $OUT/runs.tgz every 30 s and at the end, so a
# call cut short still returns what was measured (the device tool returns at most 8 files).
#   bash benchmarks/gpu_parallel.sh "CMD for GPU 0" "CMD for GPU 1" ...
set -uo pipefail
source .devdeps/activate.sh
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
mkdir -p runs
pack() { tar czf "$OUT/runs.tmp.tgz" --exclude=module.so --exclude='*.onnx' --exclude='*.onnx.data' --exclude=cuda-cache runs \
         && mv "$OUT/runs.tmp.tgz" "$OUT/runs.tgz"; }
per=$(( $(nproc) / $# )); pids=()
for i in $(seq 0 $(( $# - 1 ))); do
  cmd=${@:$((i + 1)):1}
  CUDA_VISIBLE_DEVICES=$i taskset -c $(( i * per ))-$(( (i + 1) * per - 1 )) bash -c "$cmd" \
    > "$OUT/gpu$i.txt" 2>&1 &
  pids+=($!)
done
( while sleep 30; do pack; done ) & packer=$!
wait "${pids[@]}"
kill $packer; pack
for i in $(seq 0 $(( $# - 1 ))); do echo "== gpu$i"; grep -v "trials  best\|Warning\|__new__" "$OUT/gpu$i.txt" | tail -25; done
