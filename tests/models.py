"""Modules more than one test file uses."""

import torch
from torch import nn


def rand_weight(h: int, seed: int = 1234) -> nn.Parameter:
    return nn.Parameter(torch.randn(h, generator=torch.Generator().manual_seed(seed)) * 0.5 + 1.0)


class HFLlama(nn.Module):
    """transformers' LlamaRMSNorm (also Mistral, Qwen2)."""

    def __init__(self, h: int, eps: float = 1e-6):
        super().__init__()
        self.weight = rand_weight(h)
        self.variance_epsilon = eps

    def forward(self, x):
        input_dtype = x.dtype
        h = x.to(torch.float32)
        v = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(v + self.variance_epsilon)
        return self.weight * h.to(input_dtype)
