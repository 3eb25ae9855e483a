"""A compiled Relax module as a callable: torch tensors in, torch tensors out, by DLPack (no copies)."""
from __future__ import annotations

import torch
import tvm
import tvm_ffi
from tvm import relax


class CompiledModule:
    def __init__(self, executable, device: str):
        self.device = device
        self.vm = relax.VirtualMachine(executable, tvm.runtime.device(device))  # "cpu", "cuda", "cuda:0"
        self._main = self.vm["main"]

    def __call__(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        out = self._main(*[tvm.runtime.from_dlpack(t) for t in inputs])
        outs = list(out) if isinstance(out, (tuple, list, tvm_ffi.Array)) else [out]
        self._last = outs  # keep TVM's buffers alive at least until the next call
        return [torch.from_dlpack(o) for o in outs]
