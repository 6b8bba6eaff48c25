"""GPT-2 style multi-head self-attention: one fused qkv projection, causal, output projection.

Every query head has its own key/value head. The score computation is delegated to
`backends.attend` (the configured backend, or the fastest that serves the call under `auto`,
which logs its choice once). `documents` keeps packed documents from attending to each other.
"""

from __future__ import annotations

import torch
from torch import nn

from ..linear import Linear
from .backends import attend
from .documents import PackedDocuments
from .kv_cache import KVCache


class MultiHeadAttention(nn.Module):
    """`dropout`: on the attention probabilities; `resid_dropout`: on the output projection
    (None: the same rate), as GPT-2's attn_pdrop / resid_pdrop."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        bias: bool = True,
        dropout: float = 0.0,
        resid_dropout: float | None = None,
        backend: str = "auto",
        linear_impl: str = "torch",
        layer_idx: int = 0,
    ):
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"n_embd ({dim}) must be divisible by n_head ({n_heads})")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.backend = backend
        self.layer_idx = layer_idx
        self.dropout = dropout
        # Its input is a norm's output, which Inductor writes straight into the padded buffer the
        # bias gradient's column of ones needs (components/linear.py).
        self.qkv = Linear(dim, 3 * dim, bias=bias, impl=linear_impl, ones_column=True)
        self.proj = Linear(dim, dim, bias=bias, impl=linear_impl)
        resid_dropout = dropout if resid_dropout is None else resid_dropout
        self.resid_dropout = nn.Dropout(resid_dropout) if resid_dropout > 0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        documents: PackedDocuments | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)  # (B, T, 3, H, D)
        q, k, v = qkv.unbind(dim=2)  # each (B, T, H, D)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, T_past + T, H, D)
        dropout_p = self.dropout if self.training else 0.0
        y = attend(q, k, v, backend=self.backend, causal=True, mask=mask, dropout_p=dropout_p, documents=documents)
        y = y.reshape(B, T, C)  # (B, T, H * D)
        return self.resid_dropout(self.proj(y))
