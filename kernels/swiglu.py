"""SwiGLU: silu(gate) * up, forward and backward, elementwise.

Math (in fp32, sigma = sigmoid):
    y     = gate * sigma(gate) * up
    dgate = dy * up * sigma(gate) * (1 + gate * (1 - sigma(gate)))
    dup   = dy * gate * sigma(gate)
gate and up usually arrive as the two halves of one projection (`.chunk(2, -1)` views with a row
stride of 2H): the kernels read them through their row strides, so no copy is made. Nothing is
saved but the inputs; the backward recomputes sigma. Reference: `swiglu_ref` in
src/models/components/mlp.py.

`swiglu_packed(gate_up)` is the same op on the projection's output itself, (..., 2H) with the
gate first. Its backward writes dgate and dup into the two halves of one (..., 2H) gradient,
which is what the projection's backward reads. Through `swiglu(*gate_up.chunk(2, -1))`, autograd
would concatenate two separate gradients instead: one more read and write of 2H per token, which
made the Triton SwiGLU 2-3% slower than Inductor's fused one in a compiled Qwen2 step.

Limits: gate and up of one shape (..., H) and dtype with a unit stride on H; fp32, fp16, bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from kernels import as_rows


# -- kernels --------------------------------------------------------------------------------------


@triton.jit
def _swiglu_fwd_kernel(
    G_ptr,  # (M, H) gate
    U_ptr,  # (M, H) up
    Y_ptr,  # (M, H) output
    stride_gm,
    stride_um,
    stride_ym,
    H,  # row width; with FLAT, the number of elements
    FLAT: tl.constexpr,  # all rows contiguous: one 1-D range of blocks, no partial block per row
    PACKED: tl.constexpr,  # G_ptr is (M, 2H) [gate | up]: up is read at column H of G's rows, U_ptr unused
    BLOCK_H: tl.constexpr,
):
    if FLAT:
        offs = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs < H
        g_offs, u_offs, y_offs = offs, offs, offs
    else:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = cols < H
        g_offs, u_offs, y_offs = row * stride_gm + cols, row * stride_um + cols, row * stride_ym + cols
    g = tl.load(G_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    if PACKED:
        u = tl.load(G_ptr + H + g_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        u = tl.load(U_ptr + u_offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y_ptr + y_offs, y.to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY_ptr,  # (M, H) gradient of y
    G_ptr,  # (M, H) gate
    U_ptr,  # (M, H) up
    DG_ptr,  # (M, H) output gradient of gate
    DU_ptr,  # (M, H) output gradient of up
    Y_ptr,  # (M, H) output with STORE_Y: the forward's y again (for a weight gradient that needs it)
    stride_dym,
    stride_gm,
    stride_um,
    stride_dgm,
    stride_dum,
    stride_ym,
    H,  # row width; with FLAT, the number of elements
    FLAT: tl.constexpr,
    PACKED: tl.constexpr,  # G_ptr and DG_ptr are (M, 2H) [gate | up] and its gradient; U_ptr, DU_ptr unused
    STORE_Y: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    if FLAT:
        offs = tl.program_id(0).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = offs < H
        dy_offs, g_offs, u_offs, dg_offs, du_offs, y_offs = offs, offs, offs, offs, offs, offs
    else:
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = cols < H
        dy_offs, g_offs, u_offs = row * stride_dym + cols, row * stride_gm + cols, row * stride_um + cols
        dg_offs, du_offs, y_offs = row * stride_dgm + cols, row * stride_dum + cols, row * stride_ym + cols
    dy = tl.load(DY_ptr + dy_offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    if PACKED:
        u = tl.load(G_ptr + H + g_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        u = tl.load(U_ptr + u_offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(DG_ptr + dg_offs, dg.to(DG_ptr.dtype.element_ty), mask=mask)
    if PACKED:
        tl.store(DG_ptr + H + dg_offs, du.to(DG_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(DU_ptr + du_offs, du.to(DU_ptr.dtype.element_ty), mask=mask)
    if STORE_Y:  # as the forward computes it: (g * sigma(g)) * u in fp32, rounded once
        tl.store(Y_ptr + y_offs, (silu * u).to(Y_ptr.dtype.element_ty), mask=mask)


# -- launchers ------------------------------------------------------------------------------------


def _launch_params(hidden: int) -> dict:
    """Blocks of 1K elements, 8 warps (the best of 512-4096 elements and 2-16 warps on an H100, by
    1%). Rows that are all contiguous are one flat range of blocks; otherwise (the
    `.chunk(2, -1)` halves of a fused projection) a 2-D grid (rows, column blocks), whose last
    block per row is partly masked."""
    block_h = min(1024, triton.next_power_of_2(hidden))
    return {"BLOCK_H": block_h, "num_warps": 8 if block_h >= 1024 else 4 if block_h >= 512 else 2}


def _grid(tensors: list[torch.Tensor], rows: int, hidden: int, block: int) -> tuple[tuple[int, ...], bool, int]:
    """(grid, FLAT, width argument) for (rows, hidden) tensors."""
    if all(t.stride(0) == hidden for t in tensors):
        return (triton.cdiv(rows * hidden, block),), True, rows * hidden
    return (rows, triton.cdiv(hidden, block)), False, hidden


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(
            f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} must match in shape, dtype and device"
        )


def _swiglu_fwd_launch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _check(gate, up)
    hidden = gate.shape[-1]
    g2, u2 = as_rows(gate, hidden), as_rows(up, hidden)  # (M, H)
    M = g2.shape[0]
    y = torch.empty((M, hidden), dtype=gate.dtype, device=gate.device)
    p = _launch_params(hidden)
    grid, flat, width = _grid([g2, u2, y], M, hidden, p["BLOCK_H"])
    wrap_triton(_swiglu_fwd_kernel)[grid](
        g2, u2, y,
        g2.stride(0), u2.stride(0), y.stride(0),
        width, FLAT=flat, PACKED=False,
        **p,
    )  # fmt: skip
    return y.view(gate.shape)


def _swiglu_bwd_launch(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = gate.shape[-1]
    dy2 = as_rows(dy, hidden)  # an expanded (stride-0) gradient is read through its strides
    g2, u2 = as_rows(gate, hidden), as_rows(up, hidden)
    M = g2.shape[0]
    dg = torch.empty((M, hidden), dtype=gate.dtype, device=gate.device)
    du = torch.empty((M, hidden), dtype=gate.dtype, device=gate.device)
    p = _launch_params(hidden)
    grid, flat, width = _grid([dy2, g2, u2, dg, du], M, hidden, p["BLOCK_H"])
    wrap_triton(_swiglu_bwd_kernel)[grid](
        dy2, g2, u2, dg, du, dg,
        dy2.stride(0), g2.stride(0), u2.stride(0), dg.stride(0), du.stride(0), 0,
        width, FLAT=flat, PACKED=False, STORE_Y=False,
        **p,
    )  # fmt: skip
    return dg.view(gate.shape), du.view(gate.shape)


def _packed_rows(gate_up: torch.Tensor, op: str) -> torch.Tensor:
    """(..., 2H) -> (M, 2H) with a unit last stride. Only whole tensors go to the kernels: under
    Inductor, a kernel writing into views of a buffer (or reading `.chunk` views) got each view
    copied, which cost three extra passes per layer on an H100."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"{op}: the last dimension holds [gate | up] and must be even, got {tuple(gate_up.shape)}")
    return as_rows(gate_up, gate_up.shape[-1])


def _swiglu_packed_fwd_launch(gate_up: torch.Tensor) -> torch.Tensor:
    gu = _packed_rows(gate_up, "swiglu_packed")  # (M, 2H)
    M, hidden = gu.shape[0], gu.shape[1] // 2
    y = torch.empty((M, hidden), dtype=gu.dtype, device=gu.device)
    p = _launch_params(hidden)
    wrap_triton(_swiglu_fwd_kernel)[(M, triton.cdiv(hidden, p["BLOCK_H"]))](
        gu, gu, y,
        gu.stride(0), gu.stride(0), y.stride(0),
        hidden, FLAT=False, PACKED=True,
        **p,
    )  # fmt: skip
    return y.view(*gate_up.shape[:-1], hidden)


def _swiglu_packed_bwd_rows(dy: torch.Tensor, gu: torch.Tensor, store_y: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d gate_up (M, 2H) for gu (M, 2H) and dy (M, H) with a unit last stride; with `store_y` also
    y = silu(gate) * up (M, H), bit for bit the forward's, from the same pass."""
    M, hidden = gu.shape[0], gu.shape[1] // 2
    dgu = torch.empty((M, 2 * hidden), dtype=gu.dtype, device=gu.device)  # [dgate | dup]
    y = torch.empty((M, hidden), dtype=gu.dtype, device=gu.device) if store_y else dgu
    p = _launch_params(hidden)
    wrap_triton(_swiglu_bwd_kernel)[(M, triton.cdiv(hidden, p["BLOCK_H"]))](
        dy, gu, gu, dgu, dgu, y,
        dy.stride(0), gu.stride(0), gu.stride(0), dgu.stride(0), dgu.stride(0), y.stride(0),
        hidden, FLAT=False, PACKED=True, STORE_Y=store_y,
        **p,
    )  # fmt: skip
    return dgu, (y if store_y else None)


def _swiglu_packed_bwd_launch(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    gu = _packed_rows(gate_up, "swiglu_packed")
    dy2 = as_rows(dy, gu.shape[1] // 2)  # an expanded (stride-0) gradient is read through its strides
    dgu, _ = _swiglu_packed_bwd_rows(dy2, gu, store_y=False)
    return dgu.view(gate_up.shape)


# -- registration ---------------------------------------------------------------------------------

_swiglu_fwd = triton_op("kernels::swiglu_fwd", _swiglu_fwd_launch, mutates_args=())
_swiglu_bwd = triton_op("kernels::swiglu_bwd", _swiglu_bwd_launch, mutates_args=())


def _swiglu_setup(ctx, inputs, output):
    gate, up = inputs
    ctx.save_for_backward(gate, up)


def _swiglu_grad(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_bwd(dy, gate, up)  # grads for (gate, up)


_swiglu_fwd.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)

_swiglu_packed_fwd = triton_op("kernels::swiglu_packed_fwd", _swiglu_packed_fwd_launch, mutates_args=())
_swiglu_packed_bwd = triton_op("kernels::swiglu_packed_bwd", _swiglu_packed_bwd_launch, mutates_args=())


def _swiglu_packed_setup(ctx, inputs, output):
    (gate_up,) = inputs
    ctx.save_for_backward(gate_up)


def _swiglu_packed_grad(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return _swiglu_packed_bwd(dy, gate_up)  # the gradient of gate_up, (..., 2H)


_swiglu_packed_fwd.register_autograd(_swiglu_packed_grad, setup_context=_swiglu_packed_setup)


# -- functional -----------------------------------------------------------------------------------


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up; same signature and result as `swiglu_ref`."""
    return _swiglu_fwd(gate, up)


def swiglu_packed(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] on its last dimension (..., 2H) -> (..., H); the
    result of `swiglu_ref(*gate_up.chunk(2, -1))`, with the gradient of gate_up written whole."""
    return _swiglu_packed_fwd(gate_up)
