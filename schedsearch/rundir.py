"""The run directory: the only thing `report`, `compare`, `export` and resume read.

    <run>/results.json        summary (Results below, versioned)
    <run>/trials.jsonl        one line per hardware measurement, in order: the convergence data
    <run>/database/           MetaSchedule JSON database (workloads + tuning records): resume
    <run>/model.onnx(.data)   the exported workload
    <run>/module.so           the tuned, compiled Relax module (export_library)
    <run>/tune.log            MetaSchedule's own logs
    <run>/transcript.jsonl    LLM requests/responses and what became of each program (llm only)
    <run>/proposals.jsonl     proposal strategies' history: each program's round, status, latency (resume)
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from .errors import DamagedFile, UserError

# results.json's layout. 3: shared_memory_per_block on CUDA, search.library for rules and hybrid, and timing
# of a module run on an RPC worker (timing.method says so; no torch_eager) (2026-12-01 on);
# 2: cost_model and module recorded (2026-11-29 on);
# 1: what runs wrote before, with or without those two (docs/reports/nvidia-h200's runs have neither).
SCHEMA = 3
READS = (1, 2, 3)
WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"


OMITTED_WHEN_NONE = ("shared_memory_per_block", "strategy_options", "search")


@dataclass(frozen=True, kw_only=True)
class Results:
    """results.json: what tune measured and validated (written by tune, read by report, compare, export)."""
    schema: int = SCHEMA
    workload: dict  # name, path, sha256, weights_sha256, size, inputs [{name, shape, dtype}]
    strategy: str
    seed: int
    trials_per_task: int
    runner: str  # --runner
    target: str  # the TVM target, as str(target)
    device: dict  # target.facts()
    versions: dict  # python, tvm, torch, ...
    # CUDA: what VerifyGPUCode allowed in the search (--shared-memory; kernels over 48 KB use dynamic shared
    # memory); None: a CPU target, or not recorded
    shared_memory_per_block: int | None = None
    command: list[str]
    cost_model: dict | None = None  # cost_models.Start.record(); None: schema 1, not recorded
    tasks: list[dict]  # tune.task_summary() of each task
    validation: dict  # validate.summary()
    checks: list[dict]  # each validation check
    timing: dict  # evaluate.time_against_eager(), or evaluate.evaluate_on_worker()'s
    module: dict | None = None  # file_identity() of the module.so validated; None: schema 1, not recorded
    tuning_wall_s: float  # over every invocation, when resumed
    total_wall_s: float  # this invocation, plus earlier ones' search
    strategy_options: dict | None = None  # as the strategy got them, for those that take any
    search: dict | None = None  # the strategy's own statistics (its factory's stats())

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items()
                if v is not None or k not in OMITTED_WHEN_NONE}  # absent rather than null, as before

    @classmethod
    def from_json(cls, data: dict, path: Path) -> "Results":
        if data.get("schema") not in READS:
            raise UserError(f"{path}: schema {data.get('schema')}, this schedsearch reads {', '.join(map(str, READS))}")
        names = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING)
        if missing:
            raise DamagedFile(path, f"{path} lacks {', '.join(missing)}: run the same tune (or compare) command "
                              "again to rebuild it from the database; no trial is measured again")
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def results(self) -> Path: return self.root / "results.json"
    @property
    def trials(self) -> Path: return self.root / "trials.jsonl"
    @property
    def database(self) -> Path: return self.root / "database"
    @property
    def onnx(self) -> Path: return self.root / "model.onnx"
    @property
    def module(self) -> Path: return self.root / "module.so"
    @property
    def log(self) -> Path: return self.root / "tune.log"
    @property
    def transcript(self) -> Path: return self.root / "transcript.jsonl"
    @property
    def proposals(self) -> Path: return self.root / "proposals.jsonl"
    @property
    def config(self) -> Path: return self.root / "run.json"

    @property
    def lock_file(self) -> Path: return self.root / ".lock"

    def create(self) -> "RunDir":
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"-o {self.root}: exists and is not a directory: choose another -o")
        self.database.mkdir(parents=True, exist_ok=True)
        return self

    @contextlib.contextmanager
    def locked(self):
        """Held while a process tunes into this run dir: a second one is refused, naming the first. The
        lock (flock) goes with the process, however it ends; the pid in the file is only for the message."""
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise UserError(f"{self.root} is in use by another schedsearch process (pid {pid}): wait for it "
                                "to end, or choose another -o") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    def read_trials(self) -> list[dict]:
        if not self.trials.exists():
            return []
        out = []
        for line in self.trials.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by Ctrl-C / a crash: the record is in the DB anyway
                continue
        return out

    def read_results(self) -> Results:
        """results.json; UserError naming it when it is damaged (tune rebuilds it from the database and
        trials.jsonl: the same command again, no trial measured twice)."""
        try:
            data = json.loads(self.results.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedFile(self.results, f"{self.results} is damaged ({str(e)[:120]}): run the same tune (or "
                              "compare) command again to rebuild it from the database; no trial is measured again") from None
        return Results.from_json(data, self.results)

    def write_results(self, results: Results) -> None:
        write_json(self.results, results.to_json())


def open_database(directory: Path):
    """MetaSchedule's JSONDatabase on `directory`, repaired first where that needs no guess (repair_database);
    a database TVM still cannot read is refused with one line, not TVM's C++ traceback."""
    from tvm.s_tir import meta_schedule as ms

    repair_database(directory)
    try:
        return ms.database.JSONDatabase(work_dir=str(directory))
    except Exception as e:  # noqa: BLE001  TVM's parser: the last line says what
        lines = [l for l in str(e).strip().splitlines() if l.strip()]
        raise UserError(f"{directory}: MetaSchedule cannot read this database ({lines[-1][:200] if lines else e}): "
                        "move it aside to start the search over") from None


def repair_database(directory: Path) -> None:
    """What a kill during MetaSchedule's append leaves (a cut last line) is dropped, with a warning naming
    how many records were kept; damage anywhere else is refused with one line (UserError): the records
    cannot be matched to kernels or told apart from garbage without guessing."""
    workloads_path, records_path = directory / WORKLOADS, directory / RECORDS
    workloads = _json_lines(workloads_path, "workload")
    records = _json_lines(records_path, "record")
    if records and not workloads_path.is_file():
        raise UserError(f"{workloads_path} is missing, but {records_path.name} holds {len(records)} records that name "
                        "their kernels by line in it: restore it, or move the database aside to start over")
    for i, rec in enumerate(records):
        ok = isinstance(rec, list) and len(rec) == 2 and isinstance(rec[0], int)
        if not ok or not 0 <= rec[0] < len(workloads):
            raise UserError(f"{records_path}: record {i + 1} names no kernel of {workloads_path.name} "
                            f"({len(workloads)} there): restore that file, or move the database aside to start over")


def _json_lines(path: Path, what: str) -> list:
    """The JSON values of a JSON-lines file ([] if it is missing). A cut last line is removed from the file
    (rewritten atomically) with a warning; a damaged line elsewhere is a UserError."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    values, bad = [], []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except (ValueError, UnicodeDecodeError):
            bad.append(i)
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    if bad and bad != [last]:
        raise UserError(f"{path}: line {bad[0] + 1} of {last + 1} is damaged, not just a cut last line: restore the "
                        "file, or move the database aside to start over")
    if bad or (raw and not raw.endswith(b"\n")):
        kept = [line for i, line in enumerate(lines) if line.strip() and i not in bad]
        write_bytes(path, b"".join(line + b"\n" for line in kept))
        if bad:
            print(f"schedsearch: warning: {path} ended in a cut line (a process stopped while writing it): "
                  f"dropped it, kept {len(kept)} {what}s", file=sys.stderr)
    return values


def write_json(path: Path, data: dict) -> None:
    """Atomic write: a crash never leaves half a results file."""
    write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode())


def write_bytes(path: Path, data: bytes) -> None:
    """Atomic write (a temporary file beside it, then a rename): a kill or a full disk never leaves half a file;
    on a full disk the old file stays and the temporary one is removed."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def drop_cut_tail(path: Path) -> None:
    """Cut off a last line without its newline (a kill or a full disk while it was appended), so the next
    append starts a line of its own instead of gluing a whole record to a broken one."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            step = min(pos, 1 << 16)
            f.seek(pos - step)
            chunk = f.read(step)
            if pos == end and chunk.endswith(b"\n"):
                return
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                f.truncate(pos - step + newline + 1)
                return
            pos -= step
        f.truncate(0)


def append_line(path: Path, line: str) -> None:
    """Append one line whole: one write() of the line with its newline (O_APPEND). If the disk fills, the
    part that was written is cut off again, so the file always ends with a whole line."""
    data = (line.rstrip("\n") + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def file_identity(path: Path) -> dict:
    """Size and sha256 of a file: what export and load check a module against before trusting it."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}
