"""The options several commands share: their argparse groups, the parsing of their values, and what
they become for the code that runs (no TVM imported here: the CLI builds its parsers from this)."""
from __future__ import annotations

import argparse
import os

from . import strategies


def shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        name, dims = text.split("=", 1)
        return name, tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,..., got {text!r}") from None


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def add_runner_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runner", default="local", metavar="SPEC",
                   help="where candidates are measured: local | rpc://HOST:PORT/KEY (see `schedsearch tracker`)")


def add_cost_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cost-model", default="none", metavar="SPEC",
                   help="where every strategy's XGBoost cost model starts: none (default: from nothing) | auto "
                        "(cost_models/<this device>/ if there, else none) | DIR (from train-cost-model) | FILE "
                        "(a run's cost_model.tar, same device; unpickled, so trusted run dirs only)")


def add_llm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LLM search (--strategy llm, hybrid)")
    g.add_argument("--llm", metavar="SPEC",
                   help="openai (OPENAI_BASE_URL, OPENAI_API_KEY) | replay:TRANSCRIPT.jsonl | files:DIR "
                        "(default openai; for hybrid, openai when OPENAI_BASE_URL is set, else no model: rules)")
    g.add_argument("--llm-model", help="model name (default: OPENAI_MODEL, else the endpoint's first model)")
    g.add_argument("--llm-concurrency", type=positive, default=8, help="requests in flight at once (default 8)")
    g.add_argument("--llm-ideas", type=positive, default=4, help="ideas asked for per round (default 4)")
    g.add_argument("--llm-programs-per-idea", type=positive, default=2, help="programs per idea (default 2)")
    g.add_argument("--llm-temperature", type=float, default=0.8)
    g.add_argument("--llm-timeout", type=float, default=120.0, help="seconds per request (default 120)")
    g.add_argument("--llm-price-in", type=float, default=0.0, help="USD per 1M prompt tokens, for the cost column")
    g.add_argument("--llm-price-out", type=float, default=0.0, help="USD per 1M completion tokens")
    g.add_argument("--no-wait", action="store_true",
                   help="with --llm files:DIR, stop after writing requests instead of waiting for answers")
    g.add_argument("--hybrid-stall-trials", type=positive, default=64,
                   help="hybrid: evolution trials without a 1%% faster kernel before the next proposal round (default 64)")


def llm_options(args, strategy: str | None = None) -> dict:
    """The options for `strategy` (default: args.strategy): the LLM's and its own (strategies.Strategy); one
    whose LLM is optional gets {"llm": None} without an endpoint."""
    entry = strategies.get(strategy or args.strategy)
    if entry.llm is None:
        return {}
    llm = args.llm or ("openai" if entry.llm == "required" or os.environ.get("OPENAI_BASE_URL") else None)
    own = {option: getattr(args, dest) for option, dest in entry.cli_options.items()}
    if llm is None:
        return {"llm": None, **own}
    return {**own, "llm": llm, "llm_model": args.llm_model, "concurrency": args.llm_concurrency,
            "ideas": args.llm_ideas, "programs_per_idea": args.llm_programs_per_idea,
            "temperature": args.llm_temperature, "timeout_s": args.llm_timeout,
            "price_in": args.llm_price_in, "price_out": args.llm_price_out, "wait": not args.no_wait}
