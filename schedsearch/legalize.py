"""Lowerings that replace TVM's where TVM's are numerically unsound.

TVM 0.27 legalizes layer_norm as E[x^2] - E[x]^2 in fp32: with inputs of mean 1e3 that cancels
catastrophically. Ours takes the statistics of x - x[row, 0] (the shifted-data algorithm),
accumulated in float64: still one pass over x with a tuple reduction, and accurate whatever order
a schedule sums in (the fp32 sums of the level-1 LayerNorm's 4M-element rows alone were 4.0e-3
off normwise on the CPU box). tests/test_legalize.py measures both lowerings against float64.
"""
from __future__ import annotations

from functools import reduce

from tvm import te, tirx


def _index(idx, axes: list[int], ndim: int, fill) -> list:
    """Full index from the outer (non-normalized) indices `idx`, with `fill(j)` on the j-th normalized axis."""
    it = iter(idx)
    return [fill(axes.index(i)) if i in axes else next(it) for i in range(ndim)]


def shifted_layer_norm(x: te.Tensor, gamma: te.Tensor | None, beta: te.Tensor | None,
                       axes: list[int], epsilon: float) -> te.Tensor:
    ndim = len(x.shape)
    axes = sorted(a % ndim for a in axes)
    n = reduce(lambda a, b: a * b, [x.shape[a] for a in axes])
    outer_shape = [x.shape[i] for i in range(ndim) if i not in axes]
    zero = x.shape[axes[0]] * 0  # index 0 in the shape's own index dtype
    shift = te.compute(outer_shape, lambda *o: x(*_index(o, axes, ndim, lambda j: zero)), name="ln_shift")
    k = [te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes]
    sum2 = te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]),
                           lambda t0, t1: (tirx.const(0, t0), tirx.const(0, t1)), name="sum2")

    def stats(*o):
        d = (x(*_index(o, axes, ndim, lambda j: k[j])) - shift(*o)).astype("float64")
        return sum2((d, d * d), axis=k)

    s1, s2 = te.compute(outer_shape, stats, name="ln_stats")

    def normalize(*idx):
        outer = [idx[i] for i in range(ndim) if i not in axes]
        inner = [idx[a] for a in axes]
        mean_d = s1(*outer) / n.astype("float64")
        var = s2(*outer) / n.astype("float64") - mean_d * mean_d
        inv_std = tirx.rsqrt(var + tirx.const(epsilon, "float64")).astype(x.dtype)
        y = (x(*idx) - shift(*outer) - mean_d.astype(x.dtype)) * inv_std
        if gamma is not None:
            y = y * gamma(*inner)
        if beta is not None:
            y = y + beta(*inner)
        return y

    return te.compute(x.shape, normalize, name="T_layer_norm")


def _layer_norm(bb, call):
    x, gamma, beta = call.args
    a = call.attrs
    return bb.call_te(
        lambda x, g, b: shifted_layer_norm(x, g if a.scale else None, b if a.center else None,
                                           [int(v) for v in a.axes], float(a.epsilon)),
        x, gamma, beta, primfunc_name_hint="layer_norm")


LEGALIZE_MAP = {"relax.nn.layer_norm": _layer_norm}
