import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fake_openai


# What makes a test slow (`-m "not slow"` leaves them out): a real tune or comparison, with TVM's
# build and run workers, tens of seconds to minutes each on the 2-core box. Tests that take one of these
# fixtures are marked by it; tests that tune themselves carry @pytest.mark.slow.
TUNING_FIXTURES = {"softmax_run", "softmax_dist", "cmp_dir", "trained", "base_run", "base_dist"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TUNING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def softmax_run(tmp_path_factory):
    """One real tune, shared by every file that reads a finished run (test_pipeline, test_export,
    test_cost_models): softmax small on LLVM, 4 trials, 1 validation seed, 2 timed calls. Read it only;
    copy it to change it."""
    from schedsearch.cli import main
    from schedsearch.rundir import RunDir

    out = tmp_path_factory.mktemp("runs") / "softmax"
    assert main(["tune", str(ROOT / "workloads/level1/softmax.py"), "--size", "small", "--trials", "4", "-o", str(out),
                 "--target", "llvm", "--validation-seeds", "1", "--repeats", "2"]) == 0
    return RunDir(out)


@pytest.fixture
def write_problem(tmp_path):
    """Writes a KernelBench-format file and returns its path."""
    def write(body: str, name: str = "problem.py") -> Path:
        path = tmp_path / name
        path.write_text("import torch\nimport torch.nn as nn\n" + body)
        return path
    return write
