"""Transformer MLP block Linear(1024 -> 4096) -> GELU(tanh) -> Linear(4096 -> 1024) on 4 x 512 = 2048 tokens."""
import torch
import torch.nn as nn

BATCH = 4
SEQ_LEN = 512
HIDDEN = 1024
EXPANSION = 4

SIZES = {"small": {"BATCH": 1, "SEQ_LEN": 16, "HIDDEN": 32}}


class Model(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.up = nn.Linear(hidden, intermediate)
        self.gelu = nn.GELU(approximate="tanh")
        self.down = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gelu(self.up(x)))


def get_inputs():
    return [torch.randn(BATCH, SEQ_LEN, HIDDEN)]


def get_init_inputs():
    return [HIDDEN, EXPANSION * HIDDEN]
