"""LayerNorm forward and backward (GPT-2), with an optional bias.

Math (per row x of width H, statistics in fp32):
    mean = sum(x) / H,  rstd = 1 / sqrt(sum((x - mean)^2) / H + eps),  xhat = (x - mean) * rstd
    y    = xhat * w + b
    dx   = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w * xhat))
    dw   = sum over rows of dy * xhat,   db = sum over rows of dy
As in the Triton tutorial 05-layer-norm, but the weight and bias gradients are reduced without
atomics: a fixed number of programs (a few per SM) each loop over a strided set of rows and keep
partial dw, db in fp32 registers; the (programs, H) partials are summed afterwards.
Reference: `layer_norm_ref` in src/models/components/norms.py.

Limits: the last dimension (H <= 65536) must be contiguous; any leading shape; fp32, fp16, bf16;
the output has the input's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kernels import as_rows, num_sms

MAX_HIDDEN = 65536


# -- kernels --------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd_kernel(
    X_ptr,  # (M, H) input rows
    W_ptr,  # (H,) weight
    B_ptr,  # (H,) bias (read only when HAS_BIAS)
    Y_ptr,  # (M, H) output
    MEAN_ptr,  # (M,) fp32 output, saved for backward
    RSTD_ptr,  # (M,) fp32 output, saved for backward
    stride_xm,
    stride_ym,
    M,
    H,
    eps,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program
    BLOCK_H: tl.constexpr,  # next power of two >= H
):
    eps = tl.cast(eps, tl.float32)  # Inductor may pass Python floats as fp64
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < M
    col_mask = cols < H
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / H
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / H + eps)
    w = tl.load(W_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y_ptr + rows64 * stride_ym + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(MEAN_ptr + rows, mean, mask=row_mask)
    tl.store(RSTD_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY_ptr,  # (M, H) gradient of y
    X_ptr,  # (M, H) input rows
    W_ptr,  # (H,) weight
    MEAN_ptr,  # (M,) fp32
    RSTD_ptr,  # (M,) fp32
    DX_ptr,  # (M, H) output gradient of x
    DW_PARTIAL_ptr,  # (programs, H) fp32 output: this program's share of dw
    DB_PARTIAL_ptr,  # (programs, H) fp32 output: this program's share of db
    stride_dym,
    stride_xm,
    stride_dxm,
    M,
    H,
    ROWS: tl.constexpr,  # rows per step
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    w = tl.load(W_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    db = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for start in range(pid * ROWS, M, programs * ROWS):
        rows = start + tl.arange(0, ROWS)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + rows64 * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD_ptr + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / H
        c2 = tl.sum(wdy, axis=1) / H
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX_ptr + rows64 * stride_dxm + cols[None, :], dx.to(DX_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW_PARTIAL_ptr + pid * H + cols, dw, mask=col_mask)
    tl.store(DB_PARTIAL_ptr + pid * H + cols, db, mask=col_mask)


# -- launchers ------------------------------------------------------------------------------------


def _launch_params(hidden: int) -> dict:
    """One heuristic for both directions: the whole row in registers, several short rows per
    program (so each program moves about 4K elements), more warps for wider rows."""
    block_h = triton.next_power_of_2(hidden)
    rows = max(1, min(16, 4096 // block_h))
    num_warps = 4 if block_h <= 2048 else 8 if block_h <= 8192 else 16
    return {"BLOCK_H": block_h, "ROWS": rows, "num_warps": num_warps}


def _layer_norm_fwd_launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.dim() != 1 or p.shape[0] != hidden or p.device != x.device):
            raise ValueError(
                f"layer_norm: {name} must be a ({hidden},) tensor on {x.device} to match x {tuple(x.shape)}, "
                f"got {tuple(p.shape)} on {p.device}"
            )
    if hidden > MAX_HIDDEN:
        raise ValueError(f"layer_norm: hidden size {hidden} exceeds the kernel's limit {MAX_HIDDEN}; use kernels.layernorm=torch")
    x2 = as_rows(x, hidden)  # (M, H)
    M = x2.shape[0]
    y = torch.empty((M, hidden), dtype=x.dtype, device=x.device)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    p = _launch_params(hidden)
    wrap_triton(_layer_norm_fwd_kernel)[(triton.cdiv(M, p["ROWS"]),)](
        x2, weight, bias if bias is not None else weight, y, mean, rstd,
        x2.stride(0), y.stride(0),
        M, hidden, eps,
        HAS_BIAS=bias is not None, **p,
    )  # fmt: skip
    return y.view(x.shape), mean, rstd


def _layer_norm_bwd_launch(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = x.shape[-1]
    dy2 = as_rows(dy, hidden)  # may be an expanded (stride-0) gradient: read through its strides
    x2 = as_rows(x, hidden)
    M = x2.shape[0]
    dx = torch.empty((M, hidden), dtype=x.dtype, device=x.device)
    p = _launch_params(hidden)
    programs = max(1, min(triton.cdiv(M, p["ROWS"]), 4 * num_sms(x.device)))
    dw_partial = torch.empty((programs, hidden), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((programs, hidden), dtype=torch.float32, device=x.device)
    wrap_triton(_layer_norm_bwd_kernel)[(programs,)](
        dy2, x2, weight, mean, rstd, dx, dw_partial, db_partial,
        dy2.stride(0), x2.stride(0), dx.stride(0),
        M, hidden,
        **p,
    )  # fmt: skip
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype), db_partial.sum(0).to(weight.dtype)


# -- registration ---------------------------------------------------------------------------------

_layer_norm_fwd = triton_op("kernels::layer_norm_fwd", _layer_norm_fwd_launch, mutates_args=())
_layer_norm_bwd = triton_op("kernels::layer_norm_bwd", _layer_norm_bwd_launch, mutates_args=())


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, mean, rstd)


def _layer_norm_grad(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_bwd(dy, x, weight, mean, rstd)
    return dx, dw, db if ctx.has_bias else None, None  # grads for (x, weight, bias, eps)


_layer_norm_fwd.register_autograd(_layer_norm_grad, setup_context=_layer_norm_setup)


# -- functional -----------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension; same signature and result as `layer_norm_ref`, with a
    weight (the kernel always scales; `layer_norm_ref` also takes None)."""
    if weight is None:
        raise ValueError("layer_norm (triton): needs a weight (pass torch.ones(hidden) for none), or use kernels.layernorm=torch")
    y, _mean, _rstd = _layer_norm_fwd(x, weight, bias, float(eps))
    return y
