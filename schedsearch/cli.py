"""Command line: argument parsing and error reporting only."""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

from . import compare, export, library, llm_bridge, rpc
from .errors import INTERRUPTED, INTERRUPTED_MESSAGE, UserError, catch_interrupts, os_error_message


def _shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        name, dims = text.split("=", 1)
        return name, tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,..., got {text!r}") from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="schedsearch", description="ML-guided schedule search for TVM kernels")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("workloads", help="list the built-in workloads")

    t = sub.add_parser("tune", help="tune a workload and write a run directory")
    t.add_argument("workload", help="KernelBench-format .py problem file or .onnx file")
    t.add_argument("-o", "--output", help="run directory (default runs/<workload>-<strategy>)")
    t.add_argument("--strategy", default="ansor", help="ansor | rules | llm | hybrid (default ansor)")
    t.add_argument("--trials", type=_positive, default=64, help="hardware measurements per task (default 64)")
    t.add_argument("--target", default="auto", help="auto | llvm | cuda | h100 | h200 | 'llvm -mcpu=CPU [-mattr=+F,-G] [-num-cores=N]' (auto: cuda if a GPU is visible, else llvm for this CPU; a GPU not here is built for with nvcc and measured through --runner rpc://)")
    t.add_argument("--arch", help="CUDA arch to build for, e.g. sm_90a (default: the GPU's here; required for cuda without one)")
    t.add_argument("--size", default="default", help="workload size from its SIZES dict, e.g. small")
    t.add_argument("--input-shape", type=_shape_arg, action="append", default=[],
                   help="NAME=D0,D1,... for an ONNX input with dynamic dimensions (repeatable)")
    t.add_argument("--seed", type=int, default=0, help="search seed")
    t.add_argument("--validation-seeds", type=_positive, default=3, help="seeds per input distribution (default 3)")
    t.add_argument("--repeats", type=_positive, default=20, help="timed calls per measurement (default 20)")
    add_runner_option(t)
    add_cost_model_option(t)
    add_shared_memory_option(t)
    add_library_option(t)
    add_llm_options(t)
    COMMANDS.update(export.add_commands(sub))
    COMMANDS.update(compare.add_commands(sub))
    COMMANDS.update(rpc.add_commands(sub))
    COMMANDS.update(llm_bridge.add_commands(sub))
    COMMANDS.update(library.add_commands(sub))

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


def add_runner_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", default="local", metavar="SPEC",
                   help="where candidates are measured: local | rpc://HOST:PORT/KEY (see `schedsearch tracker`)")


def add_shared_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-memory", default="stock", metavar="stock|max|KB",
                   help="CUDA: shared memory per block the search allows, for every strategy but ansor (which keeps "
                        "TVM's): stock (default: what the device reports, 48 KB) | max (the GPU's opt-in limit, 227 KB "
                        "on an H100/H200; kernels over 48 KB use dynamic shared memory) | KB")


def add_cost_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cost-model", default="none", metavar="SPEC",
                   help="where every strategy's XGBoost cost model starts: none (default: from nothing) | auto "
                        "(cost_models/<this device>/ if there, else none) | DIR (from train-cost-model) | FILE "
                        "(a run's cost_model.tar, same device; unpickled, so trusted run dirs only)")


def add_library_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", default="auto", metavar="SPEC",
                   help="rules, and hybrid without a model: measured programs of earlier runs for kernels of the same "
                        "structure make each task's first round: auto (default: schedules/library/<target kind>.json "
                        "if there) | none | PATH (from schedsearch library build)")


def add_llm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LLM search (--strategy llm, hybrid)")
    g.add_argument("--llm", metavar="SPEC",
                   help="openai (OPENAI_BASE_URL, OPENAI_API_KEY) | replay:TRANSCRIPT.jsonl | files:DIR "
                        "(default openai; for hybrid, openai when OPENAI_BASE_URL is set, else no model: rules)")
    g.add_argument("--llm-model", help="model name (default: OPENAI_MODEL, else the endpoint's first model)")
    g.add_argument("--llm-concurrency", type=_positive, default=8, help="requests in flight at once (default 8)")
    g.add_argument("--llm-ideas", type=_positive, default=4, help="ideas asked for per round (default 4)")
    g.add_argument("--llm-programs-per-idea", type=_positive, default=2, help="programs per idea (default 2)")
    g.add_argument("--llm-temperature", type=float, default=0.8)
    g.add_argument("--llm-exchange", choices=("ideas", "programs"), default="ideas",
                   help="ideas: a round asks for ideas, then programs for each (two exchanges); programs: for "
                        "programs directly, each with its idea in a comment (one exchange a round; default ideas)")
    g.add_argument("--llm-timeout", type=float, default=300.0,
                   help="seconds per request to an endpoint (default 300; files:DIR waits as long as it takes)")
    g.add_argument("--llm-price-in", type=float, default=0.0, help="USD per 1M prompt tokens, for the cost column")
    g.add_argument("--llm-price-out", type=float, default=0.0, help="USD per 1M completion tokens")
    g.add_argument("--no-wait", action="store_true",
                   help="with --llm files:DIR, stop after writing requests instead of waiting for answers")
    g.add_argument("--hybrid-stall-trials", type=_positive, default=64,
                   help="hybrid: evolution trials without a 1%% faster kernel before the next proposal round (default 64)")


def llm_options(args, strategy: str | None = None) -> dict:
    """The LLM's options for `strategy` (default: args.strategy); hybrid without a model gets {"llm": None}."""
    strategy = strategy or args.strategy
    if strategy not in ("llm", "hybrid"):
        return {}
    llm = args.llm or ("openai" if strategy == "llm" or os.environ.get("OPENAI_BASE_URL") else None)
    hybrid = {"stall_trials": args.hybrid_stall_trials} if strategy == "hybrid" else {}
    if llm is None:
        return {"llm": None, **hybrid}
    return {**hybrid, "llm": llm, "llm_model": args.llm_model, "concurrency": args.llm_concurrency,
            "ideas": args.llm_ideas, "programs_per_idea": args.llm_programs_per_idea, "exchange": args.llm_exchange,
            "temperature": args.llm_temperature, "timeout_s": args.llm_timeout,
            "price_in": args.llm_price_in, "price_out": args.llm_price_out, "wait": not args.no_wait}


def strategy_options(args, strategy: str | None = None) -> dict:
    """llm_options, and for rules and hybrid the program library (`--library`)."""
    strategy = strategy or args.strategy
    library = {"library": args.library} if strategy in ("rules", "hybrid") else {}
    return {**llm_options(args, strategy), **library}


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
    from . import target as targets, workload as workloads
    from .report import summary_table
    from .rundir import RunDir
    from .tune import tune_workload

    wl = workloads.load(args.workload, args.size, dict(args.input_shape))
    target = targets.resolve(args.target, args.arch)
    run = RunDir(Path(args.output or f"runs/{wl.name}-{args.strategy}"))
    print(f"tuning {wl.name} ({wl.size}) with {args.strategy} on {target.kind.name} "
          f"({targets.facts(target)['name']}), {args.trials} trials per task -> {run.root}", file=sys.stderr)
    results = tune_workload(wl, target, run, strategy=args.strategy, trials=args.trials, seed=args.seed,
                            validation_seeds=args.validation_seeds, repeats=args.repeats,
                            command=args.command_line, strategy_options=strategy_options(args),
                            cost_model=args.cost_model, runner_spec=args.runner,
                            shared_memory=args.shared_memory)
    print(summary_table(results))
    if not results["validation"]["passed"]:
        what = "VALIDATION FAILED" if results["validation"]["failed"] else "NOT VALIDATED: no check could be made"
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


COMMANDS = {"workloads": cmd_workloads, "tune": cmd_tune, "train-cost-model": cmd_train_cost_model}
