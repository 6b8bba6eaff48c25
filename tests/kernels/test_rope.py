"""RoPE on q and k against `apply_rotary_ref`: GQA head counts, per-batch positions, strided views."""

import pytest
import torch

from kernels.rope import apply_rotary, apply_rotary_packed
from src.models.components.embeddings.rotary import RotaryEmbedding, apply_rotary_packed_ref, apply_rotary_ref

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_q_heads,n_kv_heads,head_dim", [(4, 2, 16), (7, 1, 10), (3, 3, 64)])
def test_rope_packed_matches_reference(n_q_heads, n_kv_heads, head_dim, dtype):
    """The packed form: the fused projection's output (B, T, Hq + 2 Hkv, D) in, one new tensor of
    that shape out; the attention's three gradients come back through views of it."""
    B, T = 2, 5
    cos, sin = RotaryEmbedding(head_dim, 10000.0, max_position=32).to(DEVICE)(seq_len=T, offset=2)
    qkv = torch.randn(B, T, n_q_heads + 2 * n_kv_heads, head_dim, device=DEVICE, dtype=dtype)
    # gradients as SDPA returns them: (B, H, T, D) tensors seen as (B, T, H, D)
    grads = [torch.randn(B, h, T, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
             for h in (n_q_heads, n_kv_heads, n_kv_heads)]
    results = []
    for fn in (apply_rotary_packed, apply_rotary_packed_ref):
        x = leaf(qkv)
        out = fn(x, cos, sin, n_q_heads, n_kv_heads)
        views = out.split([n_q_heads, n_kv_heads, n_kv_heads], dim=2)
        torch.autograd.backward(list(views), grads)
        results.append((out, x.grad))
    for name, g, w in zip(("out", "dqkv"), *results):
        assert g.shape == w.shape == qkv.shape and g.dtype == w.dtype, name
        assert_close(g, w, dtype, name)
    assert torch.equal(results[0][0][:, :, n_q_heads + n_kv_heads:], qkv[:, :, n_q_heads + n_kv_heads:])  # v copied


def test_rope_packed_matches_the_plain_form_bit_for_bit():
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 8
    qkv = torch.randn(B, T, Hq + 2 * Hkv, D, device=DEVICE, dtype=torch.bfloat16)
    cos, sin = RotaryEmbedding(D, 10000.0, max_position=8).to(DEVICE)(seq_len=T)
    q, k, _ = qkv.split([Hq, Hkv, Hkv], dim=2)
    packed = apply_rotary_packed(qkv, cos, sin, Hq, Hkv)
    for got, want in zip(packed.split([Hq, Hkv, Hkv], dim=2), apply_rotary(q, k, cos, sin)):
        assert torch.equal(got, want)


def test_rope_packed_rejects_a_head_count_that_does_not_add_up():
    qkv = torch.randn(1, 2, 5, 8, device=DEVICE)
    cos, sin = RotaryEmbedding(8, 10000.0, max_position=4).to(DEVICE)(seq_len=2)
    with pytest.raises(ValueError, match=r"rope_packed: expected qkv \(B, T, 2 \+ 2 x 2 heads, D\)"):
        apply_rotary_packed(qkv, cos, sin, 2, 2)


@pytest.mark.gpu
def test_rope_real_sizes_gpu():
    B, T, Hq, Hkv, D = 8, 2048, 14, 2, 64
    rotary = RotaryEmbedding(D, 1e6, max_position=T).to("cuda")
    cos, sin = rotary(seq_len=T)
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16)
    _check(q, k, cos, sin, torch.bfloat16)
