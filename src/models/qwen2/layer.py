"""Qwen2 transformer block: RMSNorm pre-norm, GQA + RoPE, RMSNorm, SwiGLU, two residual adds.

Qwen2 uses no dropout on the residual stream (only optional attention dropout).
"""

from __future__ import annotations

import torch
from torch import nn

from ..components import KernelConfig, KVCache, RMSNorm, SwiGLU
from ..components.attention.documents import PackedDocuments
from .attention import Qwen2Attention
from .config import Qwen2Config


class Qwen2Block(nn.Module):
    def __init__(self, config: Qwen2Config, layer_idx: int, kernels: KernelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps, impl=kernels.rmsnorm)
        self.self_attn = Qwen2Attention(config, layer_idx, kernels)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.rms_norm_eps, impl=kernels.rmsnorm)
        self.mlp = SwiGLU(
            config.n_embd, config.ffn_dim, config.hidden_act, bias=False, impl=kernels.swiglu, linear_impl=kernels.linear
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        documents: PackedDocuments | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask=mask, kv_cache=kv_cache, documents=documents)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x
