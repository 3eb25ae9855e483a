"""Our layer_norm lowering against TVM's own, both against PyTorch in float64 on mean-1e3 rows."""
import torch
import tvm
from tvm import relax

from conftest import ROOT
from schedsearch import frontend, target as targets, workload
from schedsearch.runtime import CompiledModule


def test_layer_norm_lowering_survives_a_large_mean(tmp_path):
    wl = workload.load(ROOT / "workloads/level1/layernorm.py", "small")
    mod = frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "m.onnx"))
    target = targets.resolve("llvm")
    ours = CompiledModule(frontend.compile_module(mod, target, None), "cpu")
    with target, tvm.transform.PassContext(opt_level=3):
        stock = CompiledModule(relax.build(relax.get_pipeline("zero")(mod), target=target), "cpu")
    x = torch.randn(*wl.input_specs[0][0], generator=torch.Generator().manual_seed(0)) + 1e3
    ref = torch.nn.functional.layer_norm(x.double(), x.shape[1:])
    error = lambda y: float((y.double() - ref).abs().max())
    assert error(ours(x)[0]) < 1e-6
    assert error(stock(x)[0]) > 1e-4  # TVM's E[x^2]-E[x]^2: if this fails, TVM fixed it


def test_mean_and_variance_lowerings_survive_a_large_mean(tmp_path, write_problem):
    """GroupNorm (torch's ONNX export: InstanceNorm on (N, groups, -1)) and InstanceNorm subtract relax.mean
    from x: TVM's fp32 sum for it was 1.8e-3 and 8.2e-4 off float64 normwise on mean-1e3 inputs, PyTorch fp32
    4e-5. A plain mean (no keepdims) takes the same lowering."""
    path = write_problem(
        "class Model(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.gn, self.inorm = nn.GroupNorm(4, 16), nn.InstanceNorm2d(16)\n"
        "    def forward(self, x):\n"
        "        return self.gn(x), self.inorm(x), x.mean(dim=(1, 3))\n"
        "def get_inputs():\n"
        "    return [torch.randn(2, 16, 32, 32)]\n"
        "def get_init_inputs():\n"
        "    return []\n")
    wl = workload.load(path)
    mod = frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "m.onnx"), wl.shapes())
    target = targets.resolve("llvm")
    ours = CompiledModule(frontend.compile_module(mod, target, None), "cpu")
    with target, tvm.transform.PassContext(opt_level=3):
        stock = CompiledModule(relax.build(relax.get_pipeline("zero")(mod), target=target), "cpu")
    x = torch.randn(*wl.input_specs[0][0], generator=torch.Generator().manual_seed(0)) + 1e3
    refs = wl.reference([x], float64=True)
    error = lambda ys: [float((y.double() - r).norm() / r.norm()) for y, r in zip(ys, refs)]
    assert max(error(ours(x))) < 3e-5  # the mean itself rounded to fp32 before x - mean: 1.7e-5 here
    assert min(error(stock(x))[:2]) > 1e-4  # TVM's fp32 sums: if this fails, TVM fixed them


def test_group_norm_lowering_survives_a_large_mean():
    """ONNX GroupNormalization imports as relax.nn.group_norm; TVM's lowering (E[x^2]-E[x]^2 in fp32) gave NaN."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper
    from tvm.relax.frontend.onnx import from_onnx

    n, c, h, w, groups = 2, 8, 16, 16, 2
    scale, bias = np.linspace(0.5, 2, c), np.linspace(-1, 1, c)
    graph = helper.make_graph(
        [helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], epsilon=1e-5, num_groups=groups)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, c, h, w])],
        [helper.make_tensor("s", TensorProto.FLOAT, [c], scale), helper.make_tensor("b", TensorProto.FLOAT, [c], bias)])
    mod = from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), keep_params_in_input=False)
    target = targets.resolve("llvm")
    ours = CompiledModule(frontend.compile_module(mod, target, None), "cpu")
    with target, tvm.transform.PassContext(opt_level=3):
        stock = CompiledModule(relax.build(relax.get_pipeline("zero")(mod), target=target), "cpu")
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0)) + 1e3
    ref = torch.nn.functional.group_norm(x.double(), groups, torch.tensor(scale), torch.tensor(bias), eps=1e-5)
    error = lambda y: float((y.double() - ref).norm() / ref.norm())
    assert error(ours(x)[0]) < 1e-6
    assert not error(stock(x)[0]) < 1e-4  # NaN or far off: if this fails, TVM fixed it
