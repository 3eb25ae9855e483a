"""Load a workload: a KernelBench-format problem file or an ONNX file.

A KernelBench file defines `Model`, `get_inputs()` and `get_init_inputs()`. Ours may also
define `SIZES = {"small": {"CONST": value, ...}}`: the loader overrides those module globals
before calling `get_init_inputs()`/`get_inputs()`, so one file serves CPU tests and real runs.
get_inputs() may return Python scalars beside the tensors: they are fixed at their values (FixedScalars).
It may define `INPUT_DOMAINS = ["positive", "real", ...]`, one per input of get_inputs(): validation then
draws that input in that domain (validate.DOMAINS), e.g. positive where the program takes its log.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import UserError


@dataclass
class Workload:
    name: str
    path: Path
    size: str
    make_inputs: Callable[[], list[torch.Tensor]]  # fresh example inputs (random, like get_inputs)
    model: torch.nn.Module | None = None  # None for ONNX files: the reference is onnxruntime
    onnx_path: Path | None = None
    input_names: list[str] = field(default_factory=list)
    input_specs: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)
    input_domains: list[str] = field(default_factory=list)  # validate.DOMAINS name per input ("real" if undeclared)
    initial_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the model's buffers as loaded

    def __post_init__(self):
        self.input_domains = self.input_domains or ["real"] * len(self.input_specs)

    def reset_state(self) -> None:
        """The model's buffers back to their values at load. A forward that changes its module's state (an RNN's
        hidden state) is exported, and checked, as its first call: every reference call starts from that state."""
        for name, value in self.initial_state.items():
            prefix, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(prefix)
            now = module._buffers.get(leaf)
            module._buffers[leaf] = value.clone().to(now.device if now is not None else value.device)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()

    @property
    def weights_sha256(self) -> str | None:
        """Fingerprint of the weights compiled into a module built from this workload."""
        if self.model is None:
            return None
        h = hashlib.sha256()
        for name, t in self.model.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def shapes(self) -> dict[str, list[int]]:
        return {n: list(s) for n, (s, _) in zip(self.input_names, self.input_specs)}

    def reference(self, inputs: list[torch.Tensor], float64: bool = False) -> list[torch.Tensor]:
        """Outputs of the original program (PyTorch module, or onnxruntime for ONNX files).
        `float64`: the PyTorch module run in double precision on upcast inputs (None for ONNX files)."""
        if self.model is not None:
            self.reset_state()
            model = self.model.to(inputs[0].device)
            if float64:
                model = copy.deepcopy(model).double()
                inputs = [t.double() if t.is_floating_point() else t for t in inputs]
            with torch.no_grad():
                out = model(*inputs)
            return list(out) if isinstance(out, (tuple, list)) else [out]
        if float64:
            return None
        import onnxruntime as ort

        sess = ort.InferenceSession(str(self.onnx_path), providers=["CPUExecutionProvider"])
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(self.input_names, inputs)}
        return [torch.from_numpy(o).to(inputs[0].device) for o in sess.run(None, feeds)]


def load(path: str | Path, size: str = "default", input_shapes: dict[str, tuple[int, ...]] | None = None) -> Workload:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: expected a KernelBench .py problem file or an .onnx file")
    if not path.is_file():
        path = _builtin_fallback(path)
    if not path.is_file():
        raise UserError(f"workload file not found: {path}")
    if path.suffix == ".onnx":
        return _load_onnx(path, input_shapes or {})
    if path.suffix != ".py":
        raise UserError(f"{path}: expected a KernelBench .py problem file or an .onnx file")
    return _load_kernelbench(path, size)


def _load_kernelbench(path: Path, size: str) -> Workload:
    name = f"_schedsearch_workload_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"{path}: raised {type(e).__name__} on import: {e}") from e
    missing = [n for n in ("Model", "get_inputs", "get_init_inputs") if not hasattr(module, n)]
    if missing:
        raise UserError(f"{path}: not a KernelBench problem file: no {', '.join(missing)} defined")
    if size != "default":
        sizes = getattr(module, "SIZES", {})
        if size not in sizes:
            raise UserError(f"{path}: no size {size!r} (SIZES defines: {', '.join(sizes) or 'none'})")
        for k, v in sizes[size].items():
            setattr(module, k, v)
    try:
        # Seeded: a Model that draws its weights at random must draw the same ones every time it is
        # loaded (tune, export, run --check), or a module would be checked against another model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = tensor_attributes_as_buffers(module.Model(*module.get_init_inputs()).eval())
        inputs = module.get_inputs()
    except Exception as e:
        raise UserError(f"{path}: building the model or its inputs failed: {type(e).__name__}: {e}") from e
    if not inputs or not all(isinstance(t, (torch.Tensor, bool, int, float)) for t in inputs) or not any(
            isinstance(t, torch.Tensor) for t in inputs):
        raise UserError(f"{path}: get_inputs() must return a non-empty list of tensors (and Python scalars)")
    if not all(isinstance(t, torch.Tensor) for t in inputs):
        model = FixedScalars(model, inputs)
    first = inputs

    def make_inputs() -> list[torch.Tensor]:
        nonlocal first
        out, first = (first if first is not None else module.get_inputs()), None  # loading's tensors, once
        return [t for t in out if isinstance(t, torch.Tensor)]

    inputs = [t for t in inputs if isinstance(t, torch.Tensor)]
    return Workload(path.stem, path, size, make_inputs, model=model,
                    initial_state={n: b.detach().clone() for n, b in model.named_buffers()},
                    input_names=[f"input{i}" for i in range(len(inputs))],
                    input_specs=[(tuple(t.shape), t.dtype) for t in inputs],
                    input_domains=_input_domains(path, getattr(module, "INPUT_DOMAINS", None), len(inputs)))


def tensor_attributes_as_buffers(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with each plain tensor attribute (`self.hidden = torch.randn(...)`, not a parameter or buffer) made
    a non-persistent buffer, in place: it moves with the model, Workload.reset_state restores it, and torch.export
    takes a forward that reassigns it, which it refuses for a plain attribute ("Constant hidden is mutated in the
    forward method. Pls register it as buffer": KernelBench's level-3 VanillaRNN)."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                delattr(module, name)
                module.register_buffer(name, value, persistent=False)
    return model


class FixedScalars(torch.nn.Module):
    """The model with get_inputs()'s Python scalars (KernelBench's matrix-scalar multiplication: A and a float)
    fixed at the values of the loading call: TVM compiles for them as constants, as for the shapes; the
    workload's inputs are the tensors."""

    def __init__(self, model: torch.nn.Module, args: list):
        super().__init__()
        self.model = model
        self.scalars = [None if isinstance(a, torch.Tensor) else a for a in args]

    def forward(self, *tensors):
        given = iter(tensors)
        return self.model(*[next(given) if s is None else s for s in self.scalars])


def _input_domains(path: Path, declared, n_inputs: int) -> list[str]:
    from .validate import DOMAINS

    if declared is None:
        return ["real"] * n_inputs
    if not isinstance(declared, (list, tuple)) or len(declared) != n_inputs:
        raise UserError(f"{path}: INPUT_DOMAINS must be a list with one domain per input of get_inputs() "
                        f"({n_inputs}), got {declared!r}")
    unknown = [d for d in declared if d not in DOMAINS]
    if unknown:
        raise UserError(f"{path}: INPUT_DOMAINS: unknown domain {unknown[0]!r} (known: {', '.join(DOMAINS)})")
    return list(declared)


_ONNX_DTYPES = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16, 11: torch.float64,
                7: torch.int64, 6: torch.int32, 9: torch.bool}


def _load_onnx(path: Path, input_shapes: dict[str, tuple[int, ...]]) -> Workload:
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:
        raise UserError(f"{path}: not a readable ONNX model: {e}") from e
    inits = {i.name for i in graph.initializer}
    specs = []
    for inp in graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if inp.name in input_shapes:
            given = list(input_shapes[inp.name])
            if len(given) != len(dims) or any(d not in (None, 0, g) for d, g in zip(dims, given)):
                raise UserError(f"{path}: --input-shape {inp.name}={','.join(map(str, given))} does not fit "
                                f"the model's shape {['?' if not d else d for d in dims]}")
            dims = given
        if any(d is None or d <= 0 for d in dims):
            raise UserError(f"{path}: input {inp.name!r} has a dynamic shape {dims}: "
                            f"give it with --input-shape {inp.name}=D0,D1,...")
        if t.elem_type not in _ONNX_DTYPES:
            raise UserError(f"{path}: input {inp.name!r} has an unsupported ONNX dtype {t.elem_type}")
        specs.append((inp.name, tuple(dims), _ONNX_DTYPES[t.elem_type]))
    unknown = set(input_shapes) - {n for n, _, _ in specs}
    if unknown:
        raise UserError(f"{path}: --input-shape names unknown inputs: {', '.join(sorted(unknown))}")

    def make_inputs() -> list[torch.Tensor]:
        return [torch.randn(s).to(d) if d.is_floating_point else torch.randint(0, 2, s, dtype=d)
                for _, s, d in specs]

    return Workload(path.stem, path, "default", make_inputs, onnx_path=path,
                    input_names=[n for n, _, _ in specs], input_specs=[(s, d) for _, s, d in specs])


def builtin_root() -> Path:
    """The built-in workloads: in an installed wheel the package data schedsearch/workloads/, in a
    source checkout (pip install -e) the repository's workloads/ beside the package."""
    here = Path(__file__).resolve().parent
    packaged = here / "workloads"
    return packaged if packaged.is_dir() else here.parent / "workloads"


def builtin_workloads(root: Path | None = None) -> list[Path]:
    return sorted((root or builtin_root()).glob("level*/*.py"))


def _builtin_fallback(path: Path) -> Path:
    """`workloads/level1/softmax.py` (the README's spelling) names the built-in file where no such
    file is here, e.g. outside a source checkout with schedsearch installed from a wheel."""
    parts = path.parts
    if not path.is_absolute() and len(parts) == 3 and parts[0] == "workloads":
        builtin = builtin_root().joinpath(*parts[1:])
        if builtin.is_file():
            return builtin
    return path
