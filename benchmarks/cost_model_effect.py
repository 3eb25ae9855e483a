"""What a pretrained cost model saves: `ansor` started from nothing vs from a pretrained model (cost_models/),
same workloads, tasks, seeds and trials per task, in one process on one machine, searched one after the other.

    python benchmarks/cost_model_effect.py workloads/level2/*.py --cost-model cost_models/nvidia-h200 \
        [--trials 64] [--seeds 2] [--size small] [--target auto] [--run-dir DIR] [--deadline S] [--json OUT]

Per workload and seed it prints the end-to-end estimate (sum over tasks of weight x the task's best latency
after n trials each) at the end, and the trials per task the pretrained arm took to reach 90% of the from-
nothing arm's final speed (latency <= final / 0.9), and the reverse. Only search, no validation: the
kernels are the arms' best records, checked as any tune checks them when built. --run-dir keeps the arms
(DIR/<workload>/<arm>-s<seed>) and resumes them; --deadline S stops the arm in flight after S seconds (its
measurements kept); run again with the same --run-dir to go on.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

from schedsearch import cost_models, frontend, target as targets, workload
from schedsearch.report import fmt_us, table
from schedsearch.rundir import RunDir
from schedsearch.tune import search

ARMS = ("none", "pretrained")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="+")
    p.add_argument("--cost-model", required=True, help="the pretrained arm's --cost-model (a cost_models/ dir)")
    p.add_argument("--trials", type=int, default=64)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--size", default="default")
    p.add_argument("--target", default="auto")
    p.add_argument("--run-dir")
    p.add_argument("--deadline", type=float, help="seconds; then stop, resumable with --run-dir")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    target = targets.resolve(args.target)
    starts = {"none": cost_models.start("none", target), "pretrained": cost_models.start(args.cost_model, target)}
    root = Path(args.run_dir or tempfile.mkdtemp(prefix="cost-model-effect-"))
    t_end = time.time() + (args.deadline or float("inf"))
    rows = []
    for path in args.workloads:
        wl = workload.load(path, args.size)
        d = root / wl.name
        d.mkdir(parents=True, exist_ok=True)
        mod = frontend.import_onnx(frontend.export_onnx(wl, d / "model.onnx"), wl.shapes())
        tasks = frontend.extract_tasks(mod, target)
        for seed in range(args.seeds):
            curves = {}
            for arm in ARMS:
                if time.time() > t_end:
                    print(f"deadline: {wl.name} {arm} seed {seed} left for the next invocation")
                    continue
                done = search(tasks, target, RunDir(d / f"{arm}-s{seed}").create(), "ansor",
                              lambda t: "evolutionary", args.trials, seed, cost_model=starts[arm],
                              stop=lambda: time.time() > t_end)
                if time.time() <= t_end:  # finished, not stopped: the run dir says so on the next invocation too
                    curves[arm] = end_to_end(tasks, done, args.trials)
            if len(curves) == 2:
                rows.append({"workload": wl.name, "tasks": len(tasks), "seed": seed, "trials": args.trials,
                             "device": targets.facts(target)["name"], "curves_us": curves,
                             "cost_model": starts["pretrained"].record()})
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    report(rows)


def end_to_end(tasks, done: dict, trials: int) -> list:
    """Sum over tasks of weight x best latency after n trials of each, n = 1..trials (None until every task
    has a valid one). A task whose space ran dry before `trials` keeps its best."""
    out = []
    for n in range(1, trials + 1):
        bests = [min((r["latency_us"] for r in done.get(t.name, [])[:n] if r["latency_us"] is not None),
                     default=None) for t in tasks]
        out.append(None if None in bests else sum(t.weight * b for t, b in zip(tasks, bests)))
    return out


def trials_to(curve: list, goal: float) -> int | None:
    return next((n for n, v in enumerate(curve, 1) if v is not None and v <= goal), None)


def report(rows: list[dict]) -> None:
    if not rows:
        return print("no workload finished both arms")
    print(f"ansor from nothing vs from {rows[0]['cost_model'].get('path')} on {rows[0]['device']}, "
          f"{rows[0]['trials']} trials per task")
    cells = []
    for r in rows:
        none, pre = r["curves_us"]["none"], r["curves_us"]["pretrained"]
        n_final, p_final = none[-1], pre[-1]
        cells.append([r["workload"], r["tasks"], r["seed"], fmt_us(n_final), fmt_us(p_final),
                      f"{n_final / p_final:.2f}x" if n_final and p_final else "-",
                      trials_to(none, n_final / 0.9) if n_final else "-",
                      trials_to(pre, n_final / 0.9) if n_final else "-",
                      trials_to(pre, p_final / 0.9) if p_final else "-",
                      trials_to(none, p_final / 0.9) if p_final else "-"])
    print(table(["workload", "tasks", "seed", "final, from nothing", "final, pretrained", "speedup",
                 "trials to 90% of nothing's final: nothing", "pretrained",
                 "to 90% of pretrained's final: pretrained", "nothing"], cells))


if __name__ == "__main__":
    main()
