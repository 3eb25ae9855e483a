"""Proposals from the program library (schedsearch/library.py): a task's first round is the library's
programs for its kernel structure, fitted to its extents; the proposer after it (rules) makes the rest."""
from __future__ import annotations

import logging
from typing import Callable

from .. import library
from ..schedule_lang import ScheduleLangError
from .proposals import FirstAnswer, Proposal, Proposer, TaskView

log = logging.getLogger("schedsearch.ms")


class LibraryProposer:
    label = "library"

    def __init__(self, entries: list[tuple[library.Entry, int]]):
        self.entries, self.asked = entries, False

    def propose(self, view: TaskView) -> list[Proposal]:
        """Once: each program with its tiles as recorded where they fit the task's extents (TVM's replay of
        the others), then with those others, thread tiles aside, drawn again."""
        if self.asked:
            return []
        self.asked = True
        out = []
        for i, (entry, extra) in enumerate(self.entries):
            where = (f"library #{i + 1} ({entry.workload} {entry.shape}, {entry.latency_us:,.1f} us on {entry.device}"
                     + (f"; this kernel has {extra} more elementwise blocks)" if extra else ")"))
            for k in range(library.PER_ENTRY):
                try:
                    text = library.retarget(entry.program, view.mod, seed=view.rng.randrange(1, 1 << 30),
                                            redraw_tiles=k > 0)
                except ScheduleLangError as e:
                    log.info("%s does not apply to %s: %s", where, view.name, e)
                    break
                if text is None:  # no tile to draw
                    break
                out.append(Proposal(text, where + (", tiles that did not fit drawn again" if k else "")))
        return out

    def record(self, outcomes, proposals) -> None:
        pass


def library_first(lib: library.Library, target_kind: str, then: Callable[[object], Proposer]) -> Callable:
    """-> `proposer_for(task)`: the library's programs for the task first, then `then(task)`'s proposals;
    `.matched` counts the library's programs per task, for results.json."""
    matched: dict[str, int] = {}

    def proposer_for(task):
        entries = lib.for_task(task.mod, target_kind)
        matched[task.name] = len(entries)
        log.info("library %s: %d programs for %s's kernel structure", lib.path, len(entries), task.name)
        rest = then(task)
        return FirstAnswer([LibraryProposer(entries), rest]) if entries else rest

    proposer_for.matched = matched
    return proposer_for
