"""results.json: one typed, versioned reader and writer (rundir.Results); the committed runs still load."""
import json
import tarfile
from pathlib import Path

import pytest

from conftest import ROOT
from schedsearch.compare import write_report
from schedsearch.errors import DamagedFile, UserError
from schedsearch.rundir import READS, SCHEMA, Results, RunDir

H200 = ROOT / "docs/reports/nvidia-h200"


@pytest.fixture(scope="module")
def h200(tmp_path_factory):
    """The committed H200 comparison: schema 1 results.json of 9 arms written before cost_model and module were,
    the matmul hybrid arm tuned again since, with them; the rules and llm arms added later in this schema."""
    out = tmp_path_factory.mktemp("h200")
    with tarfile.open(H200 / "compare.tar.xz") as tar:
        tar.extractall(out, filter="data")
    return out / "runs/h200"


def test_older_schema_runs_load_and_their_report_rebuilds_unchanged(h200):
    arms = sorted(h200.glob("*/*/results.json"))
    assert len(arms) == 19  # conv2d_relu_maxpool has no llm arm: no transcript (its error.txt says so)
    for path in arms:
        res = RunDir(path.parent).read_results()
        arm = path.parent.relative_to(h200)
        if res.strategy in ("rules", "llm"):
            assert res.schema == SCHEMA and res.module is not None
        else:
            again = arm == Path("matmul/hybrid-s0")
            assert res.schema == 1 and (res.module is None) == (res.cost_model is None) == (not again)
        assert res.strategy in ("hybrid", "ansor", "rules", "llm") and res.tasks and "passed" in res.validation
    write_report(h200)
    assert (h200 / "report.md").read_text() == (H200 / "report.md").read_text()


def test_results_round_trip_in_the_order_tune_wrote_them(h200, tmp_path):
    data = json.loads((h200 / "softmax/hybrid-s0/results.json").read_text())
    data.update(schema=SCHEMA, cost_model={"requested": "none", "start": "none", "path": None},
                module={"bytes": 1, "sha256": "0" * 64})
    order = ["schema", "workload", "strategy", "seed", "trials_per_task", "runner", "target", "device", "versions",
             "command", "cost_model", "tasks", "validation", "checks", "timing", "module", "tuning_wall_s",
             "total_wall_s", "strategy_options", "search"]
    data = {k: data[k] for k in order}
    run = RunDir(tmp_path)
    run.write_results(Results.from_json(data, run.results))
    assert json.loads(run.results.read_text()) == data and list(json.loads(run.results.read_text())) == order
    assert run.read_results().to_json() == data
    ansor = {k: v for k, v in data.items() if k not in ("strategy_options", "search")}
    assert Results.from_json(ansor, run.results).to_json() == ansor  # absent, not null, for strategies without


def test_another_schema_or_a_missing_field_is_refused_in_one_line(h200, tmp_path):
    data = json.loads((h200 / "softmax/ansor-s0/results.json").read_text())
    path = tmp_path / "results.json"
    reads = ", ".join(map(str, READS))
    with pytest.raises(UserError, match=rf"results.json: schema 9, this schedsearch reads {reads}$"):
        Results.from_json({**data, "schema": 9}, path)
    with pytest.raises(DamagedFile, match="results.json lacks timing: run the same tune"):
        Results.from_json({k: v for k, v in data.items() if k != "timing"}, path)
