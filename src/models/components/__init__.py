"""Reusable building blocks of decoder-only transformers (see README.md in this folder)."""

from .attention.backends import attend, build_attention_mask
from .attention.grouped_query import GroupedQueryAttention
from .attention.kv_cache import KVCache
from .attention.multi_head import MultiHeadAttention
from .dispatch import KernelConfig, get_kernel
from .embeddings.learned import LearnedPositionalEmbedding
from .embeddings.rotary import RotaryEmbedding, apply_rotary_ref, compute_inv_freq
from .loss import IGNORE_INDEX, LMLoss, cross_entropy_ref, fused_linear_cross_entropy_ref
from .mlp import GeluMLP, SwiGLU, swiglu_ref
from .norms import LayerNorm, RMSNorm, layer_norm_ref, rms_norm_ref

__all__ = [
    "IGNORE_INDEX",
    "GeluMLP",
    "GroupedQueryAttention",
    "KVCache",
    "KernelConfig",
    "LMLoss",
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rotary_ref",
    "attend",
    "build_attention_mask",
    "compute_inv_freq",
    "cross_entropy_ref",
    "fused_linear_cross_entropy_ref",
    "get_kernel",
    "layer_norm_ref",
    "rms_norm_ref",
    "swiglu_ref",
]
