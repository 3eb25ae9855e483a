"""Search strategies: each turns a task into a MetaSchedule SearchStrategy, so every strategy runs
in the same task scheduler with the same builder, runner, database, cost model and trial accounting."""
from __future__ import annotations

from typing import Callable

from ..errors import UserError

NAMES = ("ansor", "rules", "llm", "hybrid")


def make(name: str, **options) -> Callable:
    """-> a factory `task -> SearchStrategy`."""
    if name == "ansor":
        from .ansor import make_ansor
        return make_ansor(**options)
    if name in ("rules", "llm"):
        from .proposals import make_proposal_strategy
        return make_proposal_strategy(name, **options)
    if name == "hybrid":
        from .hybrid import make_hybrid_strategy
        return make_hybrid_strategy(**options)
    raise UserError(f"unknown strategy {name!r}: choose from {', '.join(NAMES)}")
