"""GPT-2 attention: the component multi-head attention, configured from a GPT2Config."""

from __future__ import annotations

from ..components import MultiHeadAttention
from .config import GPT2Config


class GPT2Attention(MultiHeadAttention):
    """Causal multi-head attention with attention/residual dropout, as in GPT-2."""

    def __init__(self, config: GPT2Config, layer_idx: int, backend: str = "auto", linear_impl: str = "torch"):
        super().__init__(
            dim=config.n_embd,
            n_heads=config.n_head,
            bias=config.bias,
            dropout=config.attn_pdrop,
            resid_dropout=config.resid_pdrop,
            backend=backend,
            linear_impl=linear_impl,
            layer_idx=layer_idx,
        )
