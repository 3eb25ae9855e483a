"""The round loop shared by proposal-based strategies (rules, llm):

    propose programs -> check (parse, apply, postprocess, dedupe) -> rank (XGBoost) -> measure -> history

It is a MetaSchedule `PySearchStrategy`, so it runs in the same task scheduler as the Ansor
baseline with the same builder, runner, database, cost model and trial accounting: a trial is one
hardware measurement for every strategy.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Protocol

import tvm
import tvm_ffi
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .. import measure, result_codes, schedule_lang
from ..schedule_lang import ScheduleLangError

HISTORY_FOR_PROMPT = 12


@dataclass
class Outcome:
    """What became of one proposed program."""
    program: str
    source: str  # which proposal (e.g. "idea 2, sample 1" or "sketch 0 resampled")
    status: str  # rejected | duplicate | ranked out | queued -> (measuring: build or run deferred ->) measured | failed
    reason: str | None = None
    predicted: float | None = None
    latency_us: float | None = None


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
    rejected: list[Outcome]  # recent rejections with reasons
    round: int
    want: int  # how many programs the round should produce (before checking)
    rng: random.Random
    mod: tvm.IRModule = field(repr=False, default=None)


@dataclass
class Proposal:
    program: str
    source: str
    request: str | None = None  # id of the LLM request that produced it (for the transcript)


class Proposer(Protocol):
    label: str

    def propose(self, view: TaskView) -> list[Proposal]: ...

    def record(self, outcomes: list[Outcome], proposals: list[Proposal]) -> None: ...


def measure_candidate(sch) -> ms.MeasureCandidate:
    return ms.MeasureCandidate(sch, ms.arg_info.ArgInfo.from_entry_func(sch.mod, True))


@derived_object
class ProposalSearch(ms.search_strategy.PySearchStrategy):
    def __init__(self, proposer: Proposer, target_facts: dict, explore: float = 0.2, oversample: int = 2,
                 max_empty_rounds: int = 3, seed: int = 0):
        super().__init__()
        self.proposer, self.target_facts = proposer, target_facts
        self.explore, self.oversample, self.max_empty_rounds = explore, oversample, max_empty_rounds
        self.seed = seed
        self.round_times: list[dict] = []
        # An exception raised in here reaches Python again as a bare RuntimeError through TVM's FFI:
        # keep the original for the caller (tune.search) and end the task instead.
        self.error: BaseException | None = None

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
        self.measured: list[Outcome] = []
        self.rejected: list[Outcome] = []
        self.pending: list[tuple[Outcome, Proposal]] = []
        self.measuring: dict[int, tuple[Outcome, Proposal]] = {}  # deferred builds and runs, by token
        self._warm_start()

    def _warm_start(self) -> None:
        """Earlier measurements of this task (a resumed run) seed the history, the dedupe set and the model."""
        if not self.database.has_workload(self.context.mod):
            return
        workload = self.database.commit_workload(self.context.mod)
        records = self.database.get_top_k(workload, 1 << 20)
        cands, results = [], []
        for rec in records:
            try:
                cand = rec.as_measure_candidate()
            except Exception:  # a record of an older TVM that no longer applies
                continue
            self.seen.add(tvm_ffi.structural_hash(cand.sch.mod))
            secs = [float(s) for s in rec.run_secs] if rec.run_secs else None
            if secs and min(secs) < 1e9:
                try:
                    text = schedule_lang.from_trace(rec.trace)
                    self.measured.append(Outcome(text, "database", "measured", latency_us=1e6 * sum(secs) / len(secs)))
                except ScheduleLangError:  # measured, but not expressible as a program: model data only
                    pass
                cands.append(cand)
                results.append(ms.runner.RunnerResult(run_secs=secs, error_msg=None))
        if cands:
            measure.update_cost_model(self.cost_model, self.context, cands, results)
        self.measured.sort(key=lambda o: o.latency_us)

    def generate_measure_candidates(self):
        if self.trials >= self.max_trials:
            return None
        want = min(self.per_iter, self.max_trials - self.trials)
        t0 = time.time()
        for _ in range(self.max_empty_rounds):
            self.round += 1
            view = TaskView(self.context.task_name, self.context.mod.script(), self.target_facts, self.sketches,
                            self.measured[:HISTORY_FOR_PROMPT], self.rejected[-HISTORY_FOR_PROMPT:], self.round,
                            max(want * self.oversample, MIN_PROPOSALS), self.rng, self.context.mod)
            t_propose = time.time()
            try:
                proposals = self.proposer.propose(view)
            except BaseException as e:
                self.error = e
                return None
            t_check = time.time()
            outcomes, schedules = self._check(proposals)
            if schedules:
                break
            self.proposer.record(outcomes, proposals)
        else:
            return None
        t_rank = time.time()
        chosen = self._rank(outcomes, schedules, want)
        for i in schedules:
            outcomes[i].status = "queued" if i in chosen else "ranked out"
        self.pending = [(outcomes[i], proposals[i]) for i in chosen]
        self.proposer.record(outcomes, proposals)  # measured ones are recorded again with latencies
        self.round_times.append({"round": self.round, "proposals": len(proposals), "valid": len(schedules),
                                 "propose_s": t_check - t_propose, "check_s": t_rank - t_check,
                                 "rank_s": time.time() - t_rank, "total_s": time.time() - t0})
        return [measure_candidate(schedules[i]) for i in chosen]

    def _check(self, proposals: list[Proposal]):
        outcomes, schedules = [], {}
        round_seen = set()
        for i, p in enumerate(proposals):
            out = Outcome(p.program, p.source, "rejected")
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
        for cand, r in zip(candidates, results):
            self.trials += 1
            h = tvm_ffi.structural_hash(cand.sch.mod)
            self.seen.add(h)
            self.origins[h] = source
            try:
                program = schedule_lang.from_trace(cand.sch.trace)
            except ScheduleLangError:
                continue
            out = Outcome(program, source, "measuring")
            token = result_codes.deferred_token(r.error_msg)
            if token is not None:
                self.measuring[token] = (out, Proposal(program, source))
            else:
                self._outcome(out, r)
        self.measured.sort(key=lambda o: o.latency_us)

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
        self.proposer.record([o for o, _ in self.pending], [p for _, p in self.pending])
        self.pending = []

    def notify_late_results(self, tokens, results) -> None:
        late = [(self.measuring.pop(t), r) for t, r in zip(tokens, results) if t in self.measuring]
        for (out, _), r in late:
            self._outcome(out, r)
        self.measured.sort(key=lambda o: o.latency_us)
        self.proposer.record([o for (o, _), _ in late], [p for (_, p), _ in late])

    def _outcome(self, out: Outcome, r) -> None:
        if r.error_msg is None and r.run_secs:
            out.status, out.latency_us = "measured", 1e6 * sum(float(s) for s in r.run_secs) / len(r.run_secs)
            self.measured.append(out)
        else:
            out.status, out.reason = "failed", (r.error_msg or "no timing").strip().splitlines()[-1][:300]
            self.rejected.append(out)

    def post_tuning(self) -> None:
        pass

    def clone(self):
        return ProposalSearch(self.proposer, self.target_facts, self.explore, self.oversample,
                              self.max_empty_rounds, self.seed)


def search_factory(name: str, proposer_for, target_facts: dict, seed: int, client=None, wrap=None):
    """-> factory `task -> ProposalSearch` (or `wrap(ProposalSearch)`), with `.stats()` for results.json."""
    searches: list = []

    def factory(task):
        search = ProposalSearch(proposer_for(task), target_facts, seed=seed)
        searches.append(search if wrap is None else wrap(search))
        return searches[-1]

    def stats() -> dict:
        inner = [getattr(s, "proposals", s) for s in searches]
        rounds = [r for s in inner for r in s.round_times]
        out = {"proposer": inner[0].proposer.label if inner else name, "rounds": rounds}
        if rounds:
            out["mean_round_s_besides_measurement"] = sum(r["total_s"] for r in rounds) / len(rounds)
        if wrap is not None:
            out["phases"] = {s.proposals.context.task_name: s.phases for s in searches}
        if client is not None:
            out["llm"] = client.usage()
            out["failed_rounds"] = [r for s in inner for r in getattr(s.proposer, "failed_rounds", [])]
        return out

    factory.stats = stats
    return factory
