"""The validation criterion on known outputs, no TVM: fp32 rounding passes, real errors fail."""
import torch

from schedsearch.validate import compare


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
