"""Square fp32 matmul C = A @ B, N=4096 (KernelBench level1 problem 1, 1_Square_matrix_multiplication_)."""
import torch
import torch.nn as nn

N = 4096

SIZES = {"small": {"N": 128}, "2048": {"N": 2048}}  # 2048: the throughput benchmark's


class Model(nn.Module):
    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.matmul(A, B)


def get_inputs():
    return [torch.randn(N, N), torch.randn(N, N)]


def get_init_inputs():
    return []
