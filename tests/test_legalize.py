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
