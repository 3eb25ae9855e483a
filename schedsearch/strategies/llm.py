"""The LLM proposer: ideas in words first (fan-out 1), then programs per idea in parallel
(fan-out 2); all programs of a round go through the shared check/rank/measure loop (fan-in).

Everything the model writes is untrusted text: it only ever reaches `schedule_lang.parse`.
"""
from __future__ import annotations

import hashlib
import re
import sys

from .. import schedule_lang
from ..llm_client import LLMError, Request, make_client
from .proposals import Outcome, Proposal, TaskView, search_factory

SYSTEM = """You are an expert performance engineer who schedules tensor kernels with Apache TVM.
You write schedule programs in a restricted language: one call per line on `sch`, exactly as TVM prints
schedule traces. Results are assigned to plain names (tuple unpacking allowed); arguments are numbers,
strings, True/False/None, names bound on earlier lines, and lists of those. Nothing else is accepted:
no imports, loops, ifs, comprehensions, attribute access, or other functions.
Each program starts from the UNSCHEDULED kernel and must be complete on its own.
Get blocks with sch.get_sblock(name="...", func_name="main") using the block names in the kernel.
Use sch.sample_perfect_tile(loop=..., n=..., max_innermost_factor=64, decision=[...]) or literal split
factors whose product equals the loop extent. On CUDA every block must end up bound to blockIdx/threadIdx
(thread extents within the target limits).
Allowed primitives:
{catalogue}"""

CONTEXT = """Kernel `{name}` (TVMScript):
```
{script}
```
Target: {target}

A starting point: a design-space sketch from TVM's own rules (its decisions are examples):
```python
{sketch}
```
{history}"""

IDEAS = """Propose {n} distinct optimisation ideas for this kernel on this target, in words, no code:
e.g. tiling for shared memory or cache, thread binding, vectorized loads, unrolling, cross-thread
reduction, rfactor, cache_read/cache_write stages, compute_at placement. Learn from the results above.
Answer with one idea per line, each line starting with "- "."""

PROGRAM = """Implement this idea as ONE complete schedule program:
{idea}
This is variation {k} of {of}: choose parameters (tile sizes, thread counts, unroll factors) that differ
from the other variations. Answer with the program in a single ```python block and nothing else."""


def history_text(view: TaskView) -> str:
    lines = []
    if view.measured:
        best = view.measured[0]
        lines.append(f"Fastest so far: {best.latency_us:.4g} us ({best.source}):\n```python\n{best.program}\n```")
        lines.append("Measured (latency, origin): " + "; ".join(
            f"{o.latency_us:.4g} us ({o.source})" for o in view.measured[:8]))
    if view.rejected:
        lines.append("Recent failures (origin: reason):\n" + "\n".join(
            f"- {o.source}: {o.reason}" for o in view.rejected[-8:]))
    return "\n".join(lines) if lines else "Nothing has been measured yet."


def parse_ideas(text: str, n: int) -> list[str]:
    ideas = [m.group(1).strip() for m in re.finditer(r"^\s*(?:[-*]|\d+[.)])\s+(.+)$", text, re.M)]
    return (ideas or [text.strip()])[:n]


def extract_program(text: str) -> str:
    """The first fenced code block, else the whole answer (the parser then says what is wrong)."""
    m = re.search(r"```[a-zA-Z]*\n(.*?)```", text, re.S)
    return (m.group(1) if m else text).strip()


class LLMProposer:
    def __init__(self, client, ideas: int = 4, programs_per_idea: int = 2, temperature: float = 0.8,
                 seed: int = 0):
        self.client, self.ideas, self.per_idea = client, ideas, programs_per_idea
        self.temperature, self.seed = temperature, seed
        self.label = f"llm:{client.model}"
        self.failed_rounds: list[dict] = []  # rounds in which no program came back because requests failed

    def propose(self, view: TaskView) -> list[Proposal]:
        sketch = view.sketches[0] if view.sketches else "(none)"
        target = ", ".join(f"{k} {v}" for k, v in view.target.items())
        context = CONTEXT.format(name=view.name, script=view.script, target=target, sketch=sketch,
                                 history=history_text(view))
        system = {"role": "system", "content": SYSTEM.format(catalogue=schedule_lang.catalogue())}
        tag = f"{view.name}|r{view.round}"
        seed = self.seed * 1_000_003 + view.round * 1000
        [ideas_reply] = self.client.complete_many([Request(
            [system, {"role": "user", "content": context + "\n\n" + IDEAS.format(n=self.ideas)}],
            temperature=self.temperature, seed=seed, tag=tag + "|ideas")])
        if ideas_reply.error:
            self._round_failed(view, [ideas_reply])
            return []
        ideas = parse_ideas(ideas_reply.text or "", self.ideas)
        requests, sources = [], []
        for i, idea in enumerate(ideas):
            for k in range(self.per_idea):
                requests.append(Request(
                    [system, {"role": "user", "content": context + "\n\n" + PROGRAM.format(idea=idea, k=k + 1, of=self.per_idea)}],
                    temperature=self.temperature, seed=seed + 1 + i * self.per_idea + k, tag=f"{tag}|i{i}|s{k}"))
                sources.append(f"idea {i + 1} ({idea[:80]}), variation {k + 1}")
        out = []
        replies = self.client.complete_many(requests)
        for src, reply in zip(sources, replies):
            if reply.error is None and reply.text:
                out.append(Proposal(extract_program(reply.text), src, request=reply.prompt_hash))
        if not out and any(r.error for r in replies):
            self._round_failed(view, [ideas_reply, *replies])
        return out

    def _round_failed(self, view: TaskView, replies: list) -> None:
        """No program came back because requests failed: say so (console, results.json). If no request has
        succeeded in this run at all, the model cannot be reached: stop, there is nothing to search with."""
        failed = [r for r in replies if r.error]
        record = {"task": view.name, "round": view.round, "requests": len(replies), "failed": len(failed),
                  "error": failed[-1].error, "attempts": failed[-1].attempts}
        self.failed_rounds.append(record)
        where = f"; every request is in {self.client.transcript}" if self.client.transcript else ""
        usage = self.client.usage()
        if usage["requests"] == usage["failures"]:
            raise LLMError(f"the LLM endpoint gave no answer: all {usage['requests']} requests of this run failed "
                           f"(last: {record['error']}, after {record['attempts']} attempts), so nothing was "
                           f"measured; check --llm / OPENAI_BASE_URL and the endpoint{where}")
        print(f"[{view.name}] LLM round {view.round}: {len(failed)} of {len(replies)} requests failed, no program "
              f"came back (last: {record['error']}){where}", file=sys.stderr)

    def record(self, outcomes: list[Outcome], proposals: list[Proposal]) -> None:
        for o, p in zip(outcomes, proposals):
            self.client.log_event("outcome", request=p.request, source=o.source, status=o.status, reason=o.reason,
                                  predicted=o.predicted, latency_us=o.latency_us,
                                  program_sha256=hashlib.sha256(o.program.encode()).hexdigest()[:16])


def make_llm_proposer(run, target_facts: dict, seed: int, llm: str, llm_model: str | None, concurrency: int,
                      ideas: int, programs_per_idea: int, temperature: float, price_in: float, price_out: float,
                      wait: bool, timeout_s: float, client=None):
    """Options: options.LLMOptions (their defaults are there)."""
    client = client or make_client(llm, llm_model, run.transcript if run else None, concurrency=concurrency,
                                   timeout_s=timeout_s, price_in=price_in, price_out=price_out, wait=wait)
    factory = lambda task: LLMProposer(client, ideas, programs_per_idea, temperature, seed)
    factory.client = client
    return factory


def make_llm_strategy(target, seed: int = 0, run=None, **options):
    """-> factory `task -> ProposalSearch`, with `.stats()`: round timings and LLM usage for results.json."""
    from ..target import facts

    target_facts = facts(target)
    proposer_for = make_llm_proposer(run=run, target_facts=target_facts, seed=seed, **options)
    return search_factory("llm", proposer_for, target_facts, seed, proposer_for.client)
