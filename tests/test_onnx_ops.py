"""Ops that TVM's ONNX importer (SoftmaxCrossEntropyLoss, NegativeLogLikelihoodLoss) or torch.onnx (cumprod) lacks,
decomposed, against PyTorch; Python scalars among get_inputs()."""
import onnx
import torch

from schedsearch import frontend, target as targets, workload
from schedsearch.runtime import CompiledModule


def compiled(wl, onnx_path) -> CompiledModule:
    return CompiledModule(frontend.compile_module(frontend.import_onnx(onnx_path, wl.shapes()),
                                                  targets.resolve("llvm"), None), "cpu")


def assert_module_matches_pytorch(wl, onnx_path) -> None:
    inputs = wl.make_inputs()
    for ours, ref in zip(compiled(wl, onnx_path)(*inputs), wl.reference(inputs), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_cross_entropy_and_nll_are_decomposed_into_supported_ops(tmp_path, write_problem):
    path = write_problem(
        "F = torch.nn.functional\n"
        "class Model(nn.Module):\n"
        "    def forward(self, scores, target):\n"
        "        w = torch.linspace(0.5, 2.0, 10)\n"
        "        return (F.cross_entropy(scores, target), F.cross_entropy(scores, target, weight=w, ignore_index=3),\n"
        "                F.nll_loss(F.log_softmax(scores, 1), target, reduction='sum'),\n"
        "                F.cross_entropy(scores, target, reduction='none'))\n"
        "def get_inputs():\n"
        "    target = torch.randint(0, 10, (64,))\n"
        "    target[::5] = 3\n"
        "    return [torch.randn(64, 10), target]\n"
        "def get_init_inputs():\n"
        "    return []\n")
    wl = workload.load(path)
    onnx_path = frontend.export_onnx(wl, tmp_path / "m.onnx")
    exported = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert {"SoftmaxCrossEntropyLoss", "NegativeLogLikelihoodLoss"} <= exported  # what the test is about
    assert_module_matches_pytorch(wl, onnx_path)


def test_a_tensor_attribute_reassigned_in_forward_exports_as_a_buffer(tmp_path, write_problem):
    """KernelBench's level-3 VanillaRNN keeps its hidden state in a plain tensor attribute and reassigns it."""
    path = write_problem(
        "class Model(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.hidden = torch.randn(4, 8)\n"
        "        self.i2h = nn.Linear(16, 8)\n"
        "    def forward(self, x, initial_hidden):\n"
        "        self.hidden.copy_(initial_hidden)\n"
        "        self.hidden = torch.tanh(self.i2h(torch.cat((x, self.hidden), dim=1)))\n"
        "        return self.hidden * 2\n"
        "def get_inputs():\n"
        "    return [torch.rand(4, 8), torch.rand(4, 8)]\n"
        "def get_init_inputs():\n"
        "    return []\n")
    wl = workload.load(path)
    onnx_path = frontend.export_onnx(wl, tmp_path / "m.onnx")
    assert_module_matches_pytorch(wl, onnx_path)


def test_state_a_forward_accumulates_is_compiled_and_checked_as_its_first_call(tmp_path, write_problem):
    path = write_problem(
        "class Model(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.total = torch.ones(2, 3)\n"
        "    def forward(self, x):\n"
        "        self.total.add_(x)\n"
        "        return torch.tanh(self.total)\n"
        "def get_inputs():\n"
        "    return [torch.rand(2, 3)]\n"
        "def get_init_inputs():\n"
        "    return []\n")
    wl = workload.load(path)
    x = wl.make_inputs()
    first = wl.reference(x)[0]
    torch.testing.assert_close(wl.reference(x)[0], first)  # not tanh(1 + 2x): each call starts as loaded
    wl.model(*x)  # as eager timing runs it: the export still starts from the loaded state
    onnx_path = frontend.export_onnx(wl, tmp_path / "m.onnx")
    module = compiled(wl, onnx_path)
    torch.testing.assert_close(module(*x)[0], first, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first, torch.tanh(1 + x[0]))


def test_python_scalars_among_the_inputs_are_fixed_at_their_values(tmp_path, write_problem):
    path = write_problem(
        "class Model(nn.Module):\n"
        "    def forward(self, A, s):\n"
        "        return A * s\n"
        "def get_inputs():\n"
        "    return [torch.randn(4, 8), 3.5]\n"
        "def get_init_inputs():\n"
        "    return []\n")
    wl = workload.load(path)
    assert wl.input_specs == [((4, 8), torch.float32)]
    a = wl.make_inputs()[0]
    torch.testing.assert_close(wl.reference([a])[0], a * 3.5)
    frontend.import_onnx(frontend.export_onnx(wl, tmp_path / "m.onnx"), wl.shapes())  # exports, imports


def test_cumprod_is_exported_and_compiled(tmp_path, write_problem):
    path = write_problem(
        "class Model(nn.Module):\n"
        "    def forward(self, x):\n"
        "        return torch.cumprod(x, dim=1), torch.cumprod(x, dim=-1)\n"
        "def get_inputs():\n"
        "    return [torch.randn(3, 7, 5)]\n"
        "def get_init_inputs():\n"
        "    return []\n")
    wl = workload.load(path)
    assert_module_matches_pytorch(wl, frontend.export_onnx(wl, tmp_path / "m.onnx"))
