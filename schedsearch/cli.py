"""Command line: argument parsing and error reporting only."""
from __future__ import annotations

import argparse
import ast
import os
import sys
from pathlib import Path

from . import compare, export, rpc
from .errors import INTERRUPTED, UserError, catch_interrupts


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
    t.add_argument("--strategy", default="ansor", help="ansor | rules | llm (default ansor)")
    t.add_argument("--trials", type=_positive, default=64, help="hardware measurements per task (default 64)")
    t.add_argument("--target", default="auto", help="auto | llvm | cuda (auto: cuda if a GPU is visible)")
    t.add_argument("--size", default="default", help="workload size from its SIZES dict, e.g. small")
    t.add_argument("--input-shape", type=_shape_arg, action="append", default=[],
                   help="NAME=D0,D1,... for an ONNX input with dynamic dimensions (repeatable)")
    t.add_argument("--seed", type=int, default=0, help="search seed")
    t.add_argument("--validation-seeds", type=_positive, default=3, help="seeds per input distribution (default 3)")
    t.add_argument("--repeats", type=_positive, default=20, help="timed calls per measurement (default 20)")
    add_runner_option(t)
    t.add_argument("--cost-model", type=Path, help="start from this XGBoost cost model (a run's cost_model.tar, "
                                                   "trained on the same device); trusted files only (pickle)")
    add_llm_options(t)
    COMMANDS.update(export.add_commands(sub))
    COMMANDS.update(compare.add_commands(sub))
    COMMANDS.update(rpc.add_commands(sub))
    return p


def add_runner_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", default="local", metavar="SPEC",
                   help="where candidates are measured: local | rpc://HOST:PORT/KEY (see `schedsearch tracker`)")


def add_llm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LLM search (--strategy llm)")
    g.add_argument("--llm", default="openai", metavar="SPEC",
                   help="openai (OPENAI_BASE_URL, OPENAI_API_KEY) | replay:TRANSCRIPT.jsonl | files:DIR")
    g.add_argument("--llm-model", help="model name (default: OPENAI_MODEL, else the endpoint's first model)")
    g.add_argument("--llm-concurrency", type=_positive, default=8, help="requests in flight at once (default 8)")
    g.add_argument("--llm-ideas", type=_positive, default=4, help="ideas asked for per round (default 4)")
    g.add_argument("--llm-programs-per-idea", type=_positive, default=2, help="programs per idea (default 2)")
    g.add_argument("--llm-temperature", type=float, default=0.8)
    g.add_argument("--llm-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    g.add_argument("--llm-price-in", type=float, default=0.0, help="USD per 1M prompt tokens, for the cost column")
    g.add_argument("--llm-price-out", type=float, default=0.0, help="USD per 1M completion tokens")
    g.add_argument("--no-wait", action="store_true",
                   help="with --llm files:DIR, stop after writing requests instead of waiting for answers")


def llm_options(args) -> dict:
    if args.strategy != "llm":
        return {}
    return {"llm": args.llm, "llm_model": args.llm_model, "concurrency": args.llm_concurrency,
            "ideas": args.llm_ideas, "programs_per_idea": args.llm_programs_per_idea,
            "temperature": args.llm_temperature, "timeout_s": args.llm_timeout,
            "price_in": args.llm_price_in, "price_out": args.llm_price_out, "wait": not args.no_wait}


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
        print("\nschedsearch: interrupted; everything measured so far is in the run directory's "
              "database: run the same command again to resume", file=sys.stderr)
        return 130


def cmd_workloads(args) -> int:
    from .workload import builtin_workloads

    for path in builtin_workloads():
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip().splitlines()
        print(f"{os.path.relpath(path):42} {doc[0] if doc else ''}")
    return 0


def cmd_tune(args) -> int:
    from . import target as targets, workload as workloads
    from .report import summary_table
    from .rundir import RunDir
    from .tune import tune_workload

    wl = workloads.load(args.workload, args.size, dict(args.input_shape))
    target = targets.resolve(args.target)
    run = RunDir(Path(args.output or f"runs/{wl.name}-{args.strategy}"))
    print(f"tuning {wl.name} ({wl.size}) with {args.strategy} on {target.kind.name} "
          f"({targets.facts(target)['name']}), {args.trials} trials per task -> {run.root}", file=sys.stderr)
    results = tune_workload(wl, target, run, strategy=args.strategy, trials=args.trials, seed=args.seed,
                            validation_seeds=args.validation_seeds, repeats=args.repeats,
                            command=args.command_line, strategy_options=llm_options(args),
                            cost_model_file=args.cost_model, runner_spec=args.runner)
    print(summary_table(results))
    if not results["validation"]["passed"]:
        what = "VALIDATION FAILED" if results["validation"]["failed"] else "NOT VALIDATED: no check could be made"
        print(f"schedsearch: error: {what} for {wl.name}: see {run.results}", file=sys.stderr)
        return 1
    return 0


COMMANDS = {"workloads": cmd_workloads, "tune": cmd_tune}
