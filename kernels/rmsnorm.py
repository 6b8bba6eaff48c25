"""RMSNorm forward and backward, with an optional fused residual add.

Math (per row x of width H, statistics in fp32):
    rstd = 1 / sqrt(mean(x^2) + eps),  xhat = x * rstd,  y = weight * cast(xhat, x.dtype)
    dx   = rstd * (dy*w - xhat * mean(dy*w * xhat))
    dw   = sum over rows of dy * cast(xhat, x.dtype)
The rounding of xhat to the input dtype before the weight multiply matches Hugging Face's
Qwen2RMSNorm (and `rms_norm_ref`). `add_rms_norm` first forms s = x + residual (rounded to the
input dtype, as eager PyTorch does), writes s, and normalises it; the gradient of s adds to dx.

The weight gradient is reduced without atomics: the backward runs a fixed number of programs
(a few per SM), each looping over a strided set of rows and keeping its partial dw in fp32
registers; the (programs, H) partials are summed afterwards. Reference: `rms_norm_ref` and
`add_rms_norm_ref` in src/models/components/norms.py.

Limits: the last dimension (H <= 65536) must be contiguous; any leading shape; fp32, fp16, bf16.
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
def _rms_norm_fwd_kernel(
    X_ptr,  # (M, H) input rows
    R_ptr,  # (M, H) residual rows (read only when HAS_RESIDUAL)
    S_ptr,  # (M, H) output x + residual (written only when HAS_RESIDUAL)
    W_ptr,  # (H,) weight
    Y_ptr,  # (M, H) output
    RSTD_ptr,  # (M,) fp32 output: 1 / rms of each row, saved for backward
    stride_xm,
    stride_rm,
    stride_sm,
    stride_ym,
    M,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program
    BLOCK_H: tl.constexpr,  # next power of two >= H
):
    eps = tl.cast(eps, tl.float32)  # Inductor may pass Python floats as fp64
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols[None, :] < H)
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R_ptr + rows64 * stride_rm + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X_ptr.dtype.element_ty)
        tl.store(S_ptr + rows64 * stride_sm + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / H + eps)  # (ROWS,)
    xhat = (x * rstd[:, None]).to(X_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(W_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    y = xhat * w[None, :]
    tl.store(Y_ptr + rows64 * stride_ym + cols[None, :], y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(RSTD_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY_ptr,  # (M, H) gradient of y
    DS_ptr,  # (M, H) gradient of s = x + residual (read only when HAS_DRESIDUAL)
    X_ptr,  # (M, H) the normalised input (s when there was a residual)
    W_ptr,  # (H,) weight
    RSTD_ptr,  # (M,) fp32
    DX_ptr,  # (M, H) output gradient of x
    DW_PARTIAL_ptr,  # (programs, H) fp32 output: this program's share of dw
    stride_dym,
    stride_dsm,
    stride_xm,
    stride_dxm,
    M,
    H,
    HAS_DRESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,  # rows per step
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    col_mask = cols < H
    w = tl.load(W_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for start in range(pid * ROWS, M, programs * ROWS):
        rows = start + tl.arange(0, ROWS)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X_ptr + rows64 * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + rows64 * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD_ptr + rows, mask=row_mask, other=0.0)
        xhat = x * rstd[:, None]
        wdy = dy * w[None, :]
        c = tl.sum(xhat * wdy, axis=1) / H
        dx = (wdy - xhat * c[:, None]) * rstd[:, None]
        if HAS_DRESIDUAL:
            dx += tl.load(DS_ptr + rows64 * stride_dsm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX_ptr + rows64 * stride_dxm + cols[None, :], dx.to(DX_ptr.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat.to(X_ptr.dtype.element_ty).to(tl.float32), axis=0)
    tl.store(DW_PARTIAL_ptr + pid * H + cols, dw, mask=col_mask)


# -- launchers ------------------------------------------------------------------------------------


def _launch_params(hidden: int) -> dict:
    """One heuristic for both directions: the whole row in registers, several short rows per
    program (so each program moves about 4K elements), more warps for wider rows."""
    block_h = triton.next_power_of_2(hidden)
    rows = max(1, min(16, 4096 // block_h))
    num_warps = 4 if block_h <= 2048 else 8 if block_h <= 8192 else 16
    return {"BLOCK_H": block_h, "ROWS": rows, "num_warps": num_warps}


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    hidden = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != hidden:
        raise ValueError(f"rms_norm: weight must have shape ({hidden},) to match x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {hidden} exceeds the kernel's limit {MAX_HIDDEN}; use kernels.rmsnorm=torch")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device} but weight on {weight.device}")


def _forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    _check(x, weight)
    hidden = x.shape[-1]
    x2 = as_rows(x, hidden)  # (M, H)
    r2 = as_rows(residual, hidden) if residual is not None else x2
    M = x2.shape[0]
    y = torch.empty((M, hidden), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty_like(x2) if residual is not None else y.new_empty(0)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    p = _launch_params(hidden)
    grid = (triton.cdiv(M, p["ROWS"]),)
    wrap_triton(_rms_norm_fwd_kernel)[grid](
        x2, r2, s, weight, y, rstd,
        x2.stride(0), r2.stride(0), s.stride(0) if residual is not None else 0, y.stride(0),
        M, hidden, eps,
        HAS_RESIDUAL=residual is not None, **p,
    )  # fmt: skip
    return y.view(x.shape), s.view(x.shape) if residual is not None else s, rstd


def _backward(dy: torch.Tensor, ds: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    hidden = x.shape[-1]
    dy2 = as_rows(dy, hidden)  # may be an expanded (stride-0) gradient: read through its strides
    ds2 = as_rows(ds, hidden) if ds is not None else dy2
    x2 = as_rows(x, hidden)
    M = x2.shape[0]
    dx = torch.empty((M, hidden), dtype=x.dtype, device=x.device)
    p = _launch_params(hidden)
    programs = max(1, min(triton.cdiv(M, p["ROWS"]), 4 * num_sms(x.device)))
    dw_partial = torch.empty((programs, hidden), dtype=torch.float32, device=x.device)
    wrap_triton(_rms_norm_bwd_kernel)[(programs,)](
        dy2, ds2, x2, weight, rstd, dx, dw_partial,
        dy2.stride(0), ds2.stride(0), x2.stride(0), dx.stride(0),
        M, hidden,
        HAS_DRESIDUAL=ds is not None, **p,
    )  # fmt: skip
    dw = dw_partial.sum(0).to(weight.dtype)
    return dx.view(x.shape), dw


def _rms_norm_fwd_launch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _forward(x, None, weight, eps)
    return y, rstd


def _rms_norm_bwd_launch(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, None, x, weight, rstd)


def _add_rms_norm_fwd_launch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(
            f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
        )
    return _forward(x, residual, weight, eps)


def _add_rms_norm_bwd_launch(
    dy: torch.Tensor, ds: torch.Tensor, summed: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, ds, summed, weight, rstd)


# -- registration ---------------------------------------------------------------------------------

_rms_norm_fwd = triton_op("kernels::rms_norm_fwd", _rms_norm_fwd_launch, mutates_args=())
_rms_norm_bwd = triton_op("kernels::rms_norm_bwd", _rms_norm_bwd_launch, mutates_args=())
_add_rms_norm_fwd = triton_op("kernels::add_rms_norm_fwd", _add_rms_norm_fwd_launch, mutates_args=())
_add_rms_norm_bwd = triton_op("kernels::add_rms_norm_bwd", _add_rms_norm_bwd_launch, mutates_args=())


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _eps = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_bwd(dy, x, weight, rstd)
    return dx, dw, None  # grads for (x, weight, eps)


def _add_rms_norm_setup(ctx, inputs, output):
    _x, _residual, weight, _eps = inputs
    _y, summed, rstd = output
    ctx.save_for_backward(summed, weight, rstd)


def _add_rms_norm_grad(ctx, dy, dsummed, _drstd):
    summed, weight, rstd = ctx.saved_tensors
    ds, dw = _add_rms_norm_bwd(dy, dsummed, summed, weight, rstd)
    return ds, ds, dw, None  # x and residual both receive d(x + residual); grads for (x, residual, weight, eps)


_rms_norm_fwd.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)
_add_rms_norm_fwd.register_autograd(_add_rms_norm_grad, setup_context=_add_rms_norm_setup)


# -- functional -----------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension; same signature and result as `rms_norm_ref`."""
    y, _rstd = _rms_norm_fwd(x, weight, float(eps))
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; same result as `add_rms_norm_ref`."""
    y, summed, _rstd = _add_rms_norm_fwd(x, residual, weight, float(eps))
    return y, summed
