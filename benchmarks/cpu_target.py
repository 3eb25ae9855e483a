"""The same schedules compiled for baseline x86-64 (no -mcpu, what `--target llvm` gave before) and
for this CPU (-mcpu from LLVM, what it gives now), timed alternately in one process.

    python benchmarks/cpu_target.py RUN_DIR [--rounds 5] [--repeats 200] [--mcpu CPU]

RUN_DIR: a finished CPU run (`schedsearch tune ... --target llvm`). For each task the best record's
schedule is compiled both ways and timed with TVM's time_evaluator (kernel alone, warm cache); the
whole module is built from the run's database both ways and timed as `tune` times it (timing.py:
single calls, cache flushed before each). Rounds alternate the two, so load on a shared box hits both.
"""
import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import tvm
from tvm.s_tir import meta_schedule as ms
from tvm.target import Target

from schedsearch import frontend, measure, target as targets, timing, validate, workload
from schedsearch.report import fmt_us, table
from schedsearch.rundir import RunDir
from schedsearch.runtime import CompiledModule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=200, help="kernel calls per round (time_evaluator)")
    p.add_argument("--mcpu", help="compile the 'host' arm for this CPU instead of LLVM's name for this one")
    args = p.parse_args()

    run = RunDir(Path(args.run_dir))
    res = run.read_results()
    wl = workload.load(res.workload["path"], res.workload["size"])
    arms = {"baseline x86-64": Target({"kind": "llvm", "num-cores": res.device["cores"]}),
            "host": targets.resolve("llvm" + (f" -mcpu={args.mcpu}" if args.mcpu else ""))}
    db = ms.database.JSONDatabase(work_dir=str(run.database))
    with tempfile.TemporaryDirectory() as tmp:
        mod = frontend.import_onnx(frontend.export_onnx(wl, Path(tmp) / "model.onnx"), wl.shapes())
    dev = tvm.cpu(0)
    rows, raw = [], {}
    for task in frontend.extract_tasks(mod, arms["host"]):
        record = db.query_tuning_record(task.mod, arms["host"], task.name)
        if record is None:
            continue
        sch = tvm.s_tir.Schedule(task.mod)
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        kernels = {name: measure.build_kernel(sch.mod, t, None) for name, t in arms.items()}
        buffers = [tvm.runtime.tensor(np.random.default_rng(0).standard_normal(
            [int(d) for d in a.shape]).astype(str(a.dtype)), dev)
            for a in ms.arg_info.ArgInfo.from_prim_func(sch.mod["main"])]
        samples = {name: [] for name in arms}
        for _ in range(args.rounds):
            for name, k in kernels.items():
                f = k.time_evaluator(k.entry_name, dev, number=args.repeats, repeat=1)
                samples[name].append(f(*buffers).mean * 1e6)
        raw[task.name] = samples
        rows.append([f"kernel {task.name} (best record, warm cache)",
                     *(fmt_us(statistics.median(samples[n])) for n in arms),
                     f"{statistics.median(samples['baseline x86-64']) / statistics.median(samples['host']):.2f}x"])

    modules = {name: CompiledModule(frontend.compile_module(mod, t, db), "cpu") for name, t in arms.items()}
    inputs = validate.make_inputs(wl, 0, "normal", "cpu")
    e2e = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name, m in modules.items():
            e2e[name].append(timing.time_call(lambda: m(*inputs), "cpu", repeats=20)["median_us"])
    rows.append(["end to end (tune's timing)", *(fmt_us(statistics.median(e2e[n])) for n in arms),
                 f"{statistics.median(e2e['baseline x86-64']) / statistics.median(e2e['host']):.2f}x"])
    print(f"{wl.name} ({wl.size}), {run.root}; host arm: {arms['host']}; median of {args.rounds} alternating rounds")
    print(table(["what", *arms, "speedup"], rows))
    print(json.dumps({"samples_us": {**raw, "end to end": e2e}}))


if __name__ == "__main__":
    main()
