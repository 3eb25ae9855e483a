"""The options several commands share: what they become for the code that runs (frozen objects, each
option's default in one place, checked when built), their argparse groups, and the parsing of their
values. No TVM imported here: the CLI builds its parsers from this."""
from __future__ import annotations

import argparse
import os
import re
from dataclasses import asdict, dataclass, replace

from . import strategies
from .errors import UserError
from .llm_client import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Tuning:
    """One search: tune's, or one arm of compare (which replaces strategy and seed for each arm)."""
    strategy: str = "ansor"
    trials: int = 64  # hardware measurements per task
    seed: int = 0  # the search's seed
    cost_model: str = "none"  # where the XGBoost model starts: none | auto | DIR | FILE (cost_models.start)
    runner: str = "local"  # where candidates are measured: local | rpc://HOST:PORT/KEY
    # The runner's cap (measure.run_evaluator_capped): a candidate this many times slower than the task's best
    # is timed with one call, unless that call takes less than min_cap_s.
    cap_factor: float = 10.0
    min_cap_s: float = 1e-3
    # CUDA: shared memory per block the search allows, for every strategy but ansor: stock | max | KB
    # (shared_memory.search_limit, which checks it against the target)
    shared_memory: str = "stock"

    def __post_init__(self) -> None:
        strategies.get(self.strategy)
        parse_runner_spec(self.runner)
        parse_shared_memory(self.shared_memory)  # what it allows on the target: shared_memory.search_limit
        if self.trials < 1:
            raise UserError(f"--trials must be at least 1, got {self.trials}")
        if not self.cap_factor >= 1:
            raise UserError(f"--cap-factor must be at least 1 (1: cap at the best so far), got {self.cap_factor}")
        if not self.min_cap_s >= 0:
            raise UserError(f"--min-cap-s must be at least 0, got {self.min_cap_s}")


@dataclass(frozen=True)
class Evaluation:
    """How a compiled module is judged: at the end of tune, for compare's PyTorch baselines, and by `run`."""
    validation_seeds: int = 3  # seeds per input distribution
    # Timed calls of the whole module (and of each PyTorch baseline) after warm-up: the end-to-end numbers.
    # Not the search's: a trial times its kernel in 2 repeats of 2 calls, at least 10 ms a repeat on CUDA
    # (measure.evaluator_config).
    repeats: int = 20

    def __post_init__(self) -> None:
        for name in ("validation_seeds", "repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class LLMOptions:
    """The --llm options, under the names the LLM proposer takes (and results.json records)."""
    llm: str | None = None  # the backend: None gives each strategy its default (strategies.Strategy.llm)
    llm_model: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY  # requests in flight at once
    ideas: int = 4  # asked for per round
    programs_per_idea: int = 2
    temperature: float = 0.8
    exchange: str = "ideas"  # ideas: ideas, then programs for each (two exchanges a round) | programs: one
    timeout_s: float = DEFAULT_TIMEOUT_S  # per request to an endpoint (files:DIR waits as long as it takes)
    price_in: float = 0.0  # USD per 1M prompt tokens
    price_out: float = 0.0  # USD per 1M completion tokens
    wait: bool = True  # files backend: wait for the answers (else stop after writing the requests)

    def __post_init__(self) -> None:
        if self.exchange not in EXCHANGES:
            raise UserError(f"--llm-exchange {self.exchange!r}: choose from {', '.join(EXCHANGES)}")


@dataclass(frozen=True)
class CostModelStart:
    """A name `--cost-model` takes; any other value is a path (cost_models.start_from_path). A new way to start
    the search's model is one entry in COST_MODELS and its function in cost_models."""
    name: str
    start: str  # the function of cost_models that starts it: (target) -> cost_models.Start
    help: str  # for --cost-model's help


COST_MODELS = {c.name: c for c in (
    CostModelStart("none", "start_from_nothing", "from nothing"),
    CostModelStart("auto", "start_auto", "cost_models/<this device>/ if there, else none"),
)}
COST_MODEL_PATHS = ("DIR (from train-cost-model) | FILE (a run's cost_model.tar, same device; unpickled, so trusted "
                    "run dirs only)")

EXCHANGES = ("ideas", "programs")
# --library's default (library.load): schedules/library/<target kind>.json where there is one
LIBRARY = "auto"
# --hybrid-stall-trials' default (strategies.hybrid.HybridOptions.stall_trials)
HYBRID_STALL_TRIALS = 64


def parse_runner_spec(spec: str) -> tuple[str, int, str] | None:
    """`local` -> None; `rpc://HOST:PORT/KEY` -> (host, port, key)."""
    if spec == "local":
        return None
    m = re.fullmatch(r"rpc://([\w.-]+):(\d+)/([\w.-]+)", spec)
    if not m or not 0 < int(m[2]) < 65536:
        raise UserError(f"--runner {spec!r}: expected local or rpc://HOST:PORT/KEY, e.g. rpc://10.0.0.5:9190/h100")
    return m[1], int(m[2]), m[3]


SHARED_MEMORY = "stock | max | KB"


def parse_shared_memory(option: str) -> str | int:
    """--shared-memory, as written: "stock", "max", or a positive number of KB."""
    option = option.strip().lower()
    if option in ("stock", "max"):
        return option
    try:
        kb = int(option)
    except ValueError:
        raise UserError(f"bad --shared-memory {option!r}: use {SHARED_MEMORY}") from None
    if kb < 1:
        raise UserError(f"bad --shared-memory {kb}: expected a positive number of KB")
    return kb


def tuning_options(args, strategy: str, seed: int) -> Tuning:
    return Tuning(strategy=strategy, trials=args.trials, seed=seed, cost_model=args.cost_model, runner=args.runner,
                  cap_factor=args.cap_factor, min_cap_s=args.min_cap_s, shared_memory=args.shared_memory)


def evaluation_options(args) -> Evaluation:
    return Evaluation(validation_seeds=args.validation_seeds, repeats=args.repeats)


def add_evaluation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--validation-seeds", type=positive, default=Evaluation.validation_seeds,
                   help=f"seeds per input distribution (default {Evaluation.validation_seeds})")
    p.add_argument("--repeats", type=positive, default=Evaluation.repeats,
                   help="timed calls of the whole compiled module, and of PyTorch, after warm-up: the end-to-end "
                        f"numbers (default {Evaluation.repeats}; a trial times its kernel in 2 repeats of 2 calls)")


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
    p.add_argument("--runner", default=Tuning.runner, metavar="SPEC",
                   help="where candidates are measured: local | rpc://HOST:PORT/KEY (see `schedsearch tracker`)")
    p.add_argument("--cap-factor", type=float, default=Tuning.cap_factor, metavar="X",
                   help="a candidate X times slower than the task's best so far is timed with one call, not in "
                        f"full: it cannot be the best (default {Tuning.cap_factor:g})")
    p.add_argument("--min-cap-s", type=float, default=Tuning.min_cap_s, metavar="S",
                   help=f"... unless that call took less than S seconds (default {Tuning.min_cap_s:g})")


def add_cost_model_option(p: argparse.ArgumentParser) -> None:
    names = [f"{c.name} ({'default: ' if c.name == Tuning.cost_model else ''}{c.help})" for c in COST_MODELS.values()]
    p.add_argument("--cost-model", default=Tuning.cost_model, metavar="SPEC",
                   help="where every strategy's XGBoost cost model starts: " + " | ".join(names + [COST_MODEL_PATHS]))


def add_shared_memory_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shared-memory", default=Tuning.shared_memory, metavar=SHARED_MEMORY.replace(" ", ""),
                   help="CUDA: shared memory per block the search allows, for every strategy but ansor (which keeps "
                        "TVM's): stock (default: what the device reports, 48 KB) | max (the GPU's opt-in limit, 227 KB "
                        "on an H100/H200; kernels over 48 KB use dynamic shared memory) | KB")


def add_library_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--library", default=LIBRARY, metavar="SPEC",
                   help="rules, and hybrid without a model: measured programs of earlier runs for kernels of the same "
                        "structure make each task's first round: auto (default: schedules/library/<target kind>.json "
                        "if there) | none | PATH (from schedsearch library build)")


def add_target_options(p: argparse.ArgumentParser, cross_compile: bool = True) -> None:
    p.add_argument("--target", default="auto",
                   help="auto | llvm | cuda | h100 | h200 | 'llvm -mcpu=CPU [-mattr=+F,-G] [-num-cores=N]' (auto: cuda "
                        "if a GPU is visible, else llvm for this CPU"
                        + ("; a GPU not here is built for with nvcc and measured through --runner rpc://)"
                           if cross_compile else ")"))
    if cross_compile:
        p.add_argument("--arch", help="CUDA arch to build for, e.g. sm_90a (default: the GPU's here; required for "
                                      "cuda without one)")


def add_llm_endpoint_options(g) -> None:
    """What an OpenAI-compatible endpoint is asked with: tune's, compare's and llm-bridge's."""
    g.add_argument("--llm-model", help="model name (default: OPENAI_MODEL, else the endpoint's first model)")
    g.add_argument("--llm-concurrency", type=positive, default=LLMOptions.concurrency,
                   help=f"requests in flight at once (default {LLMOptions.concurrency})")
    g.add_argument("--llm-timeout", type=float, default=LLMOptions.timeout_s,
                   help=f"seconds per request to an endpoint (default {LLMOptions.timeout_s:g}; files:DIR waits as "
                        "long as it takes)")
    g.add_argument("--llm-price-in", type=float, default=LLMOptions.price_in,
                   help="USD per 1M prompt tokens, for the cost column")
    g.add_argument("--llm-price-out", type=float, default=LLMOptions.price_out, help="USD per 1M completion tokens")


def add_llm_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LLM search (--strategy llm, hybrid)")
    g.add_argument("--llm", metavar="SPEC",
                   help="openai (OPENAI_BASE_URL, OPENAI_API_KEY) | replay:TRANSCRIPT.jsonl | files:DIR "
                        "(default openai; for hybrid, openai when OPENAI_BASE_URL is set, else no model: rules)")
    add_llm_endpoint_options(g)
    g.add_argument("--llm-ideas", type=positive, default=LLMOptions.ideas,
                   help=f"ideas asked for per round (default {LLMOptions.ideas})")
    g.add_argument("--llm-programs-per-idea", type=positive, default=LLMOptions.programs_per_idea,
                   help=f"programs per idea (default {LLMOptions.programs_per_idea})")
    g.add_argument("--llm-temperature", type=float, default=LLMOptions.temperature)
    g.add_argument("--llm-exchange", choices=EXCHANGES, default=LLMOptions.exchange,
                   help="ideas: a round asks for ideas, then programs for each (two exchanges); programs: for "
                        f"programs directly, each with its idea in a comment (one exchange a round; default "
                        f"{LLMOptions.exchange})")
    g.add_argument("--no-wait", action="store_true",
                   help="with --llm files:DIR, stop after writing requests instead of waiting for answers")
    g.add_argument("--hybrid-stall-trials", type=positive, default=HYBRID_STALL_TRIALS,
                   help="hybrid: evolution trials without a 1%% faster kernel before the next proposal round "
                        f"(default {HYBRID_STALL_TRIALS})")


def llm_options(args) -> LLMOptions:
    return LLMOptions(llm=args.llm, llm_model=args.llm_model, concurrency=args.llm_concurrency, ideas=args.llm_ideas,
                      programs_per_idea=args.llm_programs_per_idea, temperature=args.llm_temperature,
                      exchange=args.llm_exchange, timeout_s=args.llm_timeout, price_in=args.llm_price_in,
                      price_out=args.llm_price_out, wait=not args.no_wait)


def strategy_options(args, strategy: str, llm: LLMOptions) -> dict:
    """What `strategy`'s factory takes: its own options (strategies.Strategy.cli_options, e.g. --library for
    rules and hybrid) and the LLM's; one whose LLM is optional gets {"llm": None} without an endpoint."""
    entry = strategies.get(strategy)
    own = {option: getattr(args, dest) for option, dest in entry.cli_options.items()}
    if entry.llm is None:
        return own
    backend = llm.llm or ("openai" if entry.llm == "required" or os.environ.get("OPENAI_BASE_URL") else None)
    if backend is None:
        return {"llm": None, **own}
    return {**own, **asdict(replace(llm, llm=backend))}
