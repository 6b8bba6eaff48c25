"""Rotary position embeddings (RoPE) applied to q and k in one launch, forward and backward.

Layout: rotate-half (GPT-NeoX / Llama / Qwen2). With the head dimension split in halves
x = (x1, x2) and cos = (c1, c2), sin = (s1, s2) split the same way:
    forward   y1 = x1*c1 - x2*s1          y2 = x2*c2 + x1*s2
    backward  dx1 = dy1*c1 + dy2*s2       dx2 = dy2*c2 - dy1*s1   (the transposed rotation)
cos/sin are rounded to q's dtype before use, as `apply_rotary_ref` (and Hugging Face) do; the
products are then taken in fp32 and rounded once. cos/sin come per position, (B or 1, T, D), so
any `position_ids` (packed documents, left padding) work; q and k may have different head counts
(GQA). One program handles one (batch, position) pair: all q heads and all k heads, loading cos and
sin once. Reference: `apply_rotary_ref` in src/models/components/embeddings/rotary.py.

Limits: q (B, T, Hq, D) and k (B, T, Hkv, D) with a unit stride on D (views of a fused qkv
projection are fine), D even; fp32, fp16, bf16; cos/sin any float dtype. Returns new tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


# -- kernels --------------------------------------------------------------------------------------


@triton.jit
def _rope_rotate(
    IN_ptr,
    OUT_ptr,
    stride_in_b,
    stride_in_t,
    stride_in_h,
    stride_out_b,
    stride_out_t,
    stride_out_h,
    b,
    t,
    c1,
    c2,
    s1,
    s2,
    n_heads,
    HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate all heads of one (b, t) row of IN into OUT."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (dims < HALF)
    in_row = IN_ptr + b * stride_in_b + t * stride_in_t + heads * stride_in_h + dims
    out_row = OUT_ptr + b * stride_out_b + t * stride_out_t + heads * stride_out_h + dims
    x1 = tl.load(in_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(in_row + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(out_row, y1.to(OUT_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + HALF, y2.to(OUT_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q_ptr,  # (B, T, Hq, D) input (q, or the gradient of the rotated q in backward)
    K_ptr,  # (B, T, Hkv, D) input
    COS_ptr,  # (B or 1, T, D)
    SIN_ptr,  # (B or 1, T, D)
    QO_ptr,  # (B, T, Hq, D) output
    KO_ptr,  # (B, T, Hkv, D) output
    stride_qb,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_cb,  # 0 when cos/sin are shared by the batch
    stride_ct,
    stride_qob,
    stride_qot,
    stride_qoh,
    stride_kob,
    stride_kot,
    stride_koh,
    T,
    HQ,
    HKV,
    HALF: tl.constexpr,  # D / 2
    BACKWARD: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // T
    t = pid % T
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    dmask = dims < HALF
    cs_row = b * stride_cb + t * stride_ct + dims
    # Round cos/sin to the activation dtype first, as the reference does.
    act = QO_ptr.dtype.element_ty
    c1 = tl.load(COS_ptr + cs_row, mask=dmask, other=0.0).to(act).to(tl.float32)
    c2 = tl.load(COS_ptr + cs_row + HALF, mask=dmask, other=0.0).to(act).to(tl.float32)
    s1 = tl.load(SIN_ptr + cs_row, mask=dmask, other=0.0).to(act).to(tl.float32)
    s2 = tl.load(SIN_ptr + cs_row + HALF, mask=dmask, other=0.0).to(act).to(tl.float32)
    _rope_rotate(
        Q_ptr, QO_ptr, stride_qb, stride_qt, stride_qh, stride_qob, stride_qot, stride_qoh,
        b, t, c1, c2, s1, s2, HQ, HALF, BACKWARD, BLOCK_HQ, BLOCK_HALF,
    )  # fmt: skip
    _rope_rotate(
        K_ptr, KO_ptr, stride_kb, stride_kt, stride_kh, stride_kob, stride_kot, stride_koh,
        b, t, c1, c2, s1, s2, HKV, HALF, BACKWARD, BLOCK_HKV, BLOCK_HALF,
    )  # fmt: skip


# -- launchers ------------------------------------------------------------------------------------


def _launch_params(n_q_heads: int, n_kv_heads: int, head_dim: int) -> dict:
    """One program per (batch, position); whole heads in registers; warps grow with the row."""
    block_half = triton.next_power_of_2(head_dim // 2)
    block_hq = triton.next_power_of_2(n_q_heads)
    elements = 2 * block_hq * block_half
    return {
        "BLOCK_HQ": block_hq,
        "BLOCK_HKV": triton.next_power_of_2(n_kv_heads),
        "BLOCK_HALF": block_half,
        "num_warps": 1 if elements <= 512 else 2 if elements <= 1024 else 4 if elements <= 4096 else 8,
    }


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"rope: expected q (B, T, Hq, D) and k (B, T, Hkv, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, n_q_heads, head_dim = q.shape
    n_kv_heads = k.shape[2]
    if head_dim % 2:
        raise ValueError(f"rope: head dim {head_dim} must be even for the rotate-half layout")
    if q.dtype != k.dtype:
        raise ValueError(f"rope: q is {q.dtype} but k is {k.dtype}; cast them to one dtype")
    if cos.shape != sin.shape or cos.dim() != 3 or cos.shape[0] not in (1, B) or tuple(cos.shape[1:]) != (T, head_dim):
        raise ValueError(
            f"rope: cos/sin must be ({B} or 1, {T}, {head_dim}) for q {tuple(q.shape)}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    q, k = _unit_last(q), _unit_last(k)  # gradients may arrive expanded: keep their strides otherwise
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty((B, T, n_q_heads, head_dim), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, T, n_kv_heads, head_dim), dtype=k.dtype, device=k.device)
    stride_cb = cos.stride(0) if cos.shape[0] > 1 else 0
    wrap_triton(_rope_kernel)[(B * T,)](
        q, k, cos, sin, q_out, k_out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        stride_cb, cos.stride(1),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        T, n_q_heads, n_kv_heads,
        HALF=head_dim // 2, BACKWARD=backward,
        **_launch_params(n_q_heads, n_kv_heads, head_dim),
    )  # fmt: skip
    return q_out, k_out


def _rope_fwd_launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(q, k, cos, sin, backward=False)


def _rope_bwd_launch(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _rotate(dq, dk, cos, sin, backward=True)


# -- registration ---------------------------------------------------------------------------------

_rope_fwd = triton_op("kernels::rope_fwd", _rope_fwd_launch, mutates_args=())
_rope_bwd = triton_op("kernels::rope_bwd", _rope_bwd_launch, mutates_args=())


def _rope_setup(ctx, inputs, output):
    _q, _k, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _rope_grad(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    # An unused output's gradient arrives materialised as zeros (autograd's default), never None.
    dq_in, dk_in = _rope_bwd(dq, dk, cos, sin)
    return dq_in, dk_in, None, None  # grads for (q, k, cos, sin); cos/sin are not trained


_rope_fwd.register_autograd(_rope_grad, setup_context=_rope_setup)


# -- functional -----------------------------------------------------------------------------------


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, Hq, D) and k (B, T, Hkv, D) by cos/sin (B or 1, T, D); as `apply_rotary_ref`."""
    return _rope_fwd(q, k, cos, sin)
