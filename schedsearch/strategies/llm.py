"""The LLM proposer: ideas in words first (fan-out 1), then programs per idea in parallel
(fan-out 2), or programs directly (--llm-exchange programs); all programs of a round go through the
shared check/rank/measure loop (fan-in).

Everything the model writes is untrusted text: it only ever reaches `schedule_lang.parse`.
"""
from __future__ import annotations

import hashlib
import re
import sys

from .. import schedule_lang
from ..llm_client import LLMError, Request, make_client
from ..options import LLMOptions
from .proposals import Outcome, Proposal, TaskView, search_factory

SYSTEM = """You are an expert performance engineer who schedules tensor kernels with Apache TVM.
You write schedule programs in a restricted language (below), exactly as TVM prints schedule traces:
no imports, loops, ifs, comprehensions, attribute access or other functions; comments are allowed.
Each program starts from the UNSCHEDULED kernel and must be complete on its own.
Get blocks with sch.get_sblock(name="...", func_name="main") using the block names in the kernel.
Use sch.sample_perfect_tile(loop=..., n=..., max_innermost_factor=64, decision=[...]) or literal split
factors whose product equals the loop extent. On CUDA bind loops to blockIdx/threadIdx within the target's
limits (a post-processor binds the blocks left unbound, with its own choices).
Loops: `rf = sch.rfactor(loop=l, factor_axis=0)` puts block rf under new loops (sch.get_loops(block=rf)); the
original block keeps its loop handles but loses its reduction loops other than l. A block moved by
compute_at/reverse_compute_at gets new loops, one per block iterator in iterator order (an rfactor block's
factored iterator first): call sch.get_loops again.
TVM's post-processors for the target run after every program, as after its own traces: reduction inits are
split off for you and meta_schedule.* annotations work ({annotations}).
{tensorize}
Allowed primitives:
{catalogue}"""

CONTEXT = """Kernel `{name}` (TVMScript):
```
{script}
```
Target: {target}

{start}"""

# Until something is measured (then the fastest program is the starting point, and the prompt 1-2k shorter).
SKETCH = """A starting point: a design-space sketch from TVM's own rules (its decisions are examples):
```python
{sketch}
```
"""

IDEAS = """Propose {n} distinct optimisation ideas for this kernel on this target, in words, no code:
e.g. tiling for shared memory or cache, thread binding, vectorized loads, unrolling, cross-thread
reduction, rfactor, cache_read/cache_write stages, compute_at placement. Learn from the results above.
Answer with one idea per line, each line starting with "- "."""

PROGRAM = """Implement this idea as ONE complete schedule program:
{idea}
This is variation {k} of {of}: choose parameters (tile sizes, thread counts, unroll factors) that differ
from the other variations. Answer with the program in a single ```python block and nothing else."""

# --llm-exchange programs: one exchange a round, no ideas step.
DIRECT = """Write ONE complete schedule program for this kernel, with the idea it implements in words on its
first line, as a comment: `# idea: ...`. Learn from the results above. This is request {k} of {of} sent at
once with the same messages: implement the {k}th most promising idea you see, so that the {of} programs differ.
Answer with the program in a single ```python block and nothing else."""

STATUS_TEXT = {"duplicate": "duplicate of a kernel measured or proposed before, not measured",
               "ranked out": "not measured: ranked below the round's trials by the cost model",
               "measuring": "build or run still pending", "queued": "being measured"}


def us(latency: float) -> str:
    return f"{latency:.4g} us" if latency < 1e4 else f"{latency:,.0f} us"  # not 1.035e+04


def label(o: Outcome) -> str:
    return f"r{o.round} {o.source}"


def result_text(o: Outcome) -> str:
    if o.status == "measured":
        again = f" (re-measured: {us(o.remeasured_us)})" if o.remeasured_us is not None else ""
        return us(o.latency_us) + again
    if o.status in ("rejected", "failed"):
        return f"{o.status}: {(o.reason or '')[:200]}"
    return STATUS_TEXT.get(o.status, o.status)


def history_text(view: TaskView) -> str:
    """The fastest program in full, then every program of the last rounds with what became of it (its latency,
    or rejected and why, duplicate, ranked out), and the fastest of the rounds before."""
    lines = []
    if view.measured:
        best = view.measured[0]
        lines.append(f"Fastest so far: {result_text(best)} ({label(best)}):\n```python\n{best.program}\n```")
    rounds = sorted({o.round for o in view.recent})
    earlier = [o for o in view.measured[:8] if o.round not in rounds]
    if earlier:
        lines.append("Fastest of earlier rounds: " + "; ".join(f"{result_text(o)} ({label(o)})" for o in earlier))
    for r in rounds:
        lines.append(f"Round {r}, each program's latency or fate:")
        groups: dict[tuple, list[Outcome]] = {}  # by idea, else by origin; many without one (evolution) summed up
        for o in view.recent:
            if o.round == r:
                groups.setdefault((o.idea, o.source.split(",")[0]), []).append(o)
        for (idea, origin), group in groups.items():
            if idea is not None or len(group) <= 3:
                about = f" ({idea[:120]})" if idea else ""
                lines.append(f"- {origin}{about}: " + "; ".join(result_text(o) for o in group))
                continue
            fastest = min((o.latency_us for o in group if o.status == "measured"), default=None)
            lines.append(f"- {origin}: {len(group)} programs, {sum(o.status == 'measured' for o in group)} measured"
                         + (f", fastest {us(fastest)}" if fastest is not None else ""))
    return "\n".join(lines) if lines else "Nothing has been measured yet."


def target_kind(view: TaskView):
    """The target.KINDS entry of the task's target (llvm's where its facts name no kind)."""
    from ..target import KINDS

    return KINDS.get(view.target.get("kind"), KINDS["llvm"])


def tensorize_text(view: TaskView) -> str:
    """Which of TVM's tensor intrinsics compute with this kernel's input types on this target (or that none do)."""
    from tvm.s_tir import meta_schedule as ms

    from ..tune import TENSOR_INTRINSICS

    if not TENSOR_INTRINSICS or view.mod is None:
        return ""
    families = target_kind(view).tensor_intrinsics
    if families is None:  # llvm: the intrinsics of the host's architecture
        machine = str(view.target.get("machine", ""))
        families = ("x86",) if machine in ("x86_64", "AMD64") else ("arm_cpu",) if machine.startswith(("aarch64", "arm")) else ()
    dtypes = {str(a.dtype) for a in ms.arg_info.ArgInfo.from_prim_func(view.mod["main"])}
    names = []
    for name, (module, desc) in TENSOR_INTRINSICS.items():
        block = getattr(desc.body, "block", None)  # the description's root block reads and writes its buffers
        if block is None or module.rsplit(".", 1)[-1] not in families:
            continue
        written = [w.source for w in block.writes]  # TensorRegion.source: the buffer
        inputs = [r.source for r in block.reads if not any(r.source.same_as(w) for w in written)]
        if len(inputs) >= 2 and {str(b.dtype) for b in inputs} <= dtypes:
            names.append(name)  # a computation of two inputs (into an accumulator), not a load, store or fill
    kinds = "/".join(sorted(dtypes))
    if not names:
        return f"tensorize: no tensor intrinsic of TVM's computes on this kernel's types ({kinds}) on this target."
    more = f" ({len(names)} in all)" if len(names) > 24 else ""
    return f"tensorize: intrinsics for this kernel's types ({kinds}) on this target: {', '.join(sorted(names)[:24])}{more}."


def parse_ideas(text: str, n: int) -> list[str]:
    ideas = [m.group(1).strip() for m in re.finditer(r"^\s*(?:[-*]|\d+[.)])\s+(.+)$", text, re.M)]
    return (ideas or [text.strip()])[:n]


def extract_program(text: str) -> str:
    """The first fenced code block, else the whole answer (the parser then says what is wrong)."""
    m = re.search(r"```[a-zA-Z]*\n(.*?)```", text, re.S)
    return (m.group(1) if m else text).strip()


def stated_idea(program: str) -> str | None:
    """The `# idea: ...` comment a program of --llm-exchange programs starts with."""
    m = re.search(r"^\s*#\s*idea:\s*(.+)$", program, re.M | re.I)
    return m.group(1).strip() if m else None


class LLMProposer:
    """`exchange`: "ideas" asks for ideas, then programs for each (two exchanges a round); "programs" asks for
    programs directly, each with its idea in a comment (one exchange a round, for slow hand-offs)."""

    def __init__(self, client, ideas: int = LLMOptions.ideas, programs_per_idea: int = LLMOptions.programs_per_idea,
                 temperature: float = LLMOptions.temperature, seed: int = 0, exchange: str = LLMOptions.exchange):
        self.client, self.ideas, self.per_idea = client, ideas, programs_per_idea
        self.temperature, self.seed, self.exchange = temperature, seed, exchange
        self.label = f"llm:{client.model}"
        self.failed_rounds: list[dict] = []  # rounds in which no program came back because requests failed

    def propose(self, view: TaskView) -> list[Proposal]:
        sketch = view.sketches[0] if view.sketches else "(none)"
        target = ", ".join(f"{k} {v}" for k, v in view.target.items())
        start = history_text(view) if view.measured else SKETCH.format(sketch=sketch) + history_text(view)
        context = CONTEXT.format(name=view.name, script=view.script, target=target, start=start)
        system = {"role": "system", "content": SYSTEM.format(
            annotations=target_kind(view).annotations, tensorize=tensorize_text(view),
            catalogue=schedule_lang.catalogue())}
        tag = f"{view.name}|r{view.round}"
        seed = self.seed * 1_000_003 + view.round * 1000
        n = max(1, min(self.ideas * self.per_idea, view.can_measure))  # no more programs than trials left
        ask = lambda text, seed_, tag_: Request([system, {"role": "user", "content": context + "\n\n" + text}],
                                                temperature=self.temperature, seed=seed_, tag=tag_)
        if self.exchange == "programs":
            requests = [ask(DIRECT.format(k=j + 1, of=n), seed + 1 + j, f"{tag}|p{j}") for j in range(n)]
            sources, ideas_of, first = [f"program {j + 1}" for j in range(n)], [None] * n, []
        else:
            n_ideas = min(self.ideas, n)
            [ideas_reply] = self.client.complete_many([ask(IDEAS.format(n=n_ideas), seed, tag + "|ideas")])
            if ideas_reply.error:
                self._round_failed(view, [ideas_reply])
                return []
            ideas = parse_ideas(ideas_reply.text or "", n_ideas)
            # variation k of idea i is asked for when k * ideas + i < n: every idea once before any twice
            variations = [sum(k * len(ideas) + i < n for k in range(self.per_idea)) for i in range(len(ideas))]
            requests, sources, ideas_of, first = [], [], [], [ideas_reply]
            for i, idea in enumerate(ideas):
                for k in range(variations[i]):
                    requests.append(ask(PROGRAM.format(idea=idea, k=k + 1, of=variations[i]),
                                        seed + 1 + i * self.per_idea + k, f"{tag}|i{i}|s{k}"))
                    sources.append(f"idea {i + 1}, variation {k + 1}")
                    ideas_of.append(idea)
        out = []
        replies = self.client.complete_many(requests)
        for src, idea, reply in zip(sources, ideas_of, replies):
            if reply.error is None and reply.text:
                program = extract_program(reply.text)
                out.append(Proposal(program, src, request=reply.prompt_hash, idea=idea or stated_idea(program)))
        if not out and any(r.error for r in replies):
            self._round_failed(view, [*first, *replies])
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
            self.client.log_event("outcome", request=p.request, round=o.round, source=o.source, idea=o.idea,
                                  status=o.status, reason=o.reason, predicted=o.predicted, latency_us=o.latency_us,
                                  program_sha256=hashlib.sha256(o.program.encode()).hexdigest()[:16])


def make_llm_proposer(run, target_facts: dict, seed: int, llm: str, llm_model: str | None, concurrency: int,
                      ideas: int, programs_per_idea: int, temperature: float, price_in: float, price_out: float,
                      wait: bool, timeout_s: float, exchange: str, client=None):
    """Options: options.LLMOptions (their defaults are there)."""
    client = client or make_client(llm, llm_model, run.transcript if run else None, concurrency=concurrency,
                                   timeout_s=timeout_s, price_in=price_in, price_out=price_out, wait=wait)
    factory = lambda task: LLMProposer(client, ideas, programs_per_idea, temperature, seed, exchange)
    factory.client = client
    return factory


def make_llm_strategy(target, seed: int = 0, run=None, **options):
    """-> factory `task -> ProposalSearch`, with `.stats()`: round timings and LLM usage for results.json."""
    from ..target import facts

    target_facts = facts(target)
    proposer_for = make_llm_proposer(run=run, target_facts=target_facts, seed=seed, **options)
    return search_factory("llm", proposer_for, target_facts, seed, proposer_for.client, run=run, remeasure_best=True)
