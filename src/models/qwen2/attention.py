"""Qwen2 attention: grouped-query attention with RoPE, q/k/v biases and an optional sliding window."""

from __future__ import annotations

from ..components import GroupedQueryAttention, KernelConfig
from .config import Qwen2Config


class Qwen2Attention(GroupedQueryAttention):
    def __init__(self, config: Qwen2Config, layer_idx: int, kernels: KernelConfig):
        super().__init__(
            dim=config.n_embd,
            n_heads=config.n_head,
            n_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            qkv_bias=config.qkv_bias,
            out_bias=False,
            dropout=config.attention_dropout,
            sliding_window=config.layer_windows[layer_idx],
            backend=kernels.attention,
            rope_impl=kernels.rope,
            linear_impl=kernels.linear,
            layer_idx=layer_idx,
        )
