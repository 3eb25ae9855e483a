"""The round loop shared by proposal-based strategies (rules, llm):

    propose programs -> check (parse, apply, postprocess, dedupe) -> rank (XGBoost) -> measure -> history

The history (every program's round, origin, status, reason and latency, and the view each round was
asked with) is kept in the run directory (proposals.jsonl, `History`), so that a resumed run shows the
proposer exactly what the interrupted one did: an LLM's prompt is the same to the byte, and an answer
written for it (--llm files:DIR) is used, not asked for again.

It is a MetaSchedule `PySearchStrategy`, so it runs in the same task scheduler as the Ansor
baseline with the same builder, runner, database, cost model and trial accounting: a trial is one
hardware measurement for every strategy.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .. import measure, result_codes, schedule_lang
from ..llm_client import TranscriptExhausted
from ..rundir import append_line, drop_cut_tail
from ..schedule_lang import ScheduleLangError

HISTORY_FOR_PROMPT = 12  # fastest measured programs a proposer is shown
ROUNDS_FOR_PROMPT = 3  # rounds whose every program (and what became of it) a proposer is shown

log = logging.getLogger("schedsearch.ms")


@dataclass
class Outcome:
    """What became of one proposed program."""
    program: str
    source: str  # which proposal (e.g. "idea 2, variation 1" or "sketch 0, decisions drawn")
    status: str  # rejected | duplicate | ranked out | queued -> (measuring: build or run deferred ->) measured | failed
    reason: str | None = None
    predicted: float | None = None
    latency_us: float | None = None
    round: int = 0
    idea: str | None = None  # the idea the program implements, in the proposer's words
    remeasured_us: float | None = None  # the same kernel measured once more (ProposalSearch.remeasure_best)
    kernel: str | None = None  # structural hash of the scheduled kernel
    n: int | None = field(default=None, compare=False)  # its number in the task's history file
    repeats: "Outcome | None" = field(default=None, compare=False, repr=False)  # a re-measure: of which


SAVED = ("source", "status", "reason", "predicted", "latency_us", "round", "idea", "remeasured_us", "kernel")


class History:
    """One task's proposal history in the run directory's proposals.jsonl, one JSON object a line:
    {"task", "n", ...Outcome fields} whenever an outcome changes (its program the first time only);
    {"task", "round", "view": {...}} when a round is asked; {"task", "round", "ended": proposals} once its
    proposals are checked. A round asked but not ended (the model's answers were not there yet, or the run
    was stopped) is asked again with its saved view: the same prompt, whatever was measured since."""

    def __init__(self, path: Path | None):
        self.path, self.task, self.count = path, None, 0

    def load(self, task: str) -> tuple[list[Outcome], int, dict | None]:
        """-> (outcomes in the order they were recorded, the last round ended, the view of a round asked
        since, or None)."""
        self.task, outcomes, ended, view = task, {}, 0, None
        if self.path is None or not self.path.exists():
            return [], 0, None
        drop_cut_tail(self.path)
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or rec.get("task") != task:
                continue
            if "n" in rec:
                old = outcomes.get(rec["n"])
                program = rec.get("program", old.program if old else "")
                outcomes[rec["n"]] = Outcome(program, **{k: rec.get(k) for k in SAVED}, n=rec["n"])
            elif "ended" in rec:
                ended, view = max(ended, rec["round"]), None
            elif "view" in rec:
                view = rec
        self.count = max(outcomes, default=-1) + 1
        return list(outcomes.values()), ended, view if view and view["round"] > ended else None

    def record(self, outcomes: list[Outcome]) -> None:
        for o in outcomes:
            first = o.n is None
            if first:
                o.n, self.count = self.count, self.count + 1
            self._write({"task": self.task, "n": o.n, **{k: getattr(o, k) for k in SAVED},
                         **({"program": o.program} if first else {})})

    def asked(self, view: "TaskView") -> None:
        """The view a round is asked with; the programs of the measured ones only (the rest is told in words:
        hybrid's evolution puts a round's worth of programs into `recent`)."""
        self._write({"task": self.task, "round": view.round, "view": {
            "measured": [saved_outcome(o) for o in view.measured],
            "recent": [saved_outcome(o, program=False) for o in view.recent], "can_measure": view.can_measure}})

    def ended(self, round_: int, proposals: int) -> None:
        self._write({"task": self.task, "round": round_, "ended": proposals})

    def _write(self, record: dict) -> None:
        if self.path is not None:
            append_line(self.path, json.dumps(record, ensure_ascii=False))


def saved_outcome(o: Outcome, program: bool = True) -> dict:
    return {"program": o.program if program else "", **{k: getattr(o, k) for k in SAVED}, "n": o.n}


def restored_outcome(d: dict) -> Outcome:
    return Outcome(d["program"], **{k: d.get(k) for k in SAVED}, n=d.get("n"))


# Proposals asked for per round at least: with a few trials left (a resumed run) and the best
# programs' neighbours already measured, a handful of proposals can all be duplicates (seen on
# the H100: 4 trials left of 128, three empty rounds, the search stopped at 124).
MIN_PROPOSALS = 32


@dataclass
class TaskView:
    """Everything a proposer may look at for one round of one task."""
    name: str
    script: str  # the task's TIR as TVMScript
    target: dict  # target facts
    sketches: list[str]  # MetaSchedule's design-space sketches as programs
    measured: list[Outcome]  # measured programs, fastest first
    recent: list[Outcome]  # every program of the last rounds, in the order proposed, with what became of it
    round: int
    want: int  # how many programs the round should produce (before checking)
    rng: random.Random
    mod: tvm.IRModule = field(repr=False, default=None)
    can_measure: int = 1 << 30  # how many of them the round can measure (trials left): no use asking for more


@dataclass
class Proposal:
    program: str
    source: str
    request: str | None = None  # id of the LLM request that produced it (for the transcript)
    idea: str | None = None  # the idea it implements, in the proposer's words


class Proposer(Protocol):
    label: str

    def propose(self, view: TaskView) -> list[Proposal]: ...

    def record(self, outcomes: list[Outcome], proposals: list[Proposal]) -> None: ...


class FirstAnswer:
    """Proposers in order of preference: a round's programs come from the first that gives any. One whose
    replayed transcript has run out is not asked again."""

    def __init__(self, proposers: list[Proposer]):
        self.proposers = proposers
        self.label = proposers[0].label

    def propose(self, view: TaskView):
        for proposer in list(self.proposers):
            try:
                proposals = proposer.propose(view)
            except TranscriptExhausted as e:
                log.info("%s has no more answers (%s); proposals from %s from now on", proposer.label, e,
                         ", ".join(p.label for p in self.proposers if p is not proposer))
                self.proposers.remove(proposer)
                continue
            if proposals:
                self.label = proposer.label
                return proposals
        return []

    def record(self, outcomes, proposals) -> None:
        for proposer in self.proposers:
            proposer.record(outcomes, proposals)

    @property
    def failed_rounds(self) -> list[dict]:  # the LLM's rounds whose requests all failed, for results.json
        return [r for proposer in self.proposers for r in getattr(proposer, "failed_rounds", [])]


def measure_candidate(sch) -> ms.MeasureCandidate:
    return ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, True))


@derived_object
class ProposalSearch(ms.search_strategy.PySearchStrategy):
    """`history`: the run's proposals.jsonl (None: kept in memory only). `remeasure_best`: a round measures
    the fastest kernel once more when it is new, as one of the round's trials, so that a proposer that reads
    the history can tell noise from gains (an LLM on the CPU box saw one program at 1,334 us, then 5,438 us)."""

    def __init__(self, proposer: Proposer, target_facts: dict, explore: float = 0.2, oversample: int = 2,
                 max_empty_rounds: int = 3, seed: int = 0, history: Path | None = None,
                 remeasure_best: bool = False):
        super().__init__()
        self.proposer, self.target_facts = proposer, target_facts
        self.explore, self.oversample, self.max_empty_rounds = explore, oversample, max_empty_rounds
        self.seed, self.history_path, self.remeasure_best = seed, history, remeasure_best
        self.history = History(history)
        self.round_times: list[dict] = []
        # An exception raised in here reaches Python again as a bare RuntimeError through TVM's FFI:
        # keep the original for the caller (tune.search) and end the task instead.
        self.error: BaseException | None = None
        self.ended: str | None = None  # why the search ended before its budget, where not the space

    def _initialize_with_tune_context(self, context) -> None:
        self.context = context
        self.postprocs = list(context.space_generator.postprocs)
        self.features = ms.feature_extractor.PerStoreFeature()
        self.rng = random.Random(self.seed)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database, cost_model):
        self.max_trials, self.per_iter = max_trials, num_trials_per_iter
        self.database, self.cost_model = database, cost_model
        self.trials, self.round = 0, 0
        self.sketches = []
        for space in design_spaces:
            try:
                self.sketches.append(schedule_lang.from_trace(space.trace))
            except ScheduleLangError:  # e.g. tensor-core sketches use index maps, outside the language
                continue
        self.seen: set[int] = set()
        self.origins: dict[int, str] = {}  # kernel hash -> who proposed it, for trials.jsonl
        self.outcomes: list[Outcome] = []  # every program proposed, in order
        self.measured: list[Outcome] = []
        self.rejected: list[Outcome] = []
        self.pending: list[tuple[Outcome, Proposal]] = []
        self.measuring: dict[int, tuple[Outcome, Proposal]] = {}  # deferred builds and runs, by token
        self.remeasured: set[int] = set()  # history numbers of the kernels measured again
        self.asked_view: dict | None = None  # a round asked but not ended in an earlier run
        self._resume()
        self._warm_start()

    def _resume(self) -> None:
        """The history an earlier run of this task left in proposals.jsonl, as that run had it."""
        outcomes, self.round, self.asked_view = self.history.load(self.context.task_name)
        for o in outcomes:
            self._add(o)
        self.measured.sort(key=lambda o: o.latency_us)

    def _add(self, o: Outcome) -> None:
        self.outcomes.append(o)
        if o.status == "measured":
            self.measured.append(o)
        elif o.status in ("rejected", "failed"):
            self.rejected.append(o)
        if o.remeasured_us is not None:
            self.remeasured.add(o.n)

    def _warm_start(self) -> None:
        """Earlier measurements of this task (a resumed run) seed the dedupe set and the model, and the history
        where it does not have them (a run dir of an older schedsearch)."""
        if not self.database.has_workload(self.context.mod):
            return
        workload = self.database.commit_workload(self.context.mod)
        records = self.database.get_top_k(workload, 1 << 20)
        known = {o.kernel for o in self.outcomes if o.kernel is not None}
        cands, results = [], []
        for rec in records:
            try:
                cand = rec.as_measure_candidate()
            except Exception:  # a record of an older TVM that no longer applies
                continue
            h = tvm_ffi.structural_hash(cand.sch.mod)
            self.seen.add(h)
            secs = [float(s) for s in rec.run_secs] if rec.run_secs else None
            if secs and min(secs) < 1e9:
                if str(h) not in known:
                    known.add(str(h))
                    try:
                        text = schedule_lang.from_trace(rec.trace, postproc=False)
                        self.measured.append(Outcome(text, "database", "measured",
                                                     latency_us=1e6 * sum(secs) / len(secs), kernel=str(h)))
                    except ScheduleLangError:  # measured, but not expressible as a program: model data only
                        pass
                cands.append(cand)
                results.append(ms.runner.RunnerResult(run_secs=secs, error_msg=None))
        if cands:
            measure.update_cost_model(self.cost_model, self.context, cands, results)
        self.measured.sort(key=lambda o: o.latency_us)

    def _record(self, outcomes: list[Outcome], proposals: list[Proposal]) -> None:
        """Outcomes that changed: to the history file and to the proposer. A re-measure changes its original."""
        self.history.record([o.repeats or o for o in outcomes])
        self.proposer.record(outcomes, proposals)

    def _view(self, want: int, can_measure: int) -> TaskView:
        if self.asked_view is not None and self.asked_view["round"] == self.round:
            saved = self.asked_view["view"]  # asked in an earlier run: ask it the same way
            measured, recent = map(lambda k: [restored_outcome(d) for d in saved[k]], ("measured", "recent"))
            can_measure = saved["can_measure"]
        else:
            measured = self.measured[:HISTORY_FOR_PROMPT]
            recent = [o for o in self.outcomes if o.round >= self.round - ROUNDS_FOR_PROMPT]
        view = TaskView(self.context.task_name, self.context.mod.script(), self.target_facts, self.sketches,
                        measured, recent, self.round, max(want * self.oversample, MIN_PROPOSALS), self.rng,
                        self.context.mod, can_measure)
        if self.asked_view is None or self.asked_view["round"] != self.round:
            self.history.asked(view)
        return view

    def generate_measure_candidates(self):
        if self.trials >= self.max_trials:
            return None
        want = min(self.per_iter, self.max_trials - self.trials)
        again = self._remeasure() if want > 1 else None
        want -= again is not None
        t0 = time.time()
        for _ in range(self.max_empty_rounds):
            self.round += 1
            view = self._view(want, want)
            t_propose = time.time()
            try:
                proposals = self.proposer.propose(view)
            except TranscriptExhausted as e:
                if not self.outcomes:  # not one answer for this task: the wrong transcript
                    self.error = e
                else:  # the recorded run stopped here: so does its replay, with what it measured
                    self.ended = "the replayed transcript has no more answers"
                return None
            except BaseException as e:
                self.error = e
                return None
            t_check = time.time()
            outcomes, schedules = self.check(proposals)
            self.outcomes += outcomes
            self.history.ended(self.round, len(proposals))
            if schedules:
                break
            self._record(outcomes, proposals)
        else:
            self.ended = f"{self.max_empty_rounds} rounds of proposals in a row gave no new valid candidate"
            return None
        t_rank = time.time()
        chosen = self._rank(outcomes, schedules, want)
        for i in schedules:
            outcomes[i].status = "queued" if i in chosen else "ranked out"
        self.pending = [(outcomes[i], proposals[i]) for i in chosen]
        self._record(outcomes, proposals)  # measured ones are recorded again with latencies
        candidates = [measure_candidate(schedules[i]) for i in chosen]
        if again is not None:
            self.pending.append(again[:2])
            candidates.append(measure_candidate(again[2]))
            self.remeasured.add(again[0].repeats.n)
        self.round_times.append({"round": self.round, "proposals": len(proposals), "valid": len(schedules),
                                 "propose_s": t_check - t_propose, "check_s": t_rank - t_check,
                                 "rank_s": time.time() - t_rank, "total_s": time.time() - t0})
        return candidates

    def _remeasure(self):
        """(outcome, proposal, schedule) measuring the fastest kernel again, if it has not been: None otherwise."""
        if not self.remeasure_best or not self.measured or self.measured[0].n in self.remeasured:
            return None
        best = self.measured[0]
        if best.n is None:  # from the database only: not in the history, nothing to note the result on
            return None
        try:
            sch = schedule_lang.fresh_schedule(self.context.mod, seed=self.rng.randrange(1, 1 << 30))
            schedule_lang.apply(schedule_lang.parse(best.program), sch, lift=True)
            sch.enter_postproc()
            if not all(post.apply(sch) for post in self.postprocs):
                return None
        except Exception:  # it applied when it was measured; a TVM that changed since: measure something new
            return None
        self.origins[tvm_ffi.structural_hash(sch.mod)] = "re-measure"  # trials.jsonl: which trial is a repeat
        out = Outcome(best.program, f"re-measure of {best.source}", "queued", round=self.round + 1, repeats=best)
        return out, Proposal(best.program, out.source), sch

    def check(self, proposals: list[Proposal]):
        """What a round does with its proposals before ranking them: each parsed, applied lifted, post-processed and
        lowered for its features; -> (an Outcome per proposal: rejected with the reason, duplicate, or unranked,
        {index: schedule} of the unranked ones). Also benchmarks/library_retarget.py's check, outside a search."""
        outcomes, schedules = [], {}
        round_seen = set()
        for i, p in enumerate(proposals):
            out = Outcome(p.program, p.source, "rejected", round=self.round, idea=p.idea)
            outcomes.append(out)
            try:
                program = schedule_lang.parse(p.program)
                sch = schedule_lang.fresh_schedule(self.context.mod, seed=self.rng.randrange(1, 1 << 30),
                                                   debug_mask="all")
                schedule_lang.apply(program, sch, lift=True)  # the same kernel, as a trace evolution can move
                out.program = "\n".join(sch.trace.as_python(remove_postproc=True))  # what is measured, lifted
                sch.enter_postproc()
                for post in self.postprocs:
                    if not post.apply(sch):
                        raise ScheduleLangError(len(program), f"the program is invalid for this target: "
                                                              f"post-processor {type(post).__name__} rejected it")
                # The cost model lowers each candidate for its features, and an error there ends the search.
                self.features.extract_from(self.context, [measure_candidate(sch)])
            except ScheduleLangError as e:
                out.reason = str(e)
                self.rejected.append(out)
                continue
            except Exception as e:  # TVM internals can raise anything on odd but parseable programs
                out.reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
                self.rejected.append(out)
                continue
            h = tvm_ffi.structural_hash(sch.mod)
            out.kernel = str(h)
            if h in self.seen or h in round_seen:
                out.status, out.reason = "duplicate", "same kernel as one already measured or proposed"
                continue
            round_seen.add(h)
            out.status = "unranked"
            schedules[i] = sch
        return outcomes, schedules

    def _rank(self, outcomes: list[Outcome], schedules: dict, want: int) -> list[int]:
        """Top by predicted speed, plus an exploration share drawn at random from the rest."""
        idx = list(schedules)
        cands = [measure_candidate(schedules[i]) for i in idx]
        scores = [float(s) for s in self.cost_model.predict(self.context, cands)]
        for i, s in zip(idx, scores):
            outcomes[i].predicted = s
        order = [i for _, i in sorted(zip(scores, idx), key=lambda t: -t[0])]
        n_explore = min(int(want * self.explore), max(0, len(order) - want))
        top = order[:want - n_explore]
        rest = order[want - n_explore:]
        chosen = top + self.rng.sample(rest, n_explore)
        for i in chosen:
            h = tvm_ffi.structural_hash(schedules[i].mod)
            self.seen.add(h)
            self.origins[h] = self.proposer.label
        return chosen

    def origin_of(self, candidate) -> str | None:
        return self.origins.get(tvm_ffi.structural_hash(candidate.sch.mod))

    def add_results(self, candidates, results, source: str) -> None:
        """Results of candidates another search made (hybrid's evolution): they count against the budget and
        join the history the proposer sees, as programs where the language can say them."""
        done = []
        for cand, r in zip(candidates, results):
            self.trials += 1
            h = tvm_ffi.structural_hash(cand.sch.mod)
            self.seen.add(h)
            self.origins[h] = source
            try:
                program = schedule_lang.from_trace(cand.sch.trace, postproc=False)
            except ScheduleLangError:
                continue
            out = Outcome(program, source, "measuring", round=self.round, kernel=str(h))
            self.outcomes.append(out)
            token = result_codes.deferred_token(r.error_msg)
            if token is not None:
                self.measuring[token] = (out, Proposal(program, source))
            else:
                self._outcome(out, r)
            done.append(out)
        self.measured.sort(key=lambda o: o.latency_us)
        self.history.record(done)

    def notify_runner_results(self, measure_candidates, results) -> None:
        for (out, proposal), r in zip(self.pending, results):
            self.trials += 1
            token = result_codes.deferred_token(r.error_msg)
            if token is not None:  # still compiling or queued: its result comes with a later round
                out.status = "measuring"
                self.measuring[token] = (out, proposal)
            else:
                self._outcome(out, r)
        self.measured.sort(key=lambda o: o.latency_us)
        self._record([o for o, _ in self.pending], [p for _, p in self.pending])
        self.pending = []

    def notify_late_results(self, tokens, results) -> None:
        late = [(self.measuring.pop(t), r) for t, r in zip(tokens, results) if t in self.measuring]
        for (out, _), r in late:
            self._outcome(out, r)
        self.measured.sort(key=lambda o: o.latency_us)
        self._record([o for (o, _), _ in late], [p for (_, p), _ in late])

    def _outcome(self, out: Outcome, r) -> None:
        if r.error_msg is None and r.run_secs:
            out.status, out.latency_us = "measured", 1e6 * sum(float(s) for s in r.run_secs) / len(r.run_secs)
            if out.repeats is not None:
                out.repeats.remeasured_us = out.latency_us
            else:
                self.measured.append(out)
        else:
            out.status, out.reason = "failed", (r.error_msg or "no timing").strip().splitlines()[-1][:300]
            if out.repeats is None:
                self.rejected.append(out)

    def post_tuning(self) -> None:
        pass

    def clone(self):
        return ProposalSearch(self.proposer, self.target_facts, self.explore, self.oversample,
                              self.max_empty_rounds, self.seed, self.history_path, self.remeasure_best)


def search_factory(name: str, proposer_for, target_facts: dict, seed: int, client=None, wrap=None, run=None,
                   remeasure_best: bool = False, library=None):
    """-> factory `task -> ProposalSearch` (or `wrap(ProposalSearch)`), with `.stats()` for results.json.
    `run`: its proposals.jsonl keeps the history; `remeasure_best`: see ProposalSearch; `library`: the program
    library `proposer_for` draws on (library_first), recorded with its programs per task."""
    searches: list = []

    def factory(task):
        search = ProposalSearch(proposer_for(task), target_facts, seed=seed,
                                history=run.proposals if run is not None else None, remeasure_best=remeasure_best)
        searches.append(search if wrap is None else wrap(search))
        return searches[-1]

    def stats() -> dict:
        inner = [getattr(s, "proposals", s) for s in searches]
        rounds = [r for s in inner for r in s.round_times]
        out = {"proposer": inner[0].proposer.label if inner else name, "rounds": rounds}
        if wrap is None and (ended := {s.context.task_name: s.ended for s in inner if s.ended}):  # hybrid goes on
            out["ended"] = ended
        if rounds:
            out["mean_round_s_besides_measurement"] = sum(r["total_s"] for r in rounds) / len(rounds)
        if wrap is not None:
            out["phases"] = {s.proposals.context.task_name: s.phases for s in searches}
        if library is not None:
            out["library"] = {**library.record(), "programs_per_task": proposer_for.matched}
        if client is not None:
            out["llm"] = client.usage()
            out["failed_rounds"] = [r for s in inner for r in getattr(s.proposer, "failed_rounds", [])]
        return out

    factory.stats = stats
    return factory
