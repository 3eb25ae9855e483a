"""ONNX operators TVM 0.27's importer lacks, rewritten into ones it has before the import.

torch.onnx writes F.cross_entropy as SoftmaxCrossEntropyLoss and F.nll_loss as NegativeLogLikelihoodLoss;
the importer refuses both ("not supported for frontend ONNX"). Each becomes what the ONNX operator's
definition computes: LogSoftmax over axis 1 (cross entropy), the target class's log-probability picked
with GatherElements and negated, times the class weight, ignored targets counting for nothing, then
reduced (mean: divided by the summed weights of the counted targets, or by their number).

torch.onnx cannot export torch.cumprod at all ("No ONNX function found for prims.prod"): TORCH_DECOMPOSITIONS
rewrite it in the torch program before the export (frontend.export_onnx).
"""
from __future__ import annotations

import itertools

import onnx
import torch
from onnx import TensorProto, helper


def decompose(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every node of REWRITES replaced, in place in the graph's order, by supported ones."""
    if not any(n.op_type in REWRITES for n in model.graph.node):
        return model
    nodes = []
    for i, node in enumerate(model.graph.node):
        if node.op_type in REWRITES:
            nodes += REWRITES[node.op_type](_Builder(f"_{node.op_type}{i}"), node)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


class _Builder:
    """Nodes with fresh output names under one prefix."""

    def __init__(self, prefix: str):
        self.prefix, self.count, self.nodes = prefix, itertools.count(), []

    def __call__(self, op: str, *inputs: str, out: str | None = None, **attrs) -> str:
        out = out or f"{self.prefix}_{op}{next(self.count)}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    def ints(self, *values: int) -> str:
        name = f"{self.prefix}_const{next(self.count)}"
        return self("Constant", out=name, value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))


def _softmax_cross_entropy(b: _Builder, node) -> list:
    log_prob = node.output[1] if len(node.output) > 1 and node.output[1] else None
    log_prob = b("LogSoftmax", node.input[0], out=log_prob, axis=1)
    return _nll(b, log_prob, list(node.input[1:]), node.output[0], node.attribute)


def _negative_log_likelihood(b: _Builder, node) -> list:
    return _nll(b, node.input[0], list(node.input[1:]), node.output[0], node.attribute)


def _nll(b: _Builder, log_prob: str, rest: list[str], out: str, attributes) -> list:
    attrs = {a.name: helper.get_attribute_value(a) for a in attributes}
    reduction = attrs.get("reduction", b"mean").decode()
    target, weight = rest[0], (rest[1] if len(rest) > 1 and rest[1] else None)
    axis1 = b.ints(1)
    counted = None  # 1 where the target counts, 0 where it is ignore_index (in log_prob's dtype)
    if "ignore_index" in attrs:
        ignored = b("Equal", target, b.ints(attrs["ignore_index"]))
        target = b("Where", ignored, b.ints(0), target)  # an ignored target picks class 0: in range
        counted = b("CastLike", b("Not", ignored), log_prob)
    picked = b("GatherElements", log_prob, b("Unsqueeze", target, axis1), axis=1)
    loss = b("Neg", b("Squeeze", picked, axis1))
    w = b("Gather", weight, target, axis=0) if weight is not None else None
    if counted is not None:
        w = counted if w is None else b("Mul", w, counted)
    if w is not None:
        loss = b("Mul", loss, w)
    if reduction == "none":
        b("Identity", loss, out=out)
    elif reduction == "sum":
        b("ReduceSum", loss, out=out, keepdims=0)
    elif w is None:
        b("ReduceMean", loss, out=out, keepdims=0)
    else:
        b("Div", b("ReduceSum", loss, keepdims=0), b("ReduceSum", w, keepdims=0), out=out)
    return b.nodes


REWRITES = {"SoftmaxCrossEntropyLoss": _softmax_cross_entropy, "NegativeLogLikelihoodLoss": _negative_log_likelihood}


def _cumprod(x: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """out[..., i] = prod(x[..., k] for k <= i) along dim: x repeated over a new axis i, ones where k > i, and
    ReduceProd, which ONNX and TVM have (TVM fuses the mask into the reduction: n^2 multiplies for n values,
    no n x n tensor)."""
    x = x if dtype is None else x.to(dtype)
    dim = dim % x.dim()
    n = x.shape[dim]
    upto = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()  # [i, k]: k <= i
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(upto, x.movedim(dim, -1).unsqueeze(-2), one).prod(-1).movedim(-1, dim)


TORCH_DECOMPOSITIONS = {torch.ops.aten.cumprod.default: _cumprod}


def decompose_program(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with the ops of TORCH_DECOMPOSITIONS rewritten (itself where it has none)."""
    used = {n.target for n in program.graph.nodes if n.op == "call_function"} & set(TORCH_DECOMPOSITIONS)
    return program.run_decompositions({op: TORCH_DECOMPOSITIONS[op] for op in used}) if used else program
