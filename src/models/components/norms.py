"""Normalisation layers: LayerNorm (GPT-2) and RMSNorm (Qwen2, Llama).

The functions `layer_norm_ref` and `rms_norm_ref` are the pure-PyTorch references of the kernels
in `kernels/layernorm.py` and `kernels/rmsnorm.py`; the modules pick an implementation once, from
the `kernels:` config, and call it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import get_kernel


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.

    Matches Hugging Face's Qwen2RMSNorm exactly: normalise in fp32, cast back to the input dtype,
    then multiply by the weight (so a bf16 model multiplies in bf16).
    """
    input_dtype = x.dtype
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + eps)
    return weight * x32.to(input_dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add followed by RMSNorm: returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True, impl: str = "torch"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None
        self.impl = impl
        self._fn = get_kernel("layernorm", impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, impl={self.impl}"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, impl: str = "torch"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.impl = impl
        self._fn = get_kernel("rmsnorm", impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, impl={self.impl}"
