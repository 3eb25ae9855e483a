"""Hybrid search: proposals find a kernel's structure, MetaSchedule's evolution tunes it.

    proposal round (the LLM's programs, else the rules proposer's) -> measured into the task's database,
    literal tile sizes and unroll steps lifted into sampled decisions (schedule_lang._lift)
    -> EvolutionarySearch rounds, unchanged but for its design spaces: MetaSchedule's sketches plus the
       structures of the fastest measured proposals, so that its initial population holds those programs
       with their decisions re-sampled, beside the database's best; its mutators then move the decisions
       (tile sizes, unroll, compute location) of all of them
    -> when evolution stalls (no kernel `min_gain` faster for `stall_trials` trials) another proposal round,
       whose prompt shows what evolution found -> ...

When the model (or a replayed transcript) has no more answers, proposal rounds come from the rules
proposer. One trial is one hardware measurement throughout, counted against the same per-task budget as
every other arm; trials.jsonl and results.json say which came from proposals and which from evolution.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import tvm_ffi
from tvm.s_tir import Trace
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .. import schedule_lang
from ..options import HYBRID_STALL_TRIALS
from ..schedule_lang import ScheduleLangError
from .proposals import FirstAnswer, ProposalSearch, TaskView, measure_candidate, search_factory
from .rules import RuleProposer

log = logging.getLogger("schedsearch.ms")


@dataclass(frozen=True)
class HybridOptions:
    stall_trials: int = HYBRID_STALL_TRIALS  # evolution trials without a better kernel before the next proposal round
    min_gain: float = 0.01  # "better": this much faster than the best so far
    proposal_trials: int = 16  # at most per proposal round (an LLM round measures its ideas x programs)
    # EvolutionarySearch gives up when fewer than this many random samples of the design space are valid
    # (stock: 50). On CUDA few conv samples pass VerifyGPUCode ("Cannot sample enough initial population"
    # on both H100 convs), while the measured proposals are a population of their own.
    init_min_unmeasured: int = 1
    # XGBModel ranks at random until it has this many measurements (stock: 100, so a 128-trial ansor run ranks
    # its first two rounds blind). Evolution's parents are drawn by predicted score, and only a trained model
    # prefers the measured proposals' neighbours; but a model of one or two measurements predicts one value
    # for all (CPU test: 2.0 for every candidate, and the heap of ties kept none of the proposal's structure),
    # worse than random. 16 is a choice, not a measured optimum.
    cost_model_warmup: int = 16
    # The fastest measured proposals whose structures join evolution's design spaces.
    proposal_spaces: int = 8


def _structure(trace) -> str:
    """A schedule's structure: its trace less post-processing and decisions (what re-sampling keeps)."""
    return "\n".join(Trace(trace.insts, {}).simplified(True).as_python())


@derived_object
class HybridSearch(ms.search_strategy.PySearchStrategy):
    def __init__(self, proposals: ProposalSearch, options: HybridOptions = HybridOptions()):
        super().__init__()
        self.proposals, self.options = proposals, options
        self.evolution = None  # made (again) when a proposal round brought new structures
        self.evolution_failed = False  # on the sketches alone: proposal rounds only from then on
        self.phases: list[dict] = []  # each round: who made it, its trials, the best after it

    @property
    def error(self):
        return self.proposals.error

    def origin_of(self, candidate) -> str | None:
        return self.proposals.origin_of(candidate)

    def _initialize_with_tune_context(self, context) -> None:
        self.context = context
        self.proposals._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database, cost_model):
        self.proposals.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)
        self.proposals.per_iter = min(num_trials_per_iter, self.options.proposal_trials)
        self.design_spaces, self.database, self.cost_model = list(design_spaces), database, cost_model
        self.space_keys = {_structure(s.trace) for s in self.design_spaces}
        self.n_sketches = len(self.design_spaces)
        self.per_iter = num_trials_per_iter
        # A resumed task has its proposals measured already: evolution goes first.
        self.next = "evolution" if self.proposals.measured else "proposals"
        self.in_flight = None
        self.best_us, self.since_gain = self._best(), 0

    def _best(self) -> float | None:
        return self.proposals.measured[0].latency_us if self.proposals.measured else None

    def generate_measure_candidates(self):
        p = self.proposals
        if p.trials >= p.max_trials or p.error is not None:
            return None
        for _ in range(2):  # when one side has nothing new, the other
            if self.next == "proposals":
                self.next = "evolution"
                candidates = p.generate_measure_candidates()
                if p.error is not None:
                    return None
                if candidates:
                    self.in_flight = p.proposer.label
                    log.info("hybrid: proposal round from %s, %d candidates", self.in_flight, len(candidates))
                    return candidates
            else:
                candidates = self._evolve(min(self.per_iter, p.max_trials - p.trials))
                if candidates:
                    self.in_flight = "evolution"
                    log.info("hybrid: evolution round, %d candidates", len(candidates))
                    return candidates
                self.next = "proposals"
        return None

    def _start_evolution(self) -> None:
        """A new EvolutionarySearch whose design spaces are MetaSchedule's sketches plus the structures of the
        fastest measured proposals not among them yet; the running one when there are none new."""
        new = []
        for out in self.proposals.measured:  # fastest first
            if len(self.design_spaces) + len(new) - self.n_sketches >= self.options.proposal_spaces:
                break
            if out.source == "evolution":
                continue
            try:
                sch = schedule_lang.fresh_schedule(self.context.mod)
                schedule_lang.apply(schedule_lang.parse(out.program), sch, lift=True)
            except ScheduleLangError:
                continue
            key = _structure(sch.trace)
            if key not in self.space_keys:
                self.space_keys.add(key)
                if self._replays(sch.trace):
                    new.append(sch)
        if self.evolution is not None and not new:
            return
        self.design_spaces += new
        self._new_evolution()

    def _replays(self, trace, samples: int = 16) -> bool:
        """Whether the structure replays with re-sampled decisions, and the cost model can lower the result,
        without an error escaping TVM: evolution does both in C++ threads where some failures are not caught.
        On the H200 a lifted LLM layernorm program ("old_outputs.size() == new_outputs.size() (5 vs. 4)":
        likely a tile of 1 taking a loop with it under preserve_unit_loops=False) ended the arm."""
        structure = Trace(trace.insts, {}).simplified(True)
        for seed in range(1, samples + 1):
            sch = schedule_lang.fresh_schedule(self.context.mod, seed=seed)
            try:
                structure.apply_to_schedule(sch, remove_postproc=True)
                sch.enter_postproc()
                if all(post.apply(sch) for post in self.proposals.postprocs):
                    self.proposals.features.extract_from(self.context, [measure_candidate(sch)])
            except Exception as e:  # TVM raises RuntimeError, ScheduleError, TVMError...
                log.info("hybrid: a proposal's structure left out of evolution: re-sampled, it fails (%s)",
                         str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__)
                return False
        return True

    def _new_evolution(self) -> None:
        if self.evolution is not None:
            self.evolution.post_tuning()
        self.evolution = ms.search_strategy.EvolutionarySearch(init_min_unmeasured=self.options.init_min_unmeasured)
        self.evolution._initialize_with_tune_context(self.context)
        # Evolution's round is its best `num_trials_per_iter` by the model, and the database's best it starts
        # from come back among them unchanged (its dedupe knows only what it picked itself): ask for as many
        # more as it takes from the database, so that a round still has num_trials_per_iter new kernels.
        from_database = int(self.evolution.population_size * self.evolution.init_measured_ratio)
        self.evolution.pre_tuning(1 << 30, self.per_iter + from_database, self.design_spaces, self.database,
                                  self.cost_model)
        log.info("hybrid: evolution over %d design spaces, %d of them proposals' structures",
                 len(self.design_spaces), len(self.design_spaces) - self.n_sketches)

    def _evolve(self, want: int) -> list | None:
        """Evolution's next round less the kernels measured already: its own dedupe knows only what it
        picked itself, so the measured proposals it starts from would come back unchanged."""
        if self.evolution_failed:
            return None
        self._start_evolution()
        try:
            candidates = self.evolution.generate_measure_candidates()
        except Exception as e:  # an error that escaped TVM's threads (see _replays): evolution on the sketches
            log.warning("hybrid: evolution failed (%s)", str(e).strip().splitlines()[-1][:300] if str(e).strip()
                        else type(e).__name__)
            if len(self.design_spaces) == self.n_sketches:
                self.evolution.post_tuning()
                self.evolution, self.evolution_failed = None, True
                return None
            self.design_spaces = self.design_spaces[:self.n_sketches]
            self._new_evolution()
            return self._evolve(want)
        if candidates is None:
            return None
        fresh = []
        for cand in candidates:
            h = tvm_ffi.structural_hash(cand.sch.mod)
            if h not in self.proposals.seen and len(fresh) < want:
                self.proposals.seen.add(h)
                self.proposals.origins[h] = "evolution"
                fresh.append(cand)
        if len(fresh) < len(candidates):
            log.info("hybrid: %d of evolution's %d candidates measured before or past the budget, dropped",
                     len(candidates) - len(fresh), len(candidates))
        return fresh

    def notify_runner_results(self, measure_candidates, results) -> None:
        if self.in_flight == "evolution":
            self.evolution.notify_runner_results(measure_candidates, results)
            self.proposals.add_results(measure_candidates, results, "evolution")
        else:
            self.proposals.notify_runner_results(measure_candidates, results)
        if not self._gained():
            self.since_gain += len(results)
        self.phases.append({"source": self.in_flight, "trials": len(results), "best_us": self._best()})
        if self.in_flight == "evolution" and self.since_gain >= self.options.stall_trials:
            log.info("hybrid: evolution stalled (%d trials without a kernel %.0f%% faster): a proposal round next",
                     self.since_gain, 100 * self.options.min_gain)
            self.next, self.since_gain = "proposals", 0

    def _gained(self) -> bool:
        best = self._best()
        if best is not None and (self.best_us is None or best < self.best_us * (1 - self.options.min_gain)):
            self.best_us, self.since_gain = best, 0
            return True
        return False

    def notify_late_results(self, tokens, results) -> None:
        """Deferred candidates of earlier rounds (slow builds: on the H200 matmul all 8 of the model's programs
        came back after evolution's first round). A gain among them counts; the phase says when it arrived."""
        self.proposals.notify_late_results(tokens, results)
        if results:
            self._gained()
            self.phases.append({"source": "late results", "trials": 0, "results": len(results),
                                "best_us": self._best()})

    def post_tuning(self) -> None:
        self.proposals.post_tuning()
        if self.evolution is not None:
            self.evolution.post_tuning()

    def clone(self):
        return HybridSearch(self.proposals.clone(), self.options)


def make_hybrid_strategy(target, seed: int = 0, run=None, llm: str | None = None,
                         stall_trials: int = HybridOptions.stall_trials, library: str | None = None, **llm_options):
    """-> factory `task -> HybridSearch`; `llm` None: the program library's programs for the task (`library`:
    --library's none | auto | PATH), then the rules proposer's, make the proposal rounds."""
    from ..target import facts

    options = HybridOptions(stall_trials=stall_trials)
    target_facts = facts(target)
    client, lib = None, None
    if llm:
        from .llm import make_llm_proposer
        llm_for = make_llm_proposer(run=run, target_facts=target_facts, seed=seed, llm=llm, **llm_options)
        client = llm_for.client
        proposer_for = lambda task: FirstAnswer([llm_for(task), RuleProposer()])
    else:
        from .. import library as libraries
        from .from_library import library_first
        lib = libraries.load(library, target.kind.name)
        proposer_for = library_first(lib, target.kind.name, lambda task: RuleProposer())
    factory = search_factory("hybrid", proposer_for, target_facts, seed, client,
                             wrap=lambda search: HybridSearch(search, options), run=run, library=lib)
    factory.cost_model_warmup = options.cost_model_warmup
    return factory
