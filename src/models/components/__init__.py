"""Reusable building blocks of decoder-only transformers (see README.md in this folder)."""

from .attention.backends import attend, build_attention_mask
from .attention.grouped_query import GroupedQueryAttention
from .attention.kv_cache import KVCache
from .attention.multi_head import MultiHeadAttention
from .dispatch import KernelConfig, get_kernel
from .embeddings.learned import LearnedPositionalEmbedding
from .embeddings.rotary import RotaryEmbedding, apply_rotary_ref, compute_inv_freq
from .linear import (
    Linear,
    attach_weight_copies,
    compute_weight,
    gradient_copies,
    matmul_weight,
    refresh_weight_copies,
    weight_copies,
)
from .loss import IGNORE_INDEX, LMLoss, cross_entropy_ref, fused_linear_cross_entropy_ref
from .mlp import GeluMLP, SwiGLU, swiglu_ref
from .norms import LayerNorm, RMSNorm, layer_norm_ref, rms_norm_ref

__all__ = [
    "GeluMLP",
    "GroupedQueryAttention",
    "IGNORE_INDEX",
    "KVCache",
    "KernelConfig",
    "LMLoss",
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "Linear",
    "MultiHeadAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "apply_rotary_ref",
    "attach_weight_copies",
    "attend",
    "build_attention_mask",
    "compute_inv_freq",
    "compute_weight",
    "gradient_copies",
    "matmul_weight",
    "cross_entropy_ref",
    "fused_linear_cross_entropy_ref",
    "get_kernel",
    "layer_norm_ref",
    "refresh_weight_copies",
    "rms_norm_ref",
    "swiglu_ref",
    "weight_copies",
]
