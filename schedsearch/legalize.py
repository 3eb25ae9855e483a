"""Lowerings that replace TVM's where TVM's are numerically unsound.

TVM 0.27 legalizes layer_norm as E[x^2] - E[x]^2 in fp32: with inputs of mean 1e3 that cancels
catastrophically. Ours takes the statistics of x - x[row, 0] (the shifted-data algorithm),
accumulated in float64: still one pass over x with a tuple reduction, and accurate whatever order
a schedule sums in (the fp32 sums of the level-1 LayerNorm's 4M-element rows alone were 4.0e-3
off normwise on the CPU box). group_norm, mean, variance and std are lowered the same way.
tests/test_legalize.py measures them and TVM's against float64.
"""
from __future__ import annotations

from functools import reduce

import tvm
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


def shifted_group_norm(x: te.Tensor, gamma: te.Tensor | None, beta: te.Tensor | None, num_groups: int,
                       channel_axis: int, axes: list[int], epsilon: float) -> te.Tensor:
    """relax.nn.group_norm (ONNX GroupNormalization) as shifted_layer_norm, per batch index and group. TVM's
    is E[x^2] - E[x]^2 in fp32: NaN on mean-1e3 inputs (2x16x32x32, 4 groups; ours 5.0e-8 off float64 normwise)."""
    ndim = len(x.shape)
    c, axes = channel_axis % ndim, sorted(a % ndim for a in axes)
    kept = [i for i in range(ndim) if i != c and i not in axes]
    per_group = x.shape[c] // num_groups
    outer_shape = [x.shape[i] for i in kept] + [x.shape[c] // per_group]  # num_groups, in the shape's dtype

    def at(o, channel, reduced):  # x at outer index o (kept dims, group), channel in the group, reduced axes
        idx = [None] * ndim
        for i, v in zip(kept, o[:-1]):
            idx[i] = v
        idx[c] = o[-1] * per_group + channel
        for a, v in zip(axes, reduced):
            idx[a] = v
        return x(*idx)

    zero = x.shape[c] * 0
    shift = te.compute(outer_shape, lambda *o: at(o, zero, [zero] * len(axes)), name="gn_shift")
    kc = te.reduce_axis((0, per_group), name="kc")
    k = [te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes]
    sum2 = te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]),
                           lambda t0, t1: (tirx.const(0, t0), tirx.const(0, t1)), name="sum2")
    d = lambda o: (at(o, kc, k) - shift(*o)).astype("float64")
    s1, s2 = te.compute(outer_shape, lambda *o: sum2((d(o), d(o) * d(o)), axis=[kc, *k]), name="gn_stats")
    n = reduce(lambda a, b: a * b, [x.shape[a] for a in axes], per_group).astype("float64")

    def normalize(*idx):
        o = [idx[i] for i in kept] + [idx[c] // per_group]
        mean_d = s1(*o) / n
        inv_std = tirx.rsqrt(s2(*o) / n - mean_d * mean_d + tirx.const(epsilon, "float64")).astype(x.dtype)
        y = (x(*idx) - shift(*o) - mean_d.astype(x.dtype)) * inv_std
        if gamma is not None:
            y = y * gamma(idx[c])
        if beta is not None:
            y = y + beta(idx[c])
        return y

    return te.compute(x.shape, normalize, name="T_group_norm")


def _group_norm(bb, call):
    x, gamma, beta = call.args
    a = call.attrs
    return bb.call_te(
        lambda x, g, b: shifted_group_norm(x, g if a.scale else None, b if a.center else None, int(a.num_groups),
                                           int(a.channel_axis), [int(v) for v in a.axes], float(a.epsilon)),
        x, gamma, beta, primfunc_name_hint="group_norm")


def shifted_moments(x: te.Tensor, axes: list[int] | None, keepdims: bool, moment: str) -> te.Tensor:
    """mean, variance (population, as relax.variance) or std of x over `axes` (None: all), by the shifted-data
    algorithm in float64 as shifted_layer_norm: TVM's mean is an fp32 sum, and InstanceNorm (and GroupNorm,
    which torch's ONNX export writes as InstanceNorm on (N, groups, -1)) subtracts it from x. Mean-1e3 inputs,
    rows of 4096 (InstanceNorm 4x32x64x64) and 16384 (GroupNorm 4x32x64x64, 8 groups): TVM 8.2e-4 and 1.8e-3
    off float64 normwise, PyTorch fp32 2.6e-5 and 4.0e-5 (CPU box, seed 0; tests/test_legalize.py)."""
    ndim = len(x.shape)
    axes = list(range(ndim)) if axes is None else sorted(a % ndim for a in axes)
    n = reduce(lambda a, b: a * b, [x.shape[a] for a in axes]).astype("float64")
    outer_shape = [x.shape[i] for i in range(ndim) if i not in axes]
    zero = x.shape[axes[0]] * 0
    shift = te.compute(outer_shape, lambda *o: x(*_index(o, axes, ndim, lambda j: zero)), name=f"{moment}_shift")
    k = [te.reduce_axis((0, x.shape[a]), name=f"k{a}") for a in axes]
    d = lambda o: (x(*_index(o, axes, ndim, lambda j: k[j])) - shift(*o)).astype("float64")
    if moment == "mean":
        s1 = te.compute(outer_shape, lambda *o: te.sum(d(o), axis=k), name="mean_sum")
        value = lambda o: shift(*o).astype("float64") + s1(*o) / n
    else:
        sum2 = te.comm_reducer(lambda a, b: (a[0] + b[0], a[1] + b[1]),
                               lambda t0, t1: (tirx.const(0, t0), tirx.const(0, t1)), name="sum2")
        s1, s2 = te.compute(outer_shape, lambda *o: sum2((d(o), d(o) * d(o)), axis=k), name=f"{moment}_sums")
        var = lambda o: tirx.max(s2(*o) / n - (s1(*o) / n) * (s1(*o) / n), tirx.const(0, "float64"))
        value = var if moment == "variance" else (lambda o: tirx.sqrt(var(o)))
    if keepdims:
        out_shape = [1 if i in axes else x.shape[i] for i in range(ndim)]
        outer = lambda idx: [idx[i] for i in range(ndim) if i not in axes]
    else:
        out_shape, outer = outer_shape, list
    return te.compute(out_shape, lambda *idx: value(outer(idx)).astype(x.dtype), name=f"T_{moment}")


def _moment(moment: str):
    def legalize(bb, call):
        x = call.args[0]
        dims = getattr(x.ty.shape, "values", None)  # None: the rank or shape is not known here
        shape = [int(d) if isinstance(d, tirx.IntImm) else None for d in dims or []]
        axes = None if call.attrs.axis is None else [int(a) for a in call.attrs.axis]
        reduced = [shape[a] for a in (range(len(shape)) if axes is None else axes)] if dims is not None else [None]
        if "float" not in str(x.ty.dtype) or None in reduced or 0 in reduced:
            return tvm.ir.Op.get(f"relax.{moment}").get_attr("FLegalize")(bb, call)  # TVM's own
        return bb.call_te(lambda x: shifted_moments(x, axes, bool(call.attrs.keepdims), moment), x,
                          primfunc_name_hint=moment)
    return legalize


LEGALIZE_MAP = {"relax.nn.layer_norm": _layer_norm, "relax.nn.group_norm": _group_norm, "relax.mean": _moment("mean"),
                "relax.variance": _moment("variance"), "relax.std": _moment("std")}
