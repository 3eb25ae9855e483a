"""Search strategies: each turns a task into a MetaSchedule SearchStrategy, so every strategy runs
in the same task scheduler with the same builder, runner, database, cost model and trial accounting.

The registry below is the one place that names them: the CLI checks names against it, `compare`
passes each its options, the report takes colours, notes and the reference arm from it. A new
strategy is one module here with a factory `(target, seed, run, **options) -> (task -> SearchStrategy)`
and one line in STRATEGIES. Importing this package is cheap (no TVM): factories load when made."""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError


@dataclass(frozen=True)
class Strategy:
    name: str
    factory: str  # "module:function" in this package
    color: str  # its lines in the report's plots
    llm: str | None = None  # "required": takes the LLM options, default openai; "optional": only with an endpoint
    cli_options: dict[str, str] = field(default_factory=dict)  # factory keyword -> CLI option (argparse dest)
    note: str | None = None  # what the report says about it under the tables
    reference: bool = False  # the arm the report measures sample efficiency and speedups against (one)


STRATEGIES = {s.name: s for s in (
    Strategy("ansor", "ansor:make_ansor", "#1f77b4", reference=True),
    Strategy("rules", "rules:make_rules_strategy", "#2ca02c", cli_options={"library": "library"},
             note="rules is a rule-based proposer with no language model: it redraws decisions of MetaSchedule's "
                  "own design-space sketches and of the best programs so far. It is a control arm, not an LLM."),
    Strategy("llm", "llm:make_llm_strategy", "#d62728", llm="required"),
    Strategy("hybrid", "hybrid:make_hybrid_strategy", "#9467bd", llm="optional",
             cli_options={"stall_trials": "hybrid_stall_trials", "library": "library"},
             note="hybrid measures proposals (the LLM's programs, else the rules proposer's) and continues with "
                  "MetaSchedule's evolutionary search from them, back to proposals when evolution stalls; "
                  "its results.json says per task which trials came from which."),
)}
NAMES = tuple(STRATEGIES)
REFERENCE = next(s.name for s in STRATEGIES.values() if s.reference)


def get(name: str) -> Strategy:
    """The registered strategy; UserError naming the choices for any other name."""
    if name not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}: choose from {', '.join(NAMES)}")
    return STRATEGIES[name]


def make(name: str, **options) -> Callable:
    """-> a factory `task -> SearchStrategy`."""
    module, function = get(name).factory.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)(**options)
