"""Bad input gets one clear line and a non-zero exit, never a traceback."""
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from schedsearch.cli import main

SOFTMAX = str(ROOT / "workloads/level1/softmax.py")


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "schedsearch", *args], capture_output=True, text=True, timeout=300)
    return p.returncode, p.stderr


def test_missing_file_is_one_line_without_traceback():
    rc, err = run_cli("tune", "no/such/file.py")
    assert rc == 2
    assert err.strip() == "schedsearch: error: workload file not found: no/such/file.py"


@pytest.mark.parametrize("body, message", [
    ("def get_inputs(): return []\n", "no Model, get_init_inputs defined"),
    ("raise RuntimeError('boom')\n", "raised RuntimeError on import: boom"),
    ("class Model(nn.Module):\n    def forward(self, x): return torch.linalg.det(x)\n"
     "def get_inputs(): return [torch.randn(2, 3, 3)]\ndef get_init_inputs(): return []\n",
     "not supported for frontend ONNX: Det"),
    ("class Model(nn.Module):\n    def forward(self, x): return x\n"
     "def get_inputs(): return [torch.randn(2)]\ndef get_init_inputs(): return []\n", "no size 'small'"),
    # torch.onnx's own message ends "(Refer to the full stack trace above for more information.)": the cause.
    # (State in a tensor attribute exports: workload.tensor_attributes_as_buffers; in a list it does not.)
    ("class Model(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
     "        self.cache = [torch.zeros(2, 3)]\n    def forward(self, x):\n        self.cache[0].add_(x)\n"
     "        return torch.tanh(self.cache[0])\n"
     "def get_inputs(): return [torch.randn(2, 3)]\ndef get_init_inputs(): return []\n",
     "ONNX export of problem failed: RuntimeError: Constant lifted_tensor_0 is mutated in the forward method. "
     "Pls register it as buffer"),
])
def test_bad_workload_files(write_problem, tmp_path, capsys, body, message):
    size = ["--size", "small"] if "no size" in message else []
    rc = main(["tune", str(write_problem(body)), *size, "--trials", "1", "--target", "llvm",
               "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "expected a positive integer, got 0"),
    (["--trials", "many"], "expected a positive integer, got 'many'"),
    (["--target", "tpu"], "unknown target 'tpu'"),
    pytest.param(["--target", "cuda"], "--target cuda, but no CUDA GPU is visible",  # else a real 64-trial tune
                 marks=pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU may be visible")),
    (["--runner", "tcp://x", "--size", "small"], "expected local or rpc://HOST:PORT/KEY"),
    (["--cap-factor", "0.5"], "--cap-factor must be at least 1 (1: cap at the best so far), got 0.5"),
])
def test_bad_flags(args, message, capsys, tmp_path):
    try:
        rc = main(["tune", SOFTMAX, "-o", str(tmp_path / "r"), *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["tune", SOFTMAX, "--strategy", "magic"], "unknown strategy 'magic': choose from ansor, rules, llm, hybrid"),
    (["compare", SOFTMAX, "--strategies", "ansor,magic"], "--strategies: unknown magic: choose from ansor, rules, "
                                                          "llm, hybrid"),
])
def test_an_unknown_strategy_is_refused_before_any_work(tmp_path, args, message):
    """One line, exit 2, before TVM or the workload is even imported, and nothing written: the right
    command afterwards is not refused as "another strategy" by a run.json the wrong one left."""
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", "import sys; from schedsearch.cli import main; rc = main(sys.argv[1:]); "
                        "print(rc, 'tvm' in sys.modules, 'torch' in sys.modules)", *args, "-o", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert (p.stdout.split(), p.stderr) == (["2", "False", "False"], f"schedsearch: error: {message}\n")
    assert not out.exists()


def test_a_directory_as_the_workload(tmp_path, capsys):
    assert main(["tune", str(tmp_path), "-o", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.strip() == (f"schedsearch: error: {tmp_path} is a directory: expected a "
                                               "KernelBench .py problem file or an .onnx file")


@pytest.mark.parametrize("content, message", [
    (b"hello", "not a tar archive (a run's cost_model.tar)"),
    (None, "not a cost model saved by `schedsearch tune` ("),  # a tar archive of something else
])
def test_a_cost_model_file_that_is_not_one(tmp_path, capsys, content, message):
    path = tmp_path / "cost_model.tar"
    if content is None:
        import tarfile

        (tmp_path / "notes.txt").write_text("not a model")
        with tarfile.open(path, "w") as tar:
            tar.add(tmp_path / "notes.txt", arcname="notes.txt")
    else:
        path.write_bytes(content)
    rc = main(["tune", SOFTMAX, "--size", "small", "--trials", "1", "-o", str(tmp_path / "run"), "--target", "llvm",
               "--cost-model", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"schedsearch: error: --cost-model {path}: {message}" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model.onnx").exists()  # refused before the export


def test_run_on_a_run_directory_says_to_export_it_elsewhere(tmp_path, capsys):
    run = tmp_path / "softmax-ansor"
    run.mkdir()
    (run / "results.json").write_text("{}")
    assert main(["run", str(run), "--check"]) == 2
    err = capsys.readouterr().err
    assert f"{run} is a run directory of `schedsearch tune`, not an exported module" in err
    assert f"schedsearch export {run} -o dist/softmax-ansor`" in err and f"-o {run}`" not in err
