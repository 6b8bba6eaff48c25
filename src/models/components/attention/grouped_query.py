"""Grouped-query attention (GQA; MQA when there is one key/value head) with RoPE and a KV cache.

Used by Qwen2 / Llama-style models. q, k and v come from one fused projection; RoPE is applied to
q and k (through the `rope` kernel toggle) at the positions given by the caller, so packed
documents (kept apart by `documents`) and left-padded batches work; new keys/values are written
into the cache after rotation. An optional sliding window limits how far back a query looks.
"""

from __future__ import annotations

import torch
from torch import nn

from ..dispatch import get_kernel
from ..linear import Linear
from .backends import attend
from .documents import PackedDocuments
from .kv_cache import KVCache


class GroupedQueryAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        out_bias: bool = False,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        backend: str = "auto",
        rope_impl: str = "torch",
        linear_impl: str = "torch",
        layer_idx: int = 0,
    ):
        super().__init__()
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_head ({n_heads}) must be a multiple of num_kv_heads ({n_kv_heads})")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim or dim // n_heads
        self.q_size = n_heads * self.head_dim
        self.kv_size = n_kv_heads * self.head_dim
        self.sliding_window = sliding_window
        self.backend = backend
        self.dropout = dropout
        self.layer_idx = layer_idx
        # No column of ones for the bias gradient here (MultiHeadAttention has one): not measured on
        # Qwen2, whose qkv bias sum is small (8192 x 1152 per layer at 4 x 2048).
        self.qkv = Linear(dim, self.q_size + 2 * self.kv_size, bias=qkv_bias, impl=linear_impl)
        self.o_proj = Linear(self.q_size, dim, bias=out_bias, impl=linear_impl)
        self._rope = get_kernel("rope", rope_impl)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        documents: PackedDocuments | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, Hq, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = self._rope(q, k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, T_past + T, Hkv, D)
        dropout_p = self.dropout if self.training else 0.0
        y = attend(
            q,
            k,
            v,
            backend=self.backend,
            causal=True,
            sliding_window=self.sliding_window,
            mask=mask,
            dropout_p=dropout_p,
            documents=documents,
        )
        return self.o_proj(y.reshape(B, T, self.q_size))  # (B, T, Hq * D) -> (B, T, dim)
