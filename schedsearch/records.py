"""Load a MetaSchedule JSON database without TVM's loader, which can corrupt memory.

TVM 0.27's `JSONDatabase(work_dir=...)` rebuilds every record by re-applying its trace to the record's
workload module, in parallel threads (one per hardware thread), all on the SAME module object. And
re-applying a trace can change that module in place: `ScheduleState::Replace` copies a statement on
write only if it, or an ancestor that has an sref (a loop or block), is shared; a SeqStmt between
two loops has no sref, so once an instruction has replaced the root block (`Annotate` on it, as the
LLM's programs do first), the root's new copy still shares its SeqStmt with the original module,
and a later `Split` of a loop below that SeqStmt rewrites the original's loop in place.
Measured on the H200 layernorm database (/work/shared/llm-transcripts/h200/layernorm, 12 records):
re-applying records 0 and 9 alone changes the workload they are applied to (records 2 and 5 do not);
any database holding two records like them of one workload fails to load on the 2-core CPU box
("old_outputs.size() == new_outputs.size() (4 vs. 6)": the second trace met the loops the first one
made), or aborts ("Cannot find type info for type_index=..."); on the 16 threads of the H200 it is
the heap corruption `build` died of. MetaSchedule's own traces (schedules/nvidia-h100, 400 records)
change nothing.

TVM's `Database.query_schedule` (what MetaScheduleApplyDatabase calls at compile time) has the same
side effect: it applies the best record's trace to the record's own workload module, so a database
queried once no longer holds the module its records were tuned on (measured: the H200 layernorm
database's workload changed after one query).

Here each record's trace is re-applied to its own copy of its workload, one at a time, and the
record is then attached to one clean, never-scheduled copy; queries apply the trace to a fresh copy.
The traces are the same, only TVM's side effect is gone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms

from .errors import UserError

WORKLOADS, RECORDS = "database_workload.json", "database_tuning_record.json"


def load(db_dir: str | Path, skip_bad: bool = False):
    """The records of the JSON database in `db_dir`, in memory (query it like TVM's databases).

    A record whose trace does not re-apply to its workload is refused (UserError, one line), or with
    `skip_bad` left out with that line on stderr (training a cost model needs the others, not that one)."""
    db_dir = Path(db_dir)
    workload_lines = _lines(db_dir / WORKLOADS)
    database = RecordDatabase()
    clean = {}  # workload line -> the Workload committed to `database`, never scheduled
    for number, line in enumerate(_lines(db_dir / RECORDS), 1):
        where = f"{db_dir / RECORDS} line {number}"
        try:
            index, record_json = json.loads(line)
            workload_json = json.loads(workload_lines[int(index)])
        except (ValueError, TypeError, IndexError) as e:
            raise UserError(f"{where}: not a tuning record of this database ({e})") from e
        try:
            own = ms.database.Workload.from_json(workload_json)  # a fresh module for the trace to change
            record = ms.database.TuningRecord.from_json(record_json, own)  # re-applies the trace
        except Exception as e:  # TVM raises RuntimeError, ValueError, TypeError, ScheduleError...
            if skip_bad:
                print(f"{where}: left out, its schedule does not re-apply to its workload ({_last_line(e)})",
                      file=sys.stderr)
                continue
            raise UserError(f"{where}: its schedule does not re-apply to its workload "
                            f"({_last_line(e)}); remove that line to build from the others") from e
        if index not in clean:
            clean[index] = database.commit_workload(ms.database.Workload.from_json(workload_json).mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            record.trace, clean[index], record.run_secs, record.target, record.args_info))
    return database


def _copy(mod):
    return tvm.ir.load_json(tvm.ir.save_json(mod))


@derived_object
class RecordDatabase(ms.database.PyDatabase):
    """A MemoryDatabase whose queries schedule a copy of the workload, never the workload itself."""

    def __init__(self):
        super().__init__()
        self.inner = ms.database.MemoryDatabase()

    def has_workload(self, mod):
        return self.inner.has_workload(mod)

    def commit_workload(self, mod):
        return self.inner.commit_workload(mod)

    def commit_tuning_record(self, record):
        self.inner.commit_tuning_record(record)

    def get_top_k(self, workload, top_k):
        return self.inner.get_top_k(workload, top_k)

    def get_all_tuning_records(self):
        return self.inner.get_all_tuning_records()

    def query_tuning_record(self, mod, target, workload_name=None):
        return self.inner.query_tuning_record(mod, target, workload_name)

    def query_schedule(self, mod, target, workload_name=None):
        record = self.inner.query_tuning_record(mod, target, workload_name)
        if record is None:
            return None
        sch = tvm.s_tir.Schedule(_copy(record.workload.mod), debug_mask=0, error_render_level="detail")
        record.trace.apply_to_schedule(sch, remove_postproc=False)
        return sch

    def query_ir_module(self, mod, target, workload_name=None):
        sch = self.query_schedule(mod, target, workload_name)
        return None if sch is None else sch.mod

    def __len__(self):
        return len(self.inner)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path.parent}: no MetaSchedule database ({path.name} is missing)")
    return [line for line in path.read_text().splitlines() if line.strip()]


def _last_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:300]
