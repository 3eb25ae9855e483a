"""Faults (issues 21 and 23), each on a real run directory with real processes: damaged or missing files,
kill -9 and Ctrl-C (signals to the process group, as a terminal sends them) at measured moments, two tunes
on one run dir, a full disk (a small tmpfs; needs root), a cut module.so. Each ends in one line and exit 2
(130 for Ctrl-C), with no traceback, no measured record lost and no process left behind."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import ROOT

SOFTMAX = str(ROOT / "workloads/level1/softmax.py")
BASE_TRIALS = 2


def schedsearch(*argv, timeout=600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "schedsearch", *map(str, argv)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)}, **kwargs)


def start(*argv, log: Path) -> subprocess.Popen:
    """A schedsearch process in a process group of its own (as a terminal's foreground job), output to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "schedsearch", *map(str, argv)], cwd=ROOT, stdout=f,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                start_new_session=True)


def tune_args(run: Path, trials: int = BASE_TRIALS) -> list:
    return ["tune", SOFTMAX, "--size", "small", "--target", "llvm", "--validation-seeds", "1", "--repeats", "2",
            "--trials", trials, "-o", run]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, exactly one `schedsearch: error:` line, containing each needle; returns it."""
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("schedsearch: error:")]
    assert proc.returncode == 2 and len(errors) == 1, (proc.returncode, proc.stderr)
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def records(run: Path) -> list[str]:
    """The database's tuning records, whole lines only."""
    path = run / "database" / "database_tuning_record.json"
    out = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            json.loads(line)
            out.append(line)
        except ValueError:
            pass
    return out


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """One small real tune, made once; each test works on a copy."""
    run = tmp_path_factory.mktemp("base") / "softmax"
    proc = schedsearch(*tune_args(run))
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


# ---------------------------------------------------------------- damaged files (issue 21)

def test_a_cut_last_record_is_dropped_and_the_run_resumes(run):
    path = run / "database" / "database_tuning_record.json"
    whole = records(run)
    text = path.read_text()
    path.write_text(text[:len(text) - len(whole[-1]) // 2 - 1])  # the last line cut in half: a kill mid-append
    proc = schedsearch(*tune_args(run))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert f"dropped it, kept {len(whole) - 1} records" in proc.stderr
    assert set(whole[:-1]) <= set(records(run))
    assert json.loads((run / "results.json").read_text())["validation"]["passed"]


def test_a_record_damaged_mid_file_is_refused_and_kept(run):
    path = run / "database" / "database_tuning_record.json"
    lines = path.read_text().splitlines(keepends=True)
    lines[0] = lines[0][:40] + "\n"
    path.write_text("".join(lines))
    before = path.read_bytes()
    assert_one_line_error(schedsearch(*tune_args(run)), "line 1 of", "is damaged")
    assert path.read_bytes() == before


def test_a_deleted_workload_file_is_refused_and_the_records_kept(run):
    (run / "database" / "database_workload.json").unlink()
    before = records(run)
    assert_one_line_error(schedsearch(*tune_args(run)), "database_workload.json is missing", f"{len(before)} records")
    assert records(run) == before


def test_damaged_results_json_is_named_by_report_and_export(run, tmp_path):
    results = json.loads((run / "results.json").read_text())
    cmp = tmp_path / "cmp"
    shutil.copytree(run, cmp / "softmax" / "ansor-s0")
    (cmp / "compare.json").write_text(json.dumps({
        "schema": 1, "command": ["compare"], "commands": [["compare"]], "strategies": ["ansor"], "seeds": [0],
        "trials_per_task": BASE_TRIALS, "size": "small", "target": results["target"],
        "workloads": [{"name": "softmax", "path": SOFTMAX}], "validation_seeds": 1, "repeats": 2,
        "compile_baselines": False, "peaks": {}, "llm": {}, "arms_from": None, "parallel": 1}))
    assert schedsearch("report", cmp).returncode == 0
    for arm in (run, cmp / "softmax" / "ansor-s0"):
        (arm / "results.json").write_text('{"schema": 1, "tasks": [')  # cut by a kill
    assert_one_line_error(schedsearch("report", cmp), "results.json is damaged", "run the same")
    assert_one_line_error(schedsearch("export", run, "-o", tmp_path / "dist"), "results.json is damaged")
    assert not (tmp_path / "dist").exists()


def test_output_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("mine")
    assert_one_line_error(schedsearch(*tune_args(tmp_path / "file")), "is not a directory")
    assert (tmp_path / "file").read_text() == "mine"


@pytest.fixture
def small_fs(tmp_path):
    """A 3 MB tmpfs at tmp_path/fs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    fs = tmp_path / "fs"
    fs.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(fs)]).returncode != 0:
        pytest.skip("mount -t tmpfs failed (no CAP_SYS_ADMIN in this container?)")
    yield fs
    subprocess.run(["umount", "-l", str(fs)])


def test_a_read_only_run_dir_is_one_line(run, small_fs):
    shutil.copytree(run, small_fs / "run")
    before = records(small_fs / "run")
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)]).returncode == 0
    assert_one_line_error(schedsearch(*tune_args(small_fs / "run", BASE_TRIALS + 2)), "Read-only file system")
    assert records(small_fs / "run") == before
