"""RMSNorm with a learned scale over hidden 4096 (Llama-7B width) for 16 x 2048 tokens, written out in elementwise ops."""
import torch
import torch.nn as nn

BATCH = 16
SEQ_LEN = 2048
HIDDEN = 4096
EPS = 1e-6

SIZES = {"small": {"BATCH": 2, "SEQ_LEN": 8, "HIDDEN": 64}}


class Model(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        # Random rather than ones, so a kernel that drops the scale fails the comparison.
        self.weight = nn.Parameter(torch.randn(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Written out: nn.RMSNorm exports to ONNX RMSNormalization, which TVM's importer may lack.
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def get_inputs():
    return [torch.randn(BATCH, SEQ_LEN, HIDDEN)]


def get_init_inputs():
    return [HIDDEN, EPS]
