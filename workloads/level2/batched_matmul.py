"""Batched matmul as in attention scores: (128, 512, 64) @ (128, 64, 512), i.e. 8 sequences x 16 heads, seq 512, head dim 64."""
import torch
import torch.nn as nn

BATCH = 128
M = 512
K = 64
N = 512

SIZES = {"small": {"BATCH": 4, "M": 32, "K": 16, "N": 32}}


class Model(nn.Module):
    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.bmm(A, B)


def get_inputs():
    return [torch.randn(BATCH, M, K), torch.randn(BATCH, K, N)]


def get_init_inputs():
    return []
