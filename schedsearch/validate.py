"""Check a compiled module against the original program on several seeds and input distributions.

Strict dtype-aware tolerances, NaN/Inf detection, and a check that inputs were not modified:
the checks the field's loose AI-kernel claims usually skip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .options import Evaluation

if TYPE_CHECKING:  # annotations only: workload.py imports this module
    from .workload import Workload

TOLERANCES = {torch.float32: 1e-4, torch.float64: 1e-7, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# name -> transform of a standard-normal tensor. "offset" is the LayerNorm-with-mean-1e3 trap:
# E[x^2] - E[x]^2 variance formulas cancel catastrophically there.
DISTRIBUTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "normal": lambda x: x,
    "uniform": lambda x: torch.special.ndtr(x) * 2 - 1,  # normal -> uniform(-1, 1)
    "offset": lambda x: x + 1e3,
    "small": lambda x: x * 1e-3,
}

# The domain a workload declares for an input (INPUT_DOMAINS in its file): each distribution is mapped
# into it. Without one, log() of KLDivLoss's inputs makes the reference NaN on 9 of the 12 checks.
DOMAINS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "real": lambda x: x,
    "positive": lambda x: x.abs().clamp_min(torch.finfo(x.dtype).tiny),  # normal -> half-normal, etc.
}

# PyTorch's fp32 program is run again on this many copies of the inputs, each element moved by one ulp in a
# random direction: how far those land from float64 is the fp32 rounding noise of the computation on these
# inputs, which one run alone does not tell. KLDivLoss to a scalar (128x4096, mean-1e3 inputs, seed 0):
# PyTorch fp32 2.9e-5 from float64, its 8 reruns 9.3e-6..2.1e-4; seed 1: 8.3e-4, reruns 5.8e-5..1.5e-3.
FP32_RERUNS = 8
# An output passes when no farther from float64 than NOISE_FACTOR x the largest of those 9 errors (with
# PyTorch's own run). A correct kernel's rounding is one more draw of that noise: for a scalar it lands
# farther than PyTorch's one draw half the time, farther than the largest of 9 one time in 10.
NOISE_FACTOR = 2.0


@dataclass
class Check:
    seed: int
    distribution: str
    passed: bool
    max_abs: float
    max_rel: float
    rel_l2: float
    tolerance: float
    problem: str | None = None  # set when a check failed or could not be made: what exactly
    reference: str = "pytorch"  # what the outputs were compared with
    pytorch_fp32_rel_l2: float | None = None  # PyTorch's own fp32 error vs float64, for scale
    checkable: bool = True  # False: the reference is NaN/Inf on every value, nothing was compared
    not_compared: int = 0  # values whose reference is NaN/Inf (these inputs are outside the program's domain)
    fp32_noise_rel_l2: float | None = None  # the largest normwise error of PyTorch's fp32 reruns, when consulted

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def make_inputs(workload: Workload, seed: int, distribution: str, device: str) -> list[torch.Tensor]:
    """Float inputs are drawn here, on the device, in each input's declared domain; other inputs (indices,
    masks) come from get_inputs."""
    torch.manual_seed(seed)
    others = None
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i, (shape, dtype) in enumerate(workload.input_specs):
        if dtype.is_floating_point:
            x = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
            out.append(DOMAINS[workload.input_domains[i]](DISTRIBUTIONS[distribution](x)).to(dtype))
        else:
            others = others or workload.make_inputs()
            out.append(others[i].to(device).contiguous())
    return out


def nudged(inputs: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The inputs with every fp32/fp64 element moved one ulp up or down at random (seeded by k), in its domain."""
    out = []
    for x in inputs:
        if x.dtype not in (torch.float32, torch.float64):
            out.append(x)
            continue
        g = torch.Generator(device=x.device).manual_seed(10_000 + k)
        up = torch.rand(x.shape, generator=g, device=x.device) < 0.5
        away = torch.where(up, torch.inf, -torch.inf).to(x.dtype)
        # Toward zero would cross it for the smallest positive values: keep the sign (a "positive" domain).
        y = torch.nextafter(x, away)
        out.append(torch.where((y == 0) | (torch.sign(y) != torch.sign(x)), x, y))
    return out


def _rms(t: torch.Tensor) -> float:
    return float(t.square().mean().sqrt()) if t.numel() else 0.0


def compare(outputs: list[torch.Tensor], refs: list[torch.Tensor],
            fp32_refs: list[torch.Tensor] | None = None,
            fp32_reruns: Callable[[], list[list[torch.Tensor]]] | None = None) -> Check:
    """Passes when every element is within rtol=tol and atol=tol*max(1, RMS(ref)) AND the normwise error
    ||out-ref||/||ref|| is within tol: the elementwise test alone lets small outputs (softmax's ~1e-4)
    drift by 100%. atol scales with outputs above 1 because rounding error does: fp32 puts a K=4096 dot
    product of normal inputs (outputs ~64) ~1e-3 off the exact value, whatever the summation order.

    `refs` in float64 with `fp32_refs` (PyTorch's own fp32 result): an element passes when it is within
    tolerance of either, and the normwise test takes the nearer one, so matching PyTorch passes, as does
    being nearer the exact value than PyTorch's fp32 result (LayerNorm on mean-1e3 rows of 4M elements).
    Being no farther from it than PyTorch fp32 passes too: where the above fails, the errors are compared
    with NOISE_FACTOR x the largest error of PyTorch fp32 (its run and `fp32_reruns()`, the program on
    nudged inputs): per element with its largest element error, normwise with its largest normwise error.
    An output at fp32 noise level (PyTorch fp32 itself >= 100% off normwise: the mean of a group-normalised
    tensor, exactly 0) has no meaningful relative error: there the normwise test's floor is atol (RMS error).

    Values whose reference is NaN/Inf are not compared (counted in not_compared), nor values beyond fp32's range
    where the output is the same Inf as PyTorch fp32 (cumprod of mean-1e3 inputs); a check where no value
    could be compared is not checkable: passed False, checkable False, never a pass.
    The figures reported are against `refs`."""
    max_abs = max_rel = rel_l2 = tol = 0.0
    total = not_compared = 0
    noise_l2 = None
    reruns = None  # PyTorch fp32 on nudged inputs, computed only when an output needs it
    fail = lambda problem: Check(0, "", False, max_abs, max_rel, rel_l2, tol, problem, not_compared=not_compared,
                                 fp32_noise_rel_l2=noise_l2)
    for i, (out, ref) in enumerate(zip(outputs, refs)):
        if out.shape != ref.shape:
            return fail(f"output {i}: shape {tuple(out.shape)} != {tuple(ref.shape)}")
        tol = max(tol, TOLERANCES.get(out.dtype, 0.0))  # the dtype under test, not the reference's
        o, r = out.double(), ref.double()
        bad_nonfinite = (~torch.isfinite(o)) & torch.isfinite(r)
        # Beyond fp32's range the same Inf as PyTorch fp32 is no error, and not compared: cumprod of mean-1e3
        # inputs (float64 finite up to 1e3^102) overflowed on 23,040 of 65,536 values in both.
        alike = (bad_nonfinite & torch.isinf(o) & (o == fp32_refs[i].double()) if fp32_refs is not None
                 else torch.zeros_like(bad_nonfinite))
        bad_nonfinite &= ~alike
        if bad_nonfinite.any():
            return fail(f"output {i}: {int(bad_nonfinite.sum())} NaN/Inf values where PyTorch has finite ones")
        finite = torch.isfinite(r) & ~alike
        total += r.numel()
        not_compared += int((~finite).sum())
        o, r = o[finite], r[finite]
        if not r.numel():
            continue
        diff, mag = (o - r).abs(), r.abs()
        max_abs = max(max_abs, float(diff.max()))
        big = mag > tol
        if big.any():
            max_rel = max(max_rel, float((diff[big] / mag[big]).max()))
        l2 = float(diff.norm() / mag.norm().clamp_min(1e-30))
        rel_l2 = max(rel_l2, l2)
        atol = tol * max(1.0, _rms(r))
        over = diff > atol + tol * mag
        normwise = l2
        if fp32_refs is not None:
            r32 = fp32_refs[i].double()[finite]
            diff32 = (o - r32).abs()
            over &= ~(diff32 <= atol + tol * r32.abs())  # where PyTorch fp32 is NaN/Inf, float64 alone decides
            normwise = min(l2, float(diff32.norm() / r32.norm().clamp_min(1e-30)))
            at_noise_level = float((r32 - r).norm() / mag.norm().clamp_min(1e-30)) >= 1
            normwise_ok = normwise <= tol or (at_noise_level and _rms(o - r) <= atol)
            if over.any() or not normwise_ok:
                if reruns is None:
                    reruns = fp32_reruns() if fp32_reruns is not None else []
                errors = [e[torch.isfinite(e)] for e in [r32 - r] + [s[i].double()[finite] - r for s in reruns]]
                over &= diff > NOISE_FACTOR * max(float(e.abs().max()) if e.numel() else 0.0 for e in errors)
                noise = max(float(e.norm()) for e in errors)
                noise_l2 = max(noise_l2 or 0.0, noise / max(float(mag.norm()), 1e-30))
                normwise_ok = normwise_ok or float(diff.norm()) <= NOISE_FACTOR * noise
        else:
            normwise_ok = normwise <= tol
        if over.any():
            return fail(f"output {i}: {int(over.sum())} of {diff.numel()} values outside rtol={tol:g}, "
                        f"atol={atol:.3g}" + _noise_note(noise_l2))
        if not normwise_ok:
            return fail(f"output {i}: normwise relative error {normwise:.2e} > {tol:g}" + _noise_note(noise_l2))
    if total and not_compared == total:
        return Check(0, "", False, max_abs, max_rel, rel_l2, tol, NOT_CHECKABLE, checkable=False,
                     not_compared=not_compared)
    return Check(0, "", True, max_abs, max_rel, rel_l2, tol, not_compared=not_compared, fp32_noise_rel_l2=noise_l2)


NOT_CHECKABLE = ("not checkable: the reference is NaN/Inf on every value, these inputs are outside the "
                 "program's domain (a workload declares its inputs' domains with INPUT_DOMAINS)")


def _noise_note(noise_l2: float | None) -> str:
    return "" if noise_l2 is None else f" (beyond {NOISE_FACTOR:g}x PyTorch fp32's own error, {noise_l2:.2e} normwise)"


def validate(workload: Workload, run: Callable[[list[torch.Tensor]], list[torch.Tensor]], device: str,
             seeds: int = Evaluation.validation_seeds, distributions: tuple[str, ...] = tuple(DISTRIBUTIONS)) -> list[Check]:
    """`run` maps input tensors (on `device`) to output tensors: the compiled module under test."""
    checks = []
    for seed in range(seeds):
        for dist in distributions:
            inputs = make_inputs(workload, seed, dist, device)
            before = [t.clone() for t in inputs]
            # Copy at once: an output must not share memory with anything the reference allocates next.
            outputs = [o.detach().clone() for o in run(inputs)]
            if any(not torch.equal(a, b) for a, b in zip(inputs, before)):
                checks.append(Check(seed, dist, False, float("nan"), float("nan"), float("nan"), 0.0,
                                    "the kernel modified its inputs"))
                continue
            # fp32 outputs are judged against the program run in float64 and in fp32 (see compare).
            refs64 = workload.reference(before, float64=True) if all(
                o.dtype in (torch.float32, torch.float64) for o in outputs) else None
            refs32 = workload.reference(before)
            if refs64 is None:
                check = compare(outputs, [r.to(o.dtype) for o, r in zip(outputs, refs32)])
            else:
                reruns = lambda: [workload.reference(nudged(before, k)) for k in range(FP32_RERUNS)]
                check = compare(outputs, refs64, refs32, reruns)
                check.reference = "pytorch float64 or fp32"
                check.pytorch_fp32_rel_l2 = compare(refs32, refs64).rel_l2
            check.seed, check.distribution = seed, dist
            checks.append(check)
    return checks


def summary(checks: list[Check]) -> dict:
    checked = [c for c in checks if c.checkable]
    failed = [c for c in checked if not c.passed]
    return {
        "passed": bool(checked) and not failed,  # nothing checkable is no pass
        "checks": len(checks),
        "failed": len(failed),
        "not_checkable": [{"seed": c.seed, "distribution": c.distribution} for c in checks if not c.checkable],
        "not_compared": sum(c.not_compared for c in checked),  # values of checked outputs whose reference is NaN/Inf
        "max_abs": max(c.max_abs for c in checks),
        "max_rel": max(c.max_rel for c in checks),
        "rel_l2": max(c.rel_l2 for c in checks),
        "reference": sorted({c.reference for c in checks}),
        "pytorch_fp32_rel_l2": max((c.pytorch_fp32_rel_l2 for c in checks if c.pytorch_fp32_rel_l2 is not None),
                                   default=None),
        "tolerance": max(c.tolerance for c in checks),
        "seeds": sorted({c.seed for c in checks}),
        "distributions": sorted({c.distribution for c in checks}),
        "failures": [c.as_dict() for c in failed],
    }


def verdict(summary: dict) -> str:
    """PASSED / FAILED / NOT CHECKABLE, with the checks that could not be made."""
    skipped = summary.get("not_checkable", [])
    if summary["passed"]:
        text = "PASSED"
    elif summary["failed"]:
        text = f"FAILED ({summary['failed']} of {summary['checks']} checks)"
    else:
        return (f"NOT CHECKABLE: the reference is NaN/Inf on every value of all {summary['checks']} checks "
                "(the inputs are outside the program's domain: declare it with INPUT_DOMAINS in the workload file)")
    if skipped:
        where = ", ".join(sorted({c["distribution"] for c in skipped}))
        text += (f"; {len(skipped)} of {summary['checks']} checks not checkable ({where}: the reference is NaN/Inf "
                 "on every value; declare the inputs' domains with INPUT_DOMAINS)")
    if summary.get("not_compared"):
        text += f"; {summary['not_compared']} values not compared, their reference NaN/Inf"
    return text
