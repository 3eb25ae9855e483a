"""The run directory: the only thing `report`, `compare`, `export` and resume read.

    <run>/results.json        summary (schema below, versioned)
    <run>/trials.jsonl        one line per hardware measurement, in order: the convergence data
    <run>/database/           MetaSchedule JSON database (workloads + tuning records): resume
    <run>/model.onnx(.data)   the exported workload
    <run>/module.so           the tuned, compiled Relax module (export_library)
    <run>/tune.log            MetaSchedule's own logs
    <run>/transcript.jsonl    LLM requests/responses and what became of each program (llm only)
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

SCHEMA = 1


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
    def config(self) -> Path: return self.root / "run.json"

    def create(self) -> "RunDir":
        self.database.mkdir(parents=True, exist_ok=True)
        return self

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

    def read_results(self) -> dict:
        data = json.loads(self.results.read_text())
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{self.results}: schema {data.get('schema')}, this schedsearch reads {SCHEMA}")
        return data


def write_json(path: Path, data: dict) -> None:
    """Atomic write: a crash never leaves half a results file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
