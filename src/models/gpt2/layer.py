"""GPT-2 transformer block: pre-norm, x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

from __future__ import annotations

import torch
from torch import nn

from ..components import GeluMLP, KernelConfig, KVCache, LayerNorm
from ..components.attention.documents import PackedDocuments
from .attention import GPT2Attention
from .config import GPT2Config


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int, kernels: KernelConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_eps, bias=config.bias, impl=kernels.layernorm)
        self.attn = GPT2Attention(config, layer_idx, backend=kernels.attention, linear_impl=kernels.linear)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_eps, bias=config.bias, impl=kernels.layernorm)
        self.mlp = GeluMLP(
            config.n_embd, config.ffn_dim, config.activation, bias=config.bias, dropout=config.resid_pdrop,
            linear_impl=kernels.linear, impl=kernels.gelu,
        )  # fmt: skip

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        documents: PackedDocuments | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask=mask, kv_cache=kv_cache, documents=documents)
        x = x + self.mlp(self.ln_2(x))
        return x
