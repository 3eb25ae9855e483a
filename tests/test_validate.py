"""The validation criterion on known outputs, no TVM: fp32 rounding passes, real errors fail."""
import pytest
import torch

from schedsearch import workload
from schedsearch.errors import UserError
from schedsearch.validate import DISTRIBUTIONS, compare, make_inputs, summary, validate, verdict


def matmul_case(k=4096, n=256):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, k, generator=g), torch.randn(k, n, generator=g)
    sequential = torch.zeros(n, n)  # k-order fp32 accumulation, as a simple GPU kernel does it
    for i in range(k):
        sequential += a[:, i:i + 1] * b[i:i + 1, :]
    return sequential, a @ b, a.double() @ b.double()


def test_fp32_rounding_of_long_dot_products_passes():
    sequential, pytorch, exact = matmul_case()
    # ~7.5e-4 off the exact value on outputs of RMS ~64: a fixed atol of 1e-4 would call that wrong
    check = compare([sequential], [exact], [pytorch])
    assert check.passed and check.max_abs > 1e-4 and check.rel_l2 < 1e-5
    assert compare([sequential], [exact]).passed


def test_matching_either_reference_passes():
    exact = torch.randn(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    pytorch = (exact * (1 + 2e-4)).float()  # PyTorch fp32 2e-4 off, as on LayerNorm rows of mean 1e3
    assert not compare([pytorch], [exact]).passed  # too far from the exact value on its own,
    assert compare([pytorch], [exact], [pytorch]).passed  # but it is what PyTorch computes
    assert compare([exact.float()], [exact], [pytorch]).passed  # nearer the exact value: passes too
    assert not compare([(exact * (1 + 5e-4)).float()], [exact], [pytorch]).passed  # near neither


def test_wrong_elements_fail_against_both_references():
    sequential, pytorch, exact = matmul_case()
    bad = sequential.clone()
    bad[3, 5] += 0.05  # one element off by far more than rounding
    check = compare([bad], [exact], [pytorch])
    assert not check.passed and "1 of 65536 values outside" in check.problem
    drift = sequential * (1 + 3e-4)  # every element slightly off: within atol but normwise too far
    assert not compare([drift], [exact], [pytorch]).passed


def test_outputs_below_one_keep_an_absolute_tolerance_of_1e_4():
    ref = torch.full((10000,), 0.5, dtype=torch.float64)
    near, far = ref.clone(), ref.clone()
    near[0] += 1.2e-4  # within 1e-4 + 1e-4 * 0.5; an atol scaled down to 1e-4 * RMS would refuse it
    far[0] += 2e-4
    assert compare([near.float()], [ref]).passed and not compare([far.float()], [ref]).passed
    small = torch.full((1000,), 1e-5, dtype=torch.float64)  # softmax-sized values
    assert not compare([(small * 2).float()], [small]).passed  # 100% off: caught normwise


def test_nearer_the_exact_scalar_than_pytorch_passes():
    """KLDivLoss to a scalar on mean-1e3 inputs (128x4096, seed 1): float64 13.95, PyTorch fp32 8.3e-4 off
    relatively (its reruns on nudged inputs 5.8e-5..1.5e-3), TVM's default kernel 4.5e-4: TVM failed with
    '1 of 1 values outside rtol=0.0001, atol=0.0014' though it is nearer the exact value than PyTorch."""
    exact = torch.tensor([13.9458], dtype=torch.float64)
    pytorch = (exact * (1 + 8.3e-4)).float()
    reruns = lambda: [[(exact * (1 + e)).float()] for e in (2.1e-4, -1.5e-3, 3.0e-4, 5.8e-5)]
    tvm = (exact * (1 - 4.5e-4)).float()
    assert compare([tvm], [exact], [pytorch]).passed
    # 2.5e-3: farther than twice PyTorch's one run, within twice the largest error of its reruns. A correct
    # kernel's rounding is another draw of that noise: beyond one draw of it about half the time.
    farther = (exact * (1 - 2.5e-3)).float()
    check = compare([farther], [exact], [pytorch], reruns)
    assert check.passed and check.fp32_noise_rel_l2 == pytest.approx(1.5e-3, rel=1e-3)
    assert not compare([farther], [exact], [pytorch]).passed  # judged by PyTorch's run alone
    wrong = compare([(exact * (1 + 5e-3)).float()], [exact], [pytorch], reruns)  # beyond 2x that noise
    assert not wrong.passed and "beyond 2x PyTorch fp32's own error" in wrong.problem


def test_ill_conditioned_outputs_are_judged_against_pytorchs_own_error():
    """softmax(a @ b) on mean-1e3 inputs: each row is one-hot in float64, and which element wins is decided by
    fp32 rounding of the K-long sums: PyTorch fp32 itself puts 4 of 16 rows half on the wrong element (35%
    normwise; 16x2048x128, seed 0). A kernel whose rounding splits other rows failed elementwise."""
    exact = torch.zeros(16, 128, dtype=torch.float64)
    exact[:, 0] = 1
    pytorch, kernel = exact.clone(), exact.clone()
    pytorch[:4, :2] = 0.5  # PyTorch: rows 0-3 split between elements 0 and 1
    kernel[:3, :2] = 0.5  # the kernel: rows 0-2 the same, row 3 exact,
    kernel[5, :2] = torch.tensor([0.7, 0.3], dtype=torch.float64)  # row 5 split where PyTorch has it right
    assert compare([kernel.float()], [exact], [pytorch.float()]).passed
    wrong = exact.clone()
    wrong[:, 0], wrong[:, 1] = 0.2, 0.8  # every row split: farther than twice PyTorch's error normwise
    assert not compare([wrong.float()], [exact], [pytorch.float()]).passed


def test_an_output_at_fp32_noise_level_has_an_absolute_floor(write_problem):
    """The mean of a group-normalised tensor is exactly 0: float64 gives ~1e-18, PyTorch fp32 ~1e-9 (5e8-1e9
    times the float64 value), a sequential fp32 mean ~1e-8. Relative errors mean nothing there; every
    normwise check failed. atol is the floor; a kernel 1e-3 off still fails."""
    wl = workload.load(write_problem(
        "class Model(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.gn = nn.GroupNorm(8, 32)\n"
        "    def forward(self, x):\n"
        "        return self.gn(x).mean(dim=(1, 2, 3))\n"
        "def get_inputs(): return [torch.randn(8, 32, 16, 16)]\n"
        "def get_init_inputs(): return []\n"))
    sequential_mean = lambda xs: [torch.cumsum(wl.model.gn(xs[0]).flatten(1), 1)[:, -1] / (32 * 16 * 16)]
    checks = validate(wl, sequential_mean, "cpu", seeds=1, distributions=("normal", "uniform"))
    assert all(c.passed for c in checks) and all(c.pytorch_fp32_rel_l2 > 1 for c in checks)
    assert 0 < max(c.max_abs for c in checks) < 1e-6
    off = validate(wl, lambda xs: [sequential_mean(xs)[0] + 1e-3], "cpu", seeds=1, distributions=("normal",))
    assert not off[0].passed


KLDIV = ("class Model(nn.Module):\n"
         "    def forward(self, predictions, targets):\n"
         "        return torch.nn.functional.kl_div(torch.log(predictions), targets, reduction='batchmean')\n"
         "def get_inputs(): return [torch.randn(16, 256).softmax(dim=-1), torch.randn(16, 256).softmax(dim=-1)]\n"
         "def get_init_inputs(): return []\n")


def test_a_nan_reference_is_not_checkable_and_declared_domains_make_it_checkable(write_problem):
    """log() of the validator's normal, uniform and scale-1e-3 inputs is NaN, and so is the reference: those
    9 of 12 checks compared nothing and passed."""
    wl = workload.load(write_problem(KLDIV))
    pytorch = lambda xs: wl.reference(xs)  # a module computing exactly what PyTorch computes
    checks = validate(wl, pytorch, "cpu")
    unchecked = [c for c in checks if not c.checkable]
    assert len(unchecked) == 9 and not any(c.passed for c in unchecked)
    assert {c.distribution for c in unchecked} == {"normal", "uniform", "small"}
    s = summary(checks)
    assert s["passed"] and len(s["not_checkable"]) == 9  # the 3 mean-1e3 checks could be made
    assert "9 of 12 checks not checkable (normal, small, uniform" in verdict(s)
    only_nan = summary([c for c in checks if not c.checkable])
    assert not only_nan["passed"] and verdict(only_nan).startswith("NOT CHECKABLE")

    declared = workload.load(write_problem(KLDIV + "INPUT_DOMAINS = ['positive', 'positive']\n", "kl2.py"))
    checks = validate(declared, lambda xs: declared.reference(xs), "cpu")
    assert len(checks) == 12 and all(c.checkable and c.passed and c.not_compared == 0 for c in checks)
    assert all((x > 0).all() for d in DISTRIBUTIONS for x in make_inputs(declared, 0, d, "cpu"))


def test_values_whose_reference_is_nan_are_not_compared_and_counted():
    ref = torch.tensor([float("nan"), 1.0, float("inf"), 2.0], dtype=torch.float64)
    check = compare([torch.tensor([0.0, 1.0, 5.0, 2.0])], [ref])
    assert check.passed and check.checkable and check.not_compared == 2
    assert not compare([torch.tensor([0.0, 1.5, 5.0, 2.0])], [ref]).passed  # the finite ones still count
    assert "2 values not compared, their reference NaN/Inf" in verdict(summary([check]))


def test_the_same_overflow_as_pytorch_fp32_is_not_an_error():
    """cumprod of mean-1e3 inputs: float64 finite, PyTorch fp32 and the kernel Inf on the same values."""
    ref64 = torch.tensor([1e3, 1e6, 1e39, -1e40], dtype=torch.float64)
    ref32 = torch.tensor([1e3, 1e6, float("inf"), -float("inf")])
    check = compare([ref32.clone()], [ref64], [ref32])
    assert check.passed and check.not_compared == 2
    wrong_sign = torch.tensor([1e3, 1e6, float("inf"), float("inf")])
    assert "1 NaN/Inf values where PyTorch has finite ones" in compare([wrong_sign], [ref64], [ref32]).problem
    assert not compare([ref32.clone()], [ref64]).passed  # against float64 alone it still fails


def test_bad_input_domains_are_refused(write_problem):
    with pytest.raises(UserError, match="INPUT_DOMAINS: unknown domain 'probability'"):
        workload.load(write_problem(KLDIV + "INPUT_DOMAINS = ['probability', 'positive']\n"))
    with pytest.raises(UserError, match="one domain per input of get_inputs\\(\\) \\(2\\)"):
        workload.load(write_problem(KLDIV + "INPUT_DOMAINS = ['positive']\n"))
