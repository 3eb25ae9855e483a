"""Command line: argument parsing and error reporting only."""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

from . import compare, export, llm_bridge, rpc, strategies
from .errors import INTERRUPTED, INTERRUPTED_MESSAGE, UserError, catch_interrupts, os_error_message
from .options import (Tuning, add_cost_model_option, add_evaluation_options, add_library_option, add_llm_options,
                      add_runner_option, add_shared_memory_option, add_target_options, evaluation_options,
                      llm_options, positive, shape_arg, strategy_options, tuning_options)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="schedsearch", description="ML-guided schedule search for TVM kernels")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("workloads", help="list the built-in workloads")

    t = sub.add_parser("tune", help="tune a workload and write a run directory")
    t.add_argument("workload", help="KernelBench-format .py problem file or .onnx file")
    t.add_argument("-o", "--output", help="run directory (default runs/<workload>-<strategy>)")
    t.add_argument("--strategy", default=Tuning.strategy,
                   help=f"{' | '.join(strategies.NAMES)} (default {Tuning.strategy})")
    t.add_argument("--trials", type=positive, default=Tuning.trials,
                   help=f"hardware measurements per task (default {Tuning.trials})")
    add_target_options(t)
    t.add_argument("--size", default="default", help="workload size from its SIZES dict, e.g. small")
    t.add_argument("--input-shape", type=shape_arg, action="append", default=[],
                   help="NAME=D0,D1,... for an ONNX input with dynamic dimensions (repeatable)")
    t.add_argument("--seed", type=int, default=Tuning.seed, help=f"search seed (default {Tuning.seed})")
    add_evaluation_options(t)
    add_runner_option(t)
    add_cost_model_option(t)
    add_shared_memory_option(t)
    add_library_option(t)
    add_llm_options(t)
    COMMANDS.update(export.add_commands(sub))
    COMMANDS.update(compare.add_commands(sub))
    COMMANDS.update(rpc.add_commands(sub))
    COMMANDS.update(llm_bridge.add_commands(sub))

    lib = sub.add_parser("library", help="the program library: measured programs kept by kernel structure")
    b = lib.add_subparsers(dest="library_command", required=True).add_parser(
        "build", help="build a library from run dirs and databases")
    b.add_argument("sources", nargs="+", type=Path,
                   help="run dirs, databases, or directories holding them (e.g. schedules/nvidia-h200)")
    b.add_argument("-o", "--output", required=True, type=Path, help="library file, e.g. schedules/library/cuda.json")
    b.add_argument("--per-structure", type=positive, default=8,
                   help="programs kept per kernel structure and target kind, fastest first (default 8)")

    m = sub.add_parser("train-cost-model", help="train the search's XGBoost cost model on measured databases")
    m.add_argument("databases", nargs="+", type=Path,
                   help="run dirs, databases, or directories holding them (e.g. schedules/nvidia-h100)")
    m.add_argument("-o", "--output", required=True, type=Path, help="model directory, e.g. cost_models/nvidia-h100")
    m.add_argument("--device", help="the device that measured databases without a results.json beside them, "
                                    "e.g. 'NVIDIA H100 80GB HBM3'")
    m.add_argument("--holdout", type=float, default=0.2,
                   help="fraction of each workload's records kept out for the ranking score (default 0.2)")
    m.add_argument("--seed", type=int, default=0, help="seed of the held-out split (default 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .llm_client import PendingResponses

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser().parse_args(argv)
    args.command_line = ["schedsearch", *argv]  # recorded in results: what was run, exactly
    catch_interrupts()
    try:
        try:
            return COMMANDS[args.command](args)
        except Exception:
            if INTERRUPTED.is_set():  # Ctrl-C, come back out of TVM as another error
                raise KeyboardInterrupt from None
            raise
    except PendingResponses as e:
        print(f"schedsearch: {e}", file=sys.stderr)
        return 3
    except UserError as e:
        print(f"schedsearch: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("\n" + INTERRUPTED_MESSAGE, file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions, a file named as a directory: the user's to fix
        message = os_error_message(e)
        if message is None:
            raise
        print(f"schedsearch: error: {message}", file=sys.stderr)
        return 2


def cmd_workloads(args) -> int:
    from .workload import builtin_workloads

    for path in builtin_workloads():
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip().splitlines()
        shown = os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)
        print(f"{shown:42} {doc[0] if doc else ''}")
    return 0


def cmd_tune(args) -> int:
    # Every option checked first (an unknown strategy, a bad runner): nothing imported, loaded or written before.
    tuning, evaluation = tuning_options(args, args.strategy, args.seed), evaluation_options(args)
    options = strategy_options(args, args.strategy, llm_options(args))
    from . import target as targets, workload as workloads
    from .report import summary_table
    from .rundir import RunDir
    from .tune import tune_workload

    wl = workloads.load(args.workload, args.size, dict(args.input_shape))
    target = targets.resolve(args.target, args.arch)
    run = RunDir(Path(args.output or f"runs/{wl.name}-{args.strategy}"))
    print(f"tuning {wl.name} ({wl.size}) with {args.strategy} on {target.kind.name} "
          f"({targets.facts(target)['name']}), {args.trials} trials per task -> {run.root}", file=sys.stderr)
    results = tune_workload(wl, target, run, tuning, evaluation, strategy_options=options, command=args.command_line)
    print(summary_table(results))
    if not results.validation["passed"]:
        what = "VALIDATION FAILED" if results.validation["failed"] else "NOT VALIDATED: no check could be made"
        print(f"schedsearch: error: {what} for {wl.name}: see {run.results}", file=sys.stderr)
        return 1
    return 0


def cmd_train_cost_model(args) -> int:
    from . import cost_models

    m = cost_models.train(args.databases, args.output, args.device, args.holdout, args.seed, args.command_line)
    held, unseen = m["scores"]["held_out"] or {}, m["scores"]["unseen"] or {}
    print(f"{args.output}: {m['records']['train']} records of {len(m['workloads'])} workloads measured on "
          f"{m['device']['name']}, {m['model']['trees']} trees, {m['model']['bytes'] / 1024:.0f} KiB; "
          f"{m['records']['held_out']} held out: Kendall tau {held.get('mean_kendall_tau')}, top-"
          f"{cost_models.TOP_K} recall {held.get('mean_top_k_recall')} (chance {held.get('mean_chance_recall')}); "
          f"unseen workloads: Kendall tau {unseen.get('mean_kendall_tau')}, top-{cost_models.TOP_K} recall "
          f"{unseen.get('mean_top_k_recall')} (chance {unseen.get('mean_chance_recall')}) (means over workloads)")
    return 0


def cmd_library(args) -> int:
    from . import library

    made = library.build(args.sources, args.output, args.per_structure)
    print(f"{args.output}: {made['entries']} programs of {made['structures']} kernel structures "
          f"(of {made['measured']} measured records; {made['skipped']} outside the schedule language or not "
          "re-applicable)",
          file=sys.stderr)
    return 0


COMMANDS = {"workloads": cmd_workloads, "tune": cmd_tune, "library": cmd_library,
            "train-cost-model": cmd_train_cost_model}
