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
