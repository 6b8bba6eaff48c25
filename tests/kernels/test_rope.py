"""RoPE on q and k against `apply_rotary_ref`: GQA head counts, per-batch positions, strided views."""

import pytest
import torch

from kernels.rope import apply_rotary
from src.models.components.embeddings.rotary import RotaryEmbedding, apply_rotary_ref

from .helpers import DEVICE, DTYPES, assert_close, leaf, needs_triton

pytestmark = needs_triton


def _run(fn, q, k, cos, sin, dq, dk):
    q, k = leaf(q), leaf(k)
    q_out, k_out = fn(q, k, cos, sin)
    torch.autograd.backward([q_out, k_out], [dq, dk])
    return q_out, k_out, q.grad, k.grad


def _check(q, k, cos, sin, dtype):
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    got, want = _run(apply_rotary, q, k, cos, sin, dq, dk), _run(apply_rotary_ref, q, k, cos, sin, dq, dk)
    for name, g, w in zip(("q", "k", "dq", "dk"), got, want):
        assert g.dtype == w.dtype, name
        assert_close(g, w, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q_heads,n_kv_heads,head_dim", [(4, 2, 16), (7, 1, 10), (3, 3, 64)])
def test_rope_matches_reference(n_q_heads, n_kv_heads, head_dim, dtype):
    B, T = 2, 5
    rotary = RotaryEmbedding(head_dim, 10000.0, max_position=32).to(DEVICE)
    cos, sin = rotary(seq_len=T, offset=3)  # (1, T, D), shared by the batch
    q = torch.randn(B, T, n_q_heads, head_dim, device=DEVICE, dtype=dtype)
    k = torch.randn(B, T, n_kv_heads, head_dim, device=DEVICE, dtype=dtype)
    _check(q, k, cos, sin, dtype)


def test_rope_per_batch_positions():
    """position_ids (B, T), e.g. packed documents: cos/sin differ per batch row."""
    rotary = RotaryEmbedding(16, 10000.0, max_position=64).to(DEVICE)
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10]], device=DEVICE)
    cos, sin = rotary(position_ids)  # (B, T, D)
    q, k = torch.randn(2, 6, 4, 16, device=DEVICE), torch.randn(2, 6, 2, 16, device=DEVICE)
    _check(q, k, cos, sin, torch.float32)


def test_rope_on_views_of_a_fused_projection():
    """q and k as views of one qkv tensor (the model's layout), not contiguous."""
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 8
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEVICE)
    q, k, _ = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=-1)
    q, k = q.view(B, T, Hq, D), k.view(B, T, Hkv, D)
    assert not q.is_contiguous()
    cos, sin = RotaryEmbedding(D, 10000.0, max_position=8).to(DEVICE)(seq_len=T)
    got, want = apply_rotary(q, k, cos, sin), apply_rotary_ref(q, k, cos, sin)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


def test_rope_rejects_odd_head_dim_and_bad_cos():
    q, k = torch.randn(1, 2, 2, 5, device=DEVICE), torch.randn(1, 2, 1, 5, device=DEVICE)
    cos = torch.randn(1, 2, 5, device=DEVICE)
    with pytest.raises(ValueError, match="must be even"):
        apply_rotary(q, k, cos, cos)
    q, k = torch.randn(1, 2, 2, 4, device=DEVICE), torch.randn(1, 2, 1, 4, device=DEVICE)
    with pytest.raises(ValueError, match="cos/sin must be"):
        apply_rotary(q, k, torch.randn(1, 3, 4, device=DEVICE), torch.randn(1, 3, 4, device=DEVICE))


@pytest.mark.gpu
def test_rope_real_sizes_gpu():
    B, T, Hq, Hkv, D = 8, 2048, 14, 2, 64
    rotary = RotaryEmbedding(D, 1e6, max_position=T).to("cuda")
    cos, sin = rotary(seq_len=T)
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    _check(q, k, cos, sin, torch.bfloat16)
