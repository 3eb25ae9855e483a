"""AlexNet stem: Conv2d(3, 96, 11, stride 4, padding 2) -> ReLU -> MaxPool2d(3, stride 2) on 100x3x224x224 (conv from KernelBench level1 problem 50; ReLU+pool as in AlexNet)."""
import torch
import torch.nn as nn

BATCH = 100
IN_CHANNELS = 3
OUT_CHANNELS = 96
HEIGHT = 224
WIDTH = 224
KERNEL_SIZE = 11
STRIDE = 4
PADDING = 2
POOL_KERNEL_SIZE = 3
POOL_STRIDE = 2

SIZES = {"small": {"BATCH": 2, "OUT_CHANNELS": 16, "HEIGHT": 32, "WIDTH": 32}}


class Model(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int,
                 pool_kernel_size: int, pool_stride: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride, padding=padding)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(kernel_size=pool_kernel_size, stride=pool_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.conv(x)))


def get_inputs():
    return [torch.randn(BATCH, IN_CHANNELS, HEIGHT, WIDTH)]


def get_init_inputs():
    return [IN_CHANNELS, OUT_CHANNELS, KERNEL_SIZE, STRIDE, PADDING, POOL_KERNEL_SIZE, POOL_STRIDE]
