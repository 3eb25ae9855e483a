"""The program library: measured schedule programs of earlier runs, kept by kernel structure, so that a new
task of the same structure starts from them (`--library`, strategies `rules` and `hybrid`).

    schedsearch library build RUN_DIRS|DATABASES... -o schedules/library/cuda.json

A kernel's structure (`structure_key`) is its blocks in order, each with its name, its iterators' kinds
(S spatial, R reduction) and its buffer accesses with the iterators renumbered and every size and
constant left out: the layernorm of any shape has one key, a matmul of any M, N, K another. Block names
are part of it because programs name blocks. A task gets the programs of its structure, then those of its
structure less some fused elementwise blocks (`Library.for_task`). A program is fitted to the task's
extents by `retarget`: its tile decisions kept where they fit, the others replayed by TVM or drawn again,
and a literal split whose product is not the new extent gets one factor left to TVM (None), one that
makes no thread or vector loop where there is one. The result is checked and measured like any proposal.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import tvm

from . import schedule_lang
from .errors import UserError
from .options import LIBRARY
from .rundir import RunDir
from .schedule_lang import ScheduleLangError

ROOT = Path(__file__).resolve().parent.parent / "schedules" / "library"
FORMAT = 1
PER_ENTRY = 4  # proposals made of one program: its tiles as recorded, then those that do not fit drawn again
_CONSTANT = re.compile(r"T\.\w+\((-?[\d.e+]+)\)|(?<![\w.])-?\d+(\.\d+)?(e[+-]?\d+)?(?![\w.])")


@dataclass(frozen=True)
class Entry:
    key: str
    target: str  # target kind: cuda | llvm
    program: str  # the schedule program before post-processing, as measured
    latency_us: float
    task: str
    workload: str
    shape: str  # the task's buffer shapes, e.g. "4096x4096 4096x4096 -> 4096x4096"
    device: str
    source: str  # where it was measured: the database, its record, and the LLM idea where known


def structure_key(mod: tvm.IRModule) -> str:
    """The kernel's structure without its sizes, one line per block:
    `ln_stats SRRR b0[v0,v1,v2,v3] b1[v0] -> b2[v0] b3[v0]`, buffers numbered in order of use, with dtypes."""
    sch = tvm.s_tir.Schedule(mod)
    buffers: dict[str, str] = {}
    lines = []
    for rv in sch.get_child_blocks(sch.get_sblock("root")):
        block = sch.get(rv)
        names = {iv.var.name: f"v{i}" for i, iv in enumerate(block.iter_vars)}
        kinds = "".join({0: "S", 2: "R"}.get(int(iv.iter_type), "O") for iv in block.iter_vars)

        def access(region) -> str:
            buf = region.source
            if buf.name not in buffers:
                buffers[buf.name] = f"b{len(buffers)}:{buf.dtype}"
            index = ",".join(_CONSTANT.sub("c", str(r.min)) for r in region.region)
            for name, short in sorted(names.items(), key=lambda kv: -len(kv[0])):
                index = re.sub(rf"\b{re.escape(name)}\b", short, index)
            return f"{buffers[buf.name]}[{index}]"

        reads = " ".join(access(r) for r in block.reads)
        writes = " ".join(access(w) for w in block.writes)
        lines.append(f"{block.name_hint} {kinds} {reads} -> {writes}")
    return "\n".join(lines)


def _extra_blocks(program_blocks: list[str], task_blocks: list[str]) -> int | None:
    """How many blocks the task has beyond the program's, where the program's blocks are the task's in order
    and every other block of the task is elementwise (all its iterators spatial); else None. A program
    leaves such blocks to the post-processors (RewriteUnboundBlock binds them on CUDA): on the H200 conv2d
    programs so fitted the conv2d + bias + ReLU kernel, and the matmul programs the matmul + bias + GELU one."""
    i = 0
    for line in task_blocks:
        if i < len(program_blocks) and line == program_blocks[i]:
            i += 1
        elif set(line.split()[1]) != {"S"}:
            return None
    return len(task_blocks) - len(program_blocks) if i == len(program_blocks) else None


def shapes(mod: tvm.IRModule) -> str:
    from tvm.s_tir import meta_schedule as ms

    dims = ["x".join(str(int(d)) for d in a.shape) for a in ms.arg_info.ArgInfo.from_prim_func(mod["main"])]
    return " ".join(dims[:-1]) + " -> " + dims[-1]


# ---- retargeting -------------------------------------------------------------------------------------------

def _tile_decisions(program: schedule_lang.Program) -> list:
    """Each sample_perfect_tile statement's decision (None where it has none), in order."""
    out = []
    for st in program.statements:
        if st.primitive == "sample_perfect_tile":
            decision = dict(st.kwargs).get("decision")
            out.append(list(decision.items) if isinstance(decision, schedule_lang.Seq) else None)
    return out


def _trace_tile_decisions(trace) -> list[list[int]]:
    return [[int(d) for d in trace.decisions[inst]] for inst in trace.insts if inst.kind.name == "SamplePerfectTile"]


def _without_tile_decisions(program: schedule_lang.Program, which: set[int]) -> schedule_lang.Program:
    """The program with the decisions of its sample_perfect_tile statements numbered in `which` dropped."""
    out, k = [], 0
    for st in program.statements:
        if st.primitive == "sample_perfect_tile":
            if k in which:
                st = dataclasses.replace(st, kwargs=tuple((n, v) for n, v in st.kwargs if n != "decision"))
            k += 1
        out.append(st)
    return schedule_lang.Program(tuple(out))


def _free_one_factor(program: schedule_lang.Program, line: int) -> schedule_lang.Program | None:
    """The program with one literal factor of the split at `line` replaced by None (TVM infers it, with a
    predicate where the extent does not divide); None if that statement is no such split."""
    statements = list(program.statements)
    i = next((i for i, st in enumerate(statements) if st.line == line), None)
    if i is None or statements[i].primitive != "split":
        return None
    st = statements[i]
    kwargs = dict(st.kwargs)
    factors = kwargs.get("factors", st.args[1] if len(st.args) > 1 else None)
    if not isinstance(factors, schedule_lang.Seq) or any(f is None for f in factors.items):
        return None
    # Thread extents and vector widths are the program's choices: free a factor that makes neither.
    keep = schedule_lang.thread_bound_names(program) | schedule_lang.vectorized_names(program)
    ints = [j for j, f in enumerate(factors.items) if type(f) is int]
    if not ints or len(st.targets) != len(factors.items):
        return None
    j = next((j for j in ints if st.targets[j] not in keep), ints[0])
    freed = schedule_lang.Seq(tuple(None if k == j else f for k, f in enumerate(factors.items)), factors.is_tuple)
    if "factors" in kwargs:
        st = dataclasses.replace(st, kwargs=tuple((k, freed if k == "factors" else v) for k, v in st.kwargs))
    else:
        st = dataclasses.replace(st, args=(st.args[0], freed, *st.args[2:]))
    statements[i] = st
    return schedule_lang.Program(tuple(statements))


def _apply_fitting_splits(program: schedule_lang.Program, mod: tvm.IRModule, seed: int):
    """Apply `program` to a copy of `mod`, freeing one factor of each literal split that does not fit.
    -> (the program as it applied, its schedule)."""
    for _ in range(len(program) + 1):
        sch = schedule_lang.fresh_schedule(mod, seed=seed)
        try:
            schedule_lang.apply(program, sch)
            return program, sch
        except ScheduleLangError as e:
            freed = _free_one_factor(program, e.line)
            if freed is None:
                raise
            program = freed
    raise ScheduleLangError(1, "no split left to free")


def retarget(text: str, mod: tvm.IRModule, seed: int, redraw_tiles: bool = False) -> str | None:
    """A library program made to fit `mod`'s extents, literal splits that do not fit freed one factor at a time.
    Its tiles: as recorded where they fit the new extents, TVM 0.27's replay of a decision that does not fit
    elsewhere (deterministic, not a draw: [64, 16, 4] on 128 became [2, 16, 4], [3, 5, 7] [1, 1, 128], past
    max_innermost_factor=64); `redraw_tiles`: those that do not fit drawn again, less thread tiles (None when
    there are none).
    Drawing every tile again instead left 24 of 32 re-targetings of the H200 matmul programs to the same
    4096^3 matmul invalid (VerifyGPUCode: their shared-memory and thread tiles are coupled).
    -> the program as applied, its decisions fixed; raises ScheduleLangError where it does not apply."""
    program = schedule_lang.root_annotations_last(schedule_lang.parse(text))  # see there: TVM 0.27 in place
    program, sch = _apply_fitting_splits(program, mod, seed)
    if redraw_tiles:
        # A tile that makes a threadIdx loop stays TVM's replay: a program's fetch splits are written for its
        # thread extents (schedule_lang._lift). The H200 databases predate that rule in lifting: drawn again,
        # the gemm_bias_gelu re-targetings of all 8 matmul programs' misfit row tiles (24) failed VerifyGPUCode.
        threaded = schedule_lang.thread_bound_names(program)
        tiles = [st for st in program.statements if st.primitive == "sample_perfect_tile"]
        misfit = {k for k, (st, recorded, applied) in enumerate(zip(tiles, _tile_decisions(program),
                                                                     _trace_tile_decisions(sch.trace)))
                  if recorded != applied and not set(st.targets) & threaded}
        if not misfit:
            return None
        program, sch = _apply_fitting_splits(_without_tile_decisions(program, misfit), mod, seed)
    return "\n".join(sch.trace.as_python(remove_postproc=True))


# ---- the library file ---------------------------------------------------------------------------------------

@dataclass
class Library:
    path: str | None  # None: no library
    requested: str  # --library as given: auto | none | PATH
    entries: list[Entry]
    note: str | None = None  # auto: why there is none

    def for_task(self, mod: tvm.IRModule, target_kind: str) -> list[tuple[Entry, int]]:
        """The programs for `mod`'s structure, with how many elementwise blocks its kernel has beyond theirs:
        those of its exact structure first, then those of its kernel less fused elementwise blocks (a
        matmul's for a matmul + bias + GELU), fastest first."""
        lines = structure_key(mod).splitlines()
        found = [(e, extra) for e in self.entries if e.target == target_kind
                 for extra in [_extra_blocks(e.key.splitlines(), lines)] if extra is not None]
        return sorted(found, key=lambda t: (t[1], t[0].latency_us))

    def record(self) -> dict:
        out = {"requested": self.requested, "path": self.path, "entries": len(self.entries)}
        if self.note:
            out["note"] = self.note
        return out


def read(path: Path) -> list[Entry]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--library {path}: cannot read it as a program library ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), list):
        raise UserError(f"--library {path}: not a program library of format {FORMAT} "
                        "(make one with schedsearch library build)")
    fields = {f.name for f in dataclasses.fields(Entry)}
    try:
        return [Entry(**{k: e[k] for k in fields}) for e in data["entries"]]
    except (KeyError, TypeError) as e:
        raise UserError(f"--library {path}: an entry lacks {e}") from None


def load(spec: str | None, target_kind: str) -> Library:
    """--library: none | auto (schedules/library/<target kind>.json where there is one) | PATH."""
    spec = LIBRARY if spec is None else str(spec)
    if spec == "none":
        return Library(None, spec, [])
    if spec == "auto":
        path = ROOT / f"{target_kind}.json"
        if not path.is_file():
            return Library(None, spec, [], note=f"no library for {target_kind} ({path} is not there)")
        return Library(str(path), spec, read(path))
    if not Path(spec).is_file():
        raise UserError(f"--library {spec}: not found (a file from schedsearch library build, auto or none)")
    return Library(spec, spec, read(Path(spec)))


def _transcript_sources(database: Path) -> dict[str, str]:
    """sha256[:16] of each measured program -> the LLM's idea that made it, from transcript.jsonl beside."""
    out = {}
    for transcript in (database / "transcript.jsonl", database.parent / "transcript.jsonl"):
        if transcript.is_file():
            for line in transcript.read_text().splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "outcome" and event.get("status") == "measured":
                    out[event["program_sha256"]] = f"llm {event.get('source', '')[:120]}"
    return out


def _workload_name(database: Path) -> str:
    for run in (RunDir(database), RunDir(database.parent)):
        if run.results.is_file():
            return run.read_results().workload["name"]
    return database.parent.name


def _records(database: Path, workloads: list):
    """The database's records, each re-applied to a module of its own (None where that fails). MetaSchedule's
    JSONDatabase re-applies every record to one module per workload, and TVM 0.27 rewrites that module in
    place for traces that annotate the root block first: the H200 layernorm database of the real model's
    transcript fails to open that way ("old_outputs.size() == new_outputs.size() (4 vs. 6)"), while each of
    its 12 records applies to a fresh copy."""
    from tvm.s_tir import meta_schedule as ms

    for line in (database / "database_tuning_record.json").read_text().splitlines():
        try:
            index, record = json.loads(line)
            yield index, ms.database.TuningRecord.from_json(record, ms.database.Workload.from_json(workloads[index]))
        except Exception:  # noqa: BLE001  a record TVM cannot re-apply (another version, a cut line)
            yield None, None


def build(paths: list[Path], out: Path, per_key: int) -> dict:
    """The library of every measured program in the databases at or under `paths` (run dirs, databases,
    schedules/<gpu>/): per structure and target kind the `per_key` fastest distinct programs."""
    from tvm.s_tir import meta_schedule as ms

    from .cost_models import find_databases, measured_on

    candidates: list[Entry] = []
    skipped = 0  # records outside the language or that do not re-apply
    for database in find_databases(paths):
        device, task_names = measured_on(database, "unknown")
        ideas = _transcript_sources(database)
        workload = _workload_name(database)
        workloads = [json.loads(l) for l in (database / "database_workload.json").read_text().splitlines() if l]
        keys: dict[int, tuple[str, str, str]] = {}  # workload index -> key, task name, shapes
        for i, (index, record) in enumerate(_records(database, workloads)):
            if record is None:
                skipped += 1
                continue
            secs = [float(s) for s in record.run_secs] if record.run_secs else []
            if not secs or min(secs) >= 1e9:
                continue  # failed: no measurement
            program = "\n".join(record.trace.as_python(remove_postproc=True))
            try:
                schedule_lang.parse(program)
            except ScheduleLangError:  # e.g. tensor-core sketches (index maps)
                skipped += 1
                continue
            if index not in keys:  # from a module no record was applied to (see _records)
                mod = ms.database.Workload.from_json(workloads[index]).mod
                # A run whose kernel changed between invocations (the H200 layernorm's) has more workloads than tasks.
                task = (task_names[index] if len(task_names) == len(workloads)
                        else task_names[0] if len(task_names) == 1 else f"task{index}")
                keys[index] = (structure_key(mod), task, shapes(mod))
            key, task, shape = keys[index]
            sha = hashlib.sha256(program.encode()).hexdigest()[:16]
            source = f"{database} record {i + 1}" + (f" ({ideas[sha]})" if sha in ideas else "")
            candidates.append(Entry(key, record.target.kind.name, program, 1e6 * sum(secs) / len(secs), task,
                                    workload, shape, device, source))
    entries, seen = [], set()
    kept: dict[tuple[str, str], int] = {}
    for e in sorted(candidates, key=lambda e: e.latency_us):
        if (e.key, e.target, e.program) in seen or kept.get((e.key, e.target), 0) >= per_key:
            continue
        seen.add((e.key, e.target, e.program))
        kept[(e.key, e.target)] = kept.get((e.key, e.target), 0) + 1
        entries.append(e)
    data = {"format": FORMAT, "tvm": tvm.__version__, "sources": [str(p) for p in paths],
            "entries": [dataclasses.asdict(e) for e in entries]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return {"entries": len(entries), "structures": len(kept), "measured": len(candidates),
            "skipped": skipped}

