"""Bad input gets one clear line and a non-zero exit, never a traceback."""
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
    (["--target", "cuda"], "--target cuda, but no CUDA GPU is visible"),
    (["--strategy", "magic", "--size", "small"], "unknown strategy 'magic'"),
    (["--runner", "tcp://x", "--size", "small"], "expected local or rpc://HOST:PORT/KEY"),
])
def test_bad_flags(args, message, capsys, tmp_path):
    try:
        rc = main(["tune", SOFTMAX, "-o", str(tmp_path / "r"), *args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err
