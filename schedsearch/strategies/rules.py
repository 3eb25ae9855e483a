"""The rule-based proposer: no LLM. Two rules, written as programs in the same schedule language:

1. take one of MetaSchedule's design-space sketches (its rules for this target: multi-level
   tiling, cross-thread reduction, auto-inline, thread binding / parallel-vectorize-unroll) and
   draw new tile sizes and unroll factors for it;
2. take one of the fastest measured programs and redraw one of its decisions (local search).

The cost model then ranks them with everything else. It is the offline stand-in for the LLM and a
control arm in comparisons; it is always labelled "rules", never as an LLM.
"""
from __future__ import annotations

import dataclasses


from .. import schedule_lang
from .proposals import Proposal, TaskView, search_factory

SAMPLERS = ("sample_perfect_tile", "sample_categorical", "sample_compute_location")


def redraw(program: schedule_lang.Program, which: set[int] | None) -> schedule_lang.Program:
    """Drop the decisions of the sampling statements numbered in `which` (all if None)."""
    out, k = [], 0
    for st in program.statements:
        if st.primitive in SAMPLERS:
            if which is None or k in which:
                st = dataclasses.replace(st, kwargs=tuple((n, v) for n, v in st.kwargs if n != "decision"))
            k += 1
        out.append(st)
    return schedule_lang.Program(tuple(out))


def n_samplers(program: schedule_lang.Program) -> int:
    return sum(st.primitive in SAMPLERS for st in program.statements)


class RuleProposer:
    label = "rules"

    def propose(self, view: TaskView) -> list[Proposal]:
        sketches = [schedule_lang.parse(s) for s in view.sketches]
        best = [schedule_lang.parse(o.program) for o in view.measured[:3]]
        out: list[Proposal] = []
        if not sketches and not best:
            return out
        for attempt in range(view.want * 4):
            if len(out) >= view.want:
                break
            if best and (attempt % 2 or not sketches):
                j = min(int(view.rng.expovariate(1.0)), len(best) - 1)  # mostly the fastest
                n = n_samplers(best[j])
                if not n:
                    continue
                program, source = redraw(best[j], {view.rng.randrange(n)}), f"measured #{j + 1}, one decision redrawn"
            else:
                j = view.rng.randrange(len(sketches))
                program, source = redraw(sketches[j], None), f"sketch {j}, decisions drawn"
            sch = schedule_lang.fresh_schedule(view.mod, seed=view.rng.randrange(1, 1 << 30))
            try:
                schedule_lang.apply(program, sch)
            except schedule_lang.ScheduleLangError:
                continue
            out.append(Proposal(schedule_lang.from_trace(sch.trace), source))
        return out

    def record(self, outcomes, proposals) -> None:
        pass


def make_rules_strategy(target, seed: int = 0, run=None, library: str | None = None):
    """-> factory `task -> ProposalSearch`, with `.stats()`: round timings for results.json. `library`:
    --library's none | auto | PATH, whose programs make a task's first round."""
    from .. import library as libraries
    from ..target import facts
    from .from_library import library_first

    lib = libraries.load(library, target.kind.name)
    proposer_for = library_first(lib, target.kind.name, lambda task: RuleProposer())
    return search_factory("rules", proposer_for, facts(target), seed, run=run, library=lib)
