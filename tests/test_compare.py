"""`schedsearch compare` and `report` on LLVM: two small workloads x (ansor, rules) x 2 seeds, 4 trials per
task, tuned once for the module; the other tests read, resume, copy and re-render that comparison."""
import argparse
import json
import shlex
import shutil
import statistics
import subprocess

import pytest

from conftest import ROOT
from schedsearch import cli as cli_module, target as targets, workload
from schedsearch.baselines import time_baselines
from schedsearch.compare import add_commands, compare
from schedsearch.errors import UserError
from schedsearch.peaks import peak_for, roofline_us
from schedsearch.report import band, fmt_us, task_curve, trials_to_reach, workload_curve
from schedsearch.rundir import Results, RunDir

SOFTMAX, RMSNORM = str(ROOT / "workloads/level1/softmax.py"), str(ROOT / "workloads/level2/rmsnorm.py")
ARGS = [SOFTMAX, RMSNORM, "--size", "small", "--strategies", "ansor,rules", "--trials", "4", "--seeds", "2",
        "--target", "llvm", "--validation-seeds", "1", "--repeats", "3", "--no-compile-baselines"]
ARMS = [f"{w}/{s}-s{k}" for w in ("softmax", "rmsnorm") for s in ("ansor", "rules") for k in (0, 1)]


def cli(argv: list[str]) -> int:
    """Through `schedsearch` itself once cli.py routes compare/report, else through add_commands' parsers."""
    cli_module.parser()  # registers the commands that modules add with add_commands
    if "compare" in cli_module.COMMANDS:
        return cli_module.main(argv)
    parser = argparse.ArgumentParser(prog="schedsearch")
    handlers = add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return handlers[args.command](args)


@pytest.fixture(scope="module")
def cmp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    assert cli(["compare", *ARGS, "-o", str(out)]) == 0
    return out


def user_error(argv: list[str], capfd) -> str:
    """The one-line message of a UserError, raised by the handler or printed by cli.main (exit code 2)."""
    try:
        rc = cli(argv)
    except UserError as e:
        return str(e)
    assert rc == 2
    return capfd.readouterr().err


def snapshot(out, pattern="*/*/trials.jsonl"):
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob(pattern))}


def tables(md: str, part: str, heading: str | None = None) -> list[str]:
    """The markdown tables under `## part` (and `### heading` in it)."""
    text = md.split(f"## {part}\n", 1)[1].split("\n## ", 1)[0]
    if heading:
        text = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    return [t for t in text.split("\n\n") if t.startswith("|")]


def row(text: str, first: str) -> list[str]:
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines()
            if line.startswith(f"| {first} |")]
    assert len(rows) == 1, (first, text)
    return rows[0]


def results(out, arm) -> Results:
    return RunDir(out / arm).read_results()


def test_one_run_dir_per_arm_and_seed_with_baselines(cmp_dir):
    for arm in ARMS:
        res = results(cmp_dir, arm)
        strategy, seed = arm.split("/")[1].split("-s")
        assert res.strategy == strategy and res.seed == int(seed) and res.trials_per_task == 4
        assert res.validation["passed"] and (cmp_dir / arm / "database").is_dir()
        assert all(t["trials"] <= 4 for t in res.tasks) and len(RunDir(cmp_dir / arm).read_trials()) >= 4
    [task] = results(cmp_dir, "softmax/ansor-s0").tasks
    assert task["bytes"] == 2 * 8 * 256 * 4  # an 8x256 fp32 input and output
    base = json.loads((cmp_dir / "softmax/baselines.json").read_text())
    assert base["bytes"] == {"inputs": 8 * 256 * 4, "outputs": 8 * 256 * 4, "weights": 0}
    assert base["baselines"]["eager"]["median_us"] > 0 and set(base["baselines"]) == {"eager"}
    assert base["tf32"] == {"cuda_matmul": False, "cudnn": False}
    exp = json.loads((cmp_dir / "compare.json").read_text())
    assert exp["strategies"] == ["ansor", "rules"] and exp["seeds"] == [0, 1] and exp["trials_per_task"] == 4


def test_report_tables_hold_the_stored_numbers(cmp_dir):
    md = (cmp_dir / "report.md").read_text()
    for name in ("softmax", "rmsnorm"):
        latency, quality, _ = tables(md, "Final results", name)
        eager = json.loads((cmp_dir / name / "baselines.json").read_text())["baselines"]["eager"]["median_us"]
        for strategy in ("ansor", "rules"):
            runs = [results(cmp_dir, f"{name}/{strategy}-s{k}") for k in (0, 1)]
            lat = [r.timing["tvm"]["median_us"] for r in runs]
            cells = row(latency, strategy)
            assert cells[1:4] == ["2/2", fmt_us(statistics.median(lat)), f"{fmt_us(min(lat))} .. {fmt_us(max(lat))}"]
            assert cells[5] == f"{eager / statistics.median(lat):.2f}x" and cells[6] == "-"  # no torch.compile run
            cells = row(quality, strategy)
            assert cells[1] == "8/8 checks passed (1 seed x 4 distributions per run)"
            assert cells[2] == f"{max(r.validation['max_abs'] for r in runs):.2e}"
            assert cells[5].startswith(f"{statistics.median(r.tuning_wall_s for r in runs):,.0f} s (")
        assert row(latency, "PyTorch eager")[2] == fmt_us(eager)
    task_table = tables(md, "Final results", "softmax")[2]
    assert row(task_table, "softmax")[2:6] == ["8.19 kFLOP", "16.4 kB", "0.50", "-"]  # no roofline on this CPU

    [efficiency] = tables(md, "Sample efficiency")
    finals = [min(r["latency_us"] for r in RunDir(cmp_dir / f"softmax/ansor-s{k}").read_trials() if r["latency_us"])
              for k in (0, 1)]
    assert row(efficiency, "softmax | all tasks | ansor")[3] == fmt_us(max(finals))  # upper median of 2 seeds

    env = md.split("## Environment", 1)[1]
    import torch
    import tvm
    assert f"| torch | {torch.__version__} |" in env and f"| tvm | {tvm.__version__} |" in env
    command = json.loads((cmp_dir / "compare.json").read_text())["command"]
    assert "TF32 off in PyTorch" in env and f"```\n{shlex.join(command)}\n```" in env
    notes = md.split("## Notes", 1)[1]
    assert "rules is a rule-based proposer with no language model" in notes and "LLM arm" not in notes


def test_report_rebuilds_identically_from_stored_results(cmp_dir, monkeypatch):
    import schedsearch.tune

    monkeypatch.setattr(schedsearch.tune, "tune_workload", lambda *a, **k: pytest.fail("report must not tune"))
    before = snapshot(cmp_dir, "report.*") | snapshot(cmp_dir, "plots/*.png")
    assert len([k for k in before if k.endswith(".png")]) == 4  # softmax; rmsnorm and its 2 tasks
    (cmp_dir / "report.md").unlink()
    assert cli(["report", str(cmp_dir)]) == 0
    assert snapshot(cmp_dir, "report.*") | snapshot(cmp_dir, "plots/*.png") == before


def test_rerun_skips_finished_arms_and_resumes_an_interrupted_one(cmp_dir, capfd):
    trials, baselines = snapshot(cmp_dir), snapshot(cmp_dir, "*/baselines.json")
    finished = snapshot(cmp_dir, "*/*/results.json")
    (cmp_dir / "rmsnorm/rules-s1/results.json").unlink()  # as if killed between tuning and timing
    assert cli(["compare", *ARGS, "-o", str(cmp_dir)]) == 0
    err = capfd.readouterr().err
    assert err.count("finished earlier, skipped") == 7 and "rmsnorm/rules-s1: tuning with rules" in err
    assert snapshot(cmp_dir) == trials and snapshot(cmp_dir, "*/baselines.json") == baselines
    now = snapshot(cmp_dir, "*/*/results.json")
    resumed = "rmsnorm/rules-s1/results.json"
    assert {k: v for k, v in now.items() if k != resumed} == {k: v for k, v in finished.items() if k != resumed}
    assert json.loads(now[resumed])["trials_per_task"] == 4


def test_a_smaller_budget_into_the_same_dir_is_refused(cmp_dir, capfd):
    before = snapshot(cmp_dir, "compare.json")
    args = [a if a != "4" else "3" for a in ARGS]
    assert "already spent 4 trials per task, more than --trials 3" in user_error(["compare", *args, "-o", str(cmp_dir)], capfd)
    assert snapshot(cmp_dir, "compare.json") == before  # refused before writing anything


def test_arms_from_copies_finished_arms(cmp_dir, tmp_path, capfd):
    out = tmp_path / "again"
    assert cli(["compare", *ARGS, "-o", str(out), "--arms-from", str(cmp_dir)]) == 0
    assert "tuning with" not in capfd.readouterr().err
    assert snapshot(out) == snapshot(cmp_dir)
    assert json.loads((out / "softmax/ansor-s0/reused.json").read_text())["from"] == str((cmp_dir / "softmax/ansor-s0").resolve())
    assert "was tuned and timed in an earlier comparison" in (out / "report.md").read_text()


def test_notes_flag_invalid_seeds_and_replayed_llm_numbers(cmp_dir, tmp_path):
    """Edit stored results (no tuning): a seed that failed validation, and an llm arm answered by replay."""
    out = tmp_path / "edited"
    shutil.copytree(cmp_dir, out)
    exp = json.loads((out / "compare.json").read_text())
    exp["strategies"].append("llm")
    (out / "compare.json").write_text(json.dumps(exp))
    for name in ("softmax", "rmsnorm"):
        for k in (0, 1):
            shutil.copytree(out / f"{name}/rules-s{k}", out / f"{name}/llm-s{k}")
            path = out / f"{name}/llm-s{k}/results.json"
            res = json.loads(path.read_text())
            res["strategy"] = "llm"
            res["search"]["llm"] = {"backend": "replay", "model": "m-1", "requests": 3, "prompt_tokens": 1000,
                                    "completion_tokens": 200, "tokens_estimated": False, "cost_usd": 0.25}
            path.write_text(json.dumps(res))
    bad = out / "softmax/ansor-s1/results.json"
    res = json.loads(bad.read_text())
    res["validation"].update(passed=False, failed=1, failures=[{"problem": "output 0: 3 of 2048 values outside"}])
    bad.write_text(json.dumps(res))

    assert cli(["report", str(out), "--peak-tflops", "1", "--peak-gbs", "50"]) == 0
    md = (out / "report.md").read_text()
    assert "| roofline peaks | 1 TFLOP/s fp32, 50 GB/s: given on the command line" in md
    notes = md.split("## Notes", 1)[1]
    assert "softmax: ansor seed 1 FAILED validation (1 of 4 checks: output 0: 3 of 2048 values outside)" in notes
    assert "LLM arm (model m-1) came from the replay backend" in notes and "no model was queried" in notes
    latency, quality, _ = tables(md, "Final results", "softmax")
    only = results(cmp_dir, "softmax/ansor-s0").timing["tvm"]["median_us"]
    assert row(latency, "ansor")[1:3] == ["1/2", fmt_us(only)]  # the invalid seed's latency is left out
    bound_us = max(8192 / 1e12, 2 * 8192 / 50e9) * 1e6  # softmax small: memory bound at 50 GB/s
    assert row(latency, "ansor")[-1] == f"{100 * bound_us / only:.2g}%"
    assert row(quality, "llm")[-3:] == ["6", "2,000 / 400", "$0.5000"]


def test_peaks_and_roofline():
    h100 = peak_for("NVIDIA H100 80GB HBM3")
    assert (h100["tflops"], h100["gbs"]) == (67.0, 3350.0) and "datasheet" in h100["source"]
    assert peak_for("NVIDIA H100 PCIe")["tflops"] == 51.0 and peak_for("NVIDIA H200")["gbs"] == 4800.0
    assert peak_for("NVIDIA A100-SXM4-80GB")["gbs"] == 2039.0 and peak_for("NVIDIA GH200 480GB") is None
    assert peak_for("AMD EPYC") is None
    given = peak_for("AMD EPYC", tflops=2.0, gbs=100.0)
    assert (given["tflops"], given["gbs"]) == (2.0, 100.0) and "datasheet" not in given["source"]
    assert peak_for("NVIDIA H200", gbs=4000.0)["tflops"] == 67.0
    memory_only = peak_for("AMD EPYC", gbs=100.0)
    assert memory_only["tflops"] is None and roofline_us(2e9, 1e9, memory_only) == pytest.approx(10_000)
    # 2 GFLOP at 2 TFLOP/s = 1000 us; 1 GB at 100 GB/s = 10 ms: memory bound
    assert roofline_us(2e9, 1e9, given) == pytest.approx(10_000) and roofline_us(2e9, 1e3, given) == pytest.approx(1000)
    assert roofline_us(2e9, 1e9, None) is None


def test_curves_and_trials_to_reach():
    trials = [{"task": "a", "latency_us": 9.0}, {"task": "a", "latency_us": None}, {"task": "b", "latency_us": 5.0},
              {"task": "a", "latency_us": 4.0}, {"task": "b", "latency_us": 6.0}]
    assert task_curve(trials, "a") == [9.0, 9.0, 4.0]
    assert workload_curve(trials, {"a": 1, "b": 2}) == [None, None, 19.0, 14.0, 14.0]
    assert trials_to_reach([None, 9.0, 4.0], 4.0) == 3 and trials_to_reach([9.0], 4.0) is None
    # a seed that stopped after 2 trials keeps its best: the median does not jump to the other seed's
    assert band([[None, 3.0], [9.0, 8.0, 7.0, 6.0], [5.0, 5.0, 5.0, 5.0]]) == (
        [1, 2, 3, 4], [5.0, 3.0, 3.0, 3.0], [7.0, 5.0, 5.0, 5.0], [9.0, 8.0, 7.0, 6.0])


def test_bad_arguments_are_user_errors(tmp_path, capfd):
    with pytest.raises(UserError, match="unknown bogus"):
        compare([SOFTMAX], tmp_path / "o", ["ansor", "bogus"], 1)
    with pytest.raises(UserError, match="share a name"):
        compare([SOFTMAX, SOFTMAX], tmp_path / "o", ["ansor"], 1, target_name="llvm")
    assert "not a comparison directory" in user_error(["report", str(tmp_path)], capfd)


def test_torch_compile_baselines_time_or_say_why(monkeypatch):
    import torch

    wl, target = workload.load(RMSNORM, "small"), targets.resolve("llvm")
    timed = time_baselines(wl, target, repeats=3)["baselines"]
    assert set(timed) == {"eager", "compile", "compile-max-autotune"}
    for name, stats in timed.items():  # this machine has a C++ compiler: inductor works
        assert stats["median_us"] > 0 and stats.get("matches_eager", True), (name, stats)

    def no_compiler(*a, **k):
        raise RuntimeError("InvalidCxxCompiler: No working C compiler detected\nmore lines")
    monkeypatch.setattr(torch, "compile", no_compiler)
    failed = time_baselines(wl, target, repeats=3)["baselines"]
    assert failed["compile"] == {"failed": "RuntimeError: InvalidCxxCompiler: No working C compiler detected"}
    assert failed["eager"]["median_us"] > 0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_html_report_renders_in_headless_chromium(cmp_dir, tmp_path):
    html = (cmp_dir / "report.html").read_text()
    n_images = html.count('src="data:image/png;base64,')
    assert n_images == 4 and "<script" not in html and 'src="http' not in html and "<link" not in html
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,2000",
                    (cmp_dir / "report.html").as_uri()], check=True, capture_output=True, timeout=120)
    from PIL import Image
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 2000) and len(image.getcolors(1 << 20)) > 50  # text, tables and plot colours

    # A copy with a probe appended reports each image's decoded width: 0 means it did not decode.
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", "<script>window.onload = () => { const d = document.createElement('div');"
                                  " d.id = 'widths'; d.textContent = [...document.images].map(i => i.naturalWidth)"
                                  ".join(','); document.body.appendChild(d); };</script></body>"))
    dom = subprocess.run(["chromium", *flags, "--dump-dom", probe.as_uri()], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    widths = dom.split('<div id="widths">', 1)[1].split("</div>", 1)[0].split(",")
    assert widths == ["800"] * n_images  # 8 inches at 100 dpi


def _crash(workload):
    raise RuntimeError("the builder's worker died")


def _no_answer(workload):  # a replayed transcript recorded on other workloads: not a setting that stops compare
    from schedsearch.llm_client import TranscriptExhausted
    raise TranscriptExhausted(f"replay: transcript t.jsonl has no response for this prompt ({workload.name})")


@pytest.mark.parametrize("fail, message", [(_crash, "RuntimeError: the builder's worker died"),
                                           (_no_answer, "replay: transcript t.jsonl has no response")])
def test_a_failing_arm_is_reported_and_the_others_still_run(cmp_dir, tmp_path, monkeypatch, capfd, fail, message):
    import schedsearch.tune

    out = tmp_path / "fail"
    shutil.copytree(cmp_dir, out)
    (out / "softmax/rules-s0/results.json").unlink()
    (out / "rmsnorm/ansor-s1/results.json").unlink()
    monkeypatch.setattr(schedsearch.tune, "tune_workload", lambda workload, *args, **kwargs: fail(workload))
    assert cli(["compare", *ARGS, "-o", str(out)]) == 1
    err = capfd.readouterr().err
    assert err.count(f"FAILED: {message}") == 2  # both tried: one does not stop the other
    assert message in (out / "softmax/rules-s0/error.txt").read_text()
    notes = (out / "report.md").read_text().split("## Notes", 1)[1]
    assert f"softmax: rules seed 0 failed ({message}" in notes
    assert f"rmsnorm: ansor seed 1 failed ({message}" in notes


def test_parallel_workers_run_arms_in_their_own_processes(cmp_dir, tmp_path, capfd):
    out = tmp_path / "parallel"
    shutil.copytree(cmp_dir, out)
    for arm in ("softmax/ansor-s1", "rmsnorm/rules-s0"):
        shutil.rmtree(out / arm)
    (out / "softmax/baselines.json").unlink()
    assert cli(["compare", *ARGS, "-o", str(out), "--parallel", "2"]) == 0
    err = capfd.readouterr().err
    assert "3 job(s) on 2 parallel workers" in err
    for job in ("softmax/baselines", "softmax/ansor-s1", "rmsnorm/rules-s0"):
        started = [l for l in err.splitlines() if f"{job}: started" in l]
        assert len(started) == 1 and started[0].startswith(("[worker 0]", "[worker 1]"))
        assert any(l.endswith("s)") and f"{job}: done (" in l for l in err.splitlines())
    for arm in ("softmax/ansor-s1", "rmsnorm/rules-s0"):
        res = results(out, arm)
        assert res.trials_per_task == 4 and res.validation["passed"]
        assert "4/4 trials" in (out / arm / "console.log").read_text()  # the arm's progress, not the terminal's
    assert json.loads((out / "softmax/baselines.json").read_text())["baselines"]["eager"]["median_us"] > 0
    assert json.loads((out / "compare.json").read_text())["parallel"] == 2


@pytest.mark.slow
def test_sigint_ends_parallel_searches_after_their_round_and_keeps_it(tmp_path):
    """As `timeout -s INT` does on the GPU machine: SIGINT to the parent alone, mid-search."""
    import signal
    import sys
    import time

    out = tmp_path / "interrupted"
    argv = [sys.executable, "-m", "schedsearch", "compare", SOFTMAX, "--size", "small", "--strategies", "ansor",
            "--trials", "640", "--seeds", "2", "--target", "llvm", "--validation-seeds", "1", "--repeats", "3",
            "--no-compile-baselines", "--parallel", "2", "-o", str(out)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    logs = [out / "softmax" / f"ansor-s{k}" / "trials.jsonl" for k in (0, 1)]
    deadline = time.time() + 600
    while not all(p.is_file() for p in logs) and time.time() < deadline:  # both arms past their first round
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 130, err[-2000:]
    assert "waiting for the workers to end their rounds" in err and "interrupted" in err
    assert "FAILED" not in err and "Segfault" not in err and not list(out.glob("softmax/*/error.txt"))
    for p in logs:  # each search ended after its round in flight, far short of the budget: resumable
        n = len(RunDir(p.parent).read_trials())
        assert 0 < n < 640 and not (p.parent / "results.json").exists(), (n, err[-2000:])
