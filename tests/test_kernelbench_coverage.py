"""benchmarks/kernelbench_coverage.py's size scaling (no tune: the script runs `schedsearch tune` itself)."""
import importlib.util
import sys

from conftest import ROOT

spec = importlib.util.spec_from_file_location("kernelbench_coverage", ROOT / "benchmarks/kernelbench_coverage.py")
coverage = sys.modules["kernelbench_coverage"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(coverage)

PROBLEM = """import torch
import torch.nn as nn

class Model(nn.Module):
    def __init__(self, c, norm_shape):
        super().__init__()
        self.up = nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1)
        self.norm = nn.LayerNorm(norm_shape)  # over the last axis: width * 2 must equal c
        self.head = nn.Linear(1024, 10)  # the model's own literal: not scaled
    def forward(self, x):
        return self.norm(self.up(x))

batch_size = 128  # a comment stays
channels = 64
width = 32
norm_shape = (channels,)

def get_inputs():
    return [torch.rand(batch_size, channels, 24, width)]

def get_init_inputs():
    return [channels, norm_shape]
"""


def test_size_literals_are_divided_and_small_ones_kept():
    text = coverage.scaled_source(PROBLEM, 4, 16)
    assert "batch_size = 32  # a comment stays" in text and "channels = 16" in text and "width = 16" in text
    assert "torch.rand(batch_size, channels, 16, width)" in text  # 24 // 4 = 6, held at the floor
    assert "nn.Linear(1024, 10)" in text and "ConvTranspose2d(c, c, 3, stride=2" in text


def test_a_factor_that_breaks_the_shapes_is_not_taken(tmp_path):
    src, dst = tmp_path / "p.py", tmp_path / "scaled" / "p.py"
    src.write_text(PROBLEM)
    factor = coverage.scale_file(src, dst, 16, 1 << 12, 5e7)  # a budget no factor meets
    namespace = {}
    exec(dst.read_text(), namespace)
    model = namespace["Model"](*namespace["get_init_inputs"]())
    model(*namespace["get_inputs"]())  # runs: width * 2 == channels held at every factor taken
    assert factor > 1 and dst.read_text().startswith(f"# p.py with its sizes divided by {factor} ")


def test_a_timeout_names_the_task_in_search():
    listed = "[  13 s] 3 task(s): conv3d_transpose, add, sum; searching\n"
    assert coverage.timed_out(listed, "tune", 420) == "timed out after 420 s searching task conv3d_transpose (1 of 3)"
    done_first = listed + "[1/3 conv3d_transpose] ######################## 1/1 trials  best 8,100.0 us  errors 0\n"
    assert coverage.timed_out(done_first, "tune", 420).endswith("searching task add (2 of 3)")
    assert coverage.timed_out(done_first, "validate", 60) == "timed out after 60 s validating and timing the module"
    compiled = (done_first + "[2/3 add] ######################## 1/1 trials  best 1,850,544.2 us  errors 0\n"
                "[3/3 sum] ######################## 1/1 trials  best -  errors 1\n[ 386 s] compiling the module\n")
    assert coverage.timed_out(compiled, "validate", 420) == ("timed out after 420 s validating and timing the module "
                                                             "(the search took 386 s; slowest kernel add, 1,850.5 ms a call)")
