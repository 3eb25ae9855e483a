"""LayerNorm over the last three dims (64,256,256) of a 16x64x256x256 tensor (KernelBench level1 problem 40, same size)."""
import torch
import torch.nn as nn

BATCH = 16
FEATURES = 64
DIM1 = 256
DIM2 = 256

SIZES = {"small": {"BATCH": 2, "FEATURES": 4, "DIM1": 16, "DIM2": 16}}


class Model(nn.Module):
    def __init__(self, normalized_shape: tuple):
        super().__init__()
        self.ln = nn.LayerNorm(normalized_shape=normalized_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)


def get_inputs():
    return [torch.randn(BATCH, FEATURES, DIM1, DIM2)]


def get_init_inputs():
    return [(FEATURES, DIM1, DIM2)]
