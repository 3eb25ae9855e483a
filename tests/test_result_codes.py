"""What a MetaSchedule result says beyond a measurement: written and read in result_codes.py alone."""
import io
import tokenize

from conftest import ROOT
from schedsearch.result_codes import (LOST_WORKER, WORKER_KILLED, capped, deferred, deferred_token, is_capped,
                                      lost_worker, worker_killed)


def test_each_code_reads_back_what_was_written():
    assert deferred_token(deferred(7, "still building 12 s into its round")) == 7
    assert deferred_token("build failed: deferred #7: not ours") is None and deferred_token(None) is None
    assert is_capped(capped(0.5)) and not is_capped([0.5, 0.5])
    assert worker_killed(f"build failed: {WORKER_KILLED}")
    assert not worker_killed("build failed: x") and not worker_killed(None)
    assert lost_worker("... Connection reset by peer") and not lost_worker("CUDA error") and not lost_worker(None)


def code(path) -> str:
    """The file less its comments (which may name the messages they explain)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    return " ".join(t.string for t in tokens if t.type != tokenize.COMMENT)


def test_no_other_module_spells_them():
    spelled = ["deferred #", "len ( run_secs ) == 1", WORKER_KILLED, *LOST_WORKER]
    found = [(p.name, s) for p in sorted((ROOT / "schedsearch").rglob("*.py")) if p.name != "result_codes.py"
             for s in spelled if s in code(p)]
    assert found == []
