"""Softmax over dim 1 of a 4096x65536 fp32 matrix (KernelBench level1 problem 23, dim cut from 393216 to 65536 to keep it at 1 GiB)."""
import torch
import torch.nn as nn

BATCH = 4096
DIM = 65536

SIZES = {"small": {"BATCH": 8, "DIM": 256}}


class Model(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=1)


def get_inputs():
    return [torch.randn(BATCH, DIM)]


def get_init_inputs():
    return []
