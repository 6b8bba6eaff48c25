"""SwiGLU followed by the down projection, with the SwiGLU backward fused into a Triton GEMM.

    y = swiglu(gate_up) @ weight.T          gate_up (M, 2H) = [gate | up], weight (D, H), y (M, D)

Forward: h = silu(gate) * up (the `swiglu_packed` row kernel), then y = h @ weight.T (cuBLAS).
Backward, given dy (M, D):
    dh      = dy @ weight                                   (M, H), never written to memory
    dgate   = dh * up * sigma(gate) * (1 + gate * (1 - sigma(gate)))
    dup     = dh * gate * sigma(gate)
    dweight = dy.T @ h                                      (cuBLAS, fp32 accumulation)
`_dgate_up_kernel` computes dh tile by tile (TMA loads, wgmma, a persistent grid) and, in the
epilogue of each (128 x 128) tile, loads the matching gate and up tiles and writes dgate and dup.
Unfused, dh goes to memory and a second kernel reads it back with gate and up: per Qwen2-0.5B
layer (8192 tokens, H = 4864) the fused kernel took 225 us against 126 us (cuBLAS dh) + 139 us
(the SwiGLU backward kernel) on an H100; in the compiled Qwen2-0.5B step, where cuBLAS's dh ran
faster, the step gained 0.7-1.4%. The forward has no such fusion: a Triton GEMM with the SwiGLU in
its epilogue measured 312-331 us against 318 us for cuBLAS + the row kernel (README.md, "The fused
MLP backward GEMMs").

dh is rounded to the activation dtype before the SwiGLU gradient, as the unfused path rounds it
when it stores dh, so both paths compute the same function of the same bf16 values.

Weights: under autocast the weight is fp32 and the activations bf16. The op casts the weight to
the activations' dtype for its matmuls (as autocast would), or reads `weight_copy`, a copy of the
weight in that dtype that the optimizer keeps (`optimizer.bf16_weight_copy`), and returns the
weight gradient in the weight's dtype straight from the matmul's fp32 accumulator (as
`kernels.linear: fp32_wgrad`).

Where the fused kernel runs: fp16 / bf16 activations on a GPU with TMA (compute capability 9.0+),
H and D multiples of 8 and 16-byte-aligned tensors (TMA's rows and bases), and fp16 under the CPU
interpreter (whose `tl.dot` of bf16 operands is wrong in Triton 3.7.1). Everywhere else (fp32,
older GPUs, odd widths, misaligned views) the backward is the unfused pair, cuBLAS dh then the
SwiGLU row kernel: the same results, slower.

Reference: `swiglu_linear_ref` in src/models/components/mlp.py.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels import mm_out, num_sms, usable_weight_copy
from kernels.swiglu import _swiglu_packed_bwd_launch, _swiglu_packed_bwd_rows, _swiglu_packed_fwd_launch, swiglu_packed

try:  # Triton >= 3.4 (host-side TMA descriptors)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: the unfused backward only
    TensorDescriptor = None


# -- kernel ---------------------------------------------------------------------------------------


@triton.jit
def _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile (pid_m, pid_n) of linear tile index `tile_id`, GROUP_M row-tiles at a time (so that
    consecutive programs share the same weight columns in L2)."""
    per_group = GROUP_M * num_pid_n
    first_m = (tile_id // per_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile_id % group_m)
    pid_n = (tile_id % per_group) // group_m
    return pid_m, pid_n


@triton.jit
def _dgate_up_kernel(
    dy_desc,  # (M, D) upstream gradient, blocks (BM, BK)
    w_desc,  # (D, H) down-projection weight, blocks (BK, BN)
    gate_desc,  # (M, H) gate: the first half of gate_up's rows, blocks (BM, BN)
    up_desc,  # (M, H) up: the second half
    dgate_desc,  # (M, H) output: the first half of d gate_up
    dup_desc,  # (M, H) output: the second half
    M,
    H,
    D,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(H, BN)
    k_tiles = tl.cdiv(D, BK)
    # One program per SM walks the tiles; `flatten` lets the compiler pipeline the next tile's
    # loads under this tile's epilogue.
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(k_tiles):
            a = dy_desc.load([off_m, k * BK])  # (BM, BK)
            b = w_desc.load([k * BK, off_n])  # (BK, BN)
            acc = tl.dot(a, b, acc)
        dh = acc.to(dgate_desc.dtype).to(tl.float32)  # rounded as the unfused path stores it
        g = gate_desc.load([off_m, off_n]).to(tl.float32)
        u = up_desc.load([off_m, off_n]).to(tl.float32)
        sig = tl.sigmoid(g)
        dgate = dh * u * sig * (1.0 + g * (1.0 - sig))
        dup = dh * g * sig
        dgate_desc.store([off_m, off_n], dgate.to(dgate_desc.dtype))
        dup_desc.store([off_m, off_n], dup.to(dup_desc.dtype))


# -- launchers ------------------------------------------------------------------------------------

# 128 x 128 tiles, K steps of 64, 5 stages, 8 warps: the fastest of 12 settings at Qwen2-0.5B's
# shape on an H100 (2026-11-25). TMA zero-fills out-of-range loads and clips stores, so any M, H, D.
BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, STAGES, WARPS = 128, 128, 64, 8, 5, 8
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def fused_backward_supported(gate_up: torch.Tensor, weight: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether `_dgate_up_kernel` runs for these tensors and `others` (the module docstring says
    when)."""
    if TensorDescriptor is None or gate_up.dtype not in (torch.float16, torch.bfloat16):
        return False
    if gate_up.shape[0] == 0:  # no rows: a TMA descriptor needs a positive shape (the unfused path handles it)
        return False
    if weight.shape[0] % 8 or weight.shape[1] % 8:  # 16-byte rows for TMA
        return False
    if any(t.data_ptr() % 16 for t in (gate_up, weight, *others)):  # TMA reads from 16-byte-aligned bases
        return False
    if _INTERPRET:
        return gate_up.dtype == torch.float16
    return gate_up.is_cuda and torch.cuda.get_device_capability(gate_up.device)[0] >= 9


def _dgate_up_fused(dy: torch.Tensor, weight: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """d gate_up (M, 2H) from dy (M, D), weight (D, H) and gate_up (M, 2H), all one dtype and
    contiguous."""
    M, D = dy.shape
    H = weight.shape[1]
    dgate_up = torch.empty_like(gate_up)
    # The halves as (M, H) views with a row stride of 2H: TMA clips each at column H.
    gate, up = gate_up[:, :H], gate_up[:, H:]
    dgate, dup = dgate_up[:, :H], dgate_up[:, H:]
    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(H, BLOCK_N)
    programs = max(1, min(num_sms(dy.device), tiles))
    _dgate_up_kernel[(programs,)](
        TensorDescriptor.from_tensor(dy, [BLOCK_M, BLOCK_K]),
        TensorDescriptor.from_tensor(weight, [BLOCK_K, BLOCK_N]),
        TensorDescriptor.from_tensor(gate, [BLOCK_M, BLOCK_N]),
        TensorDescriptor.from_tensor(up, [BLOCK_M, BLOCK_N]),
        TensorDescriptor.from_tensor(dgate, [BLOCK_M, BLOCK_N]),
        TensorDescriptor.from_tensor(dup, [BLOCK_M, BLOCK_N]),
        M, H, D,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, GROUP_M=GROUP_M, NUM_PROGRAMS=programs,
        num_stages=STAGES, num_warps=WARPS,
    )  # fmt: skip
    return dgate_up


def _check(gate_up: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2 or gate_up.shape[-1] != 2 * weight.shape[1]:
        raise ValueError(
            f"swiglu_linear: gate_up (..., 2H) and weight (D, H) disagree: {tuple(gate_up.shape)} and {tuple(weight.shape)}"
        )
    if not gate_up.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"swiglu_linear: expected floating-point tensors, got {gate_up.dtype} and {weight.dtype}")
    if gate_up.device != weight.device:
        raise ValueError(f"swiglu_linear: gate_up is on {gate_up.device} but weight on {weight.device}")


def _compute_weight(weight: torch.Tensor, weight_copy: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight (D, H) in `dtype`, contiguous: the copy when there is one, else a cast."""
    return (weight_copy if weight_copy is not None else weight.to(dtype)).contiguous()


def _swiglu_linear_fwd_launch(
    h: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor, weight_copy: torch.Tensor | None, tuned: bool
) -> torch.Tensor:
    """y (..., D) = h @ weight.T; `tuned`: the GEMMs through `mm_out`'s timed pick (kernels/tuned_mm.py)."""
    with torch.autocast(h.device.type, enabled=False):
        h2 = h.reshape(-1, h.shape[-1])  # (M, H)
        y = mm_out(h2, _compute_weight(weight, weight_copy, h.dtype).t(), h.dtype, tuned)  # (M, D)
    return y.view(*h.shape[:-1], weight.shape[0])


def _backward_operands(
    dy: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor, weight_copy: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate_up (M, 2H), dy (M, D) and the weight (D, H), contiguous, in the activations' dtype (an
    expanded gradient is copied)."""
    gu = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
    dy2 = dy.reshape(-1, weight.shape[0]).to(gu.dtype).contiguous()
    return gu, dy2, _compute_weight(weight, weight_copy, gu.dtype)


def _swiglu_linear_bwd_launch(
    dy: torch.Tensor,
    h: torch.Tensor,
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    weight_copy: torch.Tensor | None,
    tuned: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(dy.device.type, enabled=False):
        gu, dy2, w = _backward_operands(dy, gate_up, weight, weight_copy)
        h2 = h.reshape(-1, h.shape[-1])  # (M, H)
        if fused_backward_supported(gu, w, dy2):
            dgu = _dgate_up_fused(dy2, w, gu)
        else:
            dgu = _swiglu_packed_bwd_launch(mm_out(dy2, w, w.dtype, tuned), gu)
        dweight = mm_out(dy2.t(), h2, weight.dtype, tuned)  # (D, H)
    return dgu.view(gate_up.shape), dweight


# `swiglu_linear_recompute`: the same op without h kept for backward. The forward computes h inside
# the op and drops it; the backward recomputes it in the SwiGLU backward's row pass, which reads
# gate and up anyway: dh = dy @ weight (cuBLAS), then one pass over dh, gate and up writes
# d gate_up and h, then dweight = dy.T @ h. h then costs one more write of (M, H) in a
# memory-bound kernel, instead of a separate pass that reads all of gate_up (what selective
# checkpointing of `swiglu_linear` does), or a third store in the fused GEMM's epilogue (which
# doubled that kernel's time on an H200).


def _swiglu_linear_recompute_fwd_launch(
    gate_up: torch.Tensor, weight: torch.Tensor, weight_copy: torch.Tensor | None, tuned: bool
) -> torch.Tensor:
    h = _swiglu_packed_fwd_launch(gate_up)  # (..., H), freed when the op returns
    return _swiglu_linear_fwd_launch(h, gate_up, weight, weight_copy, tuned)


def _swiglu_linear_recompute_bwd_launch(
    dy: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor, weight_copy: torch.Tensor | None, tuned: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.autocast(dy.device.type, enabled=False):
        gu, dy2, w = _backward_operands(dy, gate_up, weight, weight_copy)
        dh = mm_out(dy2, w, w.dtype, tuned)  # (M, H), rounded to the activation dtype as the fused path rounds it
        dgu, h = _swiglu_packed_bwd_rows(dh, gu, store_y=True)
        dweight = mm_out(dy2.t(), h, weight.dtype, tuned)  # (D, H)
    return dgu.view(gate_up.shape), dweight


# -- registration ---------------------------------------------------------------------------------

# `custom_op` (opaque to torch.compile), like the loss ops: the backward builds TMA descriptors on
# the host, and there is nothing for Inductor to fuse around two matmuls and a GEMM kernel. The op
# is the down projection only. h = swiglu(gate_up) is computed outside it from a detached gate_up
# (an op Inductor sees and selective checkpointing recomputes, as it recomputes the reference's
# silu * up), and the op's backward returns the gradient of gate_up itself, through h.
_swiglu_linear_fwd = torch.library.custom_op("kernels::swiglu_linear_fwd", _swiglu_linear_fwd_launch, mutates_args=())
_swiglu_linear_bwd = torch.library.custom_op("kernels::swiglu_linear_bwd", _swiglu_linear_bwd_launch, mutates_args=())


@_swiglu_linear_fwd.register_fake
def _(h, gate_up, weight, weight_copy, tuned):
    return h.new_empty((*h.shape[:-1], weight.shape[0]))


@_swiglu_linear_bwd.register_fake
def _(dy, h, gate_up, weight, weight_copy, tuned):
    return gate_up.new_empty(gate_up.shape), weight.new_empty(weight.shape)


def _swiglu_linear_setup(ctx, inputs, output):
    h, gate_up, weight, weight_copy, tuned = inputs
    ctx.save_for_backward(h, gate_up, weight, weight_copy)
    ctx.tuned = tuned


def _swiglu_linear_grad(ctx, dy):
    h, gate_up, weight, weight_copy = ctx.saved_tensors
    dgate_up, dweight = _swiglu_linear_bwd(dy, h, gate_up, weight, weight_copy, ctx.tuned)
    # grads for (h: none, it carries no graph; gate_up; weight; weight_copy: none, the optimizer
    # writes it; tuned)
    return None, dgate_up, dweight, None, None


_swiglu_linear_fwd.register_autograd(_swiglu_linear_grad, setup_context=_swiglu_linear_setup)

_swiglu_linear_recompute_fwd = torch.library.custom_op(
    "kernels::swiglu_linear_recompute_fwd", _swiglu_linear_recompute_fwd_launch, mutates_args=()
)
_swiglu_linear_recompute_bwd = torch.library.custom_op(
    "kernels::swiglu_linear_recompute_bwd", _swiglu_linear_recompute_bwd_launch, mutates_args=()
)


@_swiglu_linear_recompute_fwd.register_fake
def _(gate_up, weight, weight_copy, tuned):
    return gate_up.new_empty((*gate_up.shape[:-1], weight.shape[0]))


@_swiglu_linear_recompute_bwd.register_fake
def _(dy, gate_up, weight, weight_copy, tuned):
    return gate_up.new_empty(gate_up.shape), weight.new_empty(weight.shape)


def _swiglu_linear_recompute_setup(ctx, inputs, output):
    gate_up, weight, weight_copy, tuned = inputs
    ctx.save_for_backward(gate_up, weight, weight_copy)  # not h
    ctx.tuned = tuned


def _swiglu_linear_recompute_grad(ctx, dy):
    gate_up, weight, weight_copy = ctx.saved_tensors
    dgate_up, dweight = _swiglu_linear_recompute_bwd(dy, gate_up, weight, weight_copy, ctx.tuned)
    return dgate_up, dweight, None, None  # grads for (gate_up, weight, weight_copy: none, tuned)


_swiglu_linear_recompute_fwd.register_autograd(_swiglu_linear_recompute_grad, setup_context=_swiglu_linear_recompute_setup)


# -- functional -----------------------------------------------------------------------------------


def swiglu_linear(
    gate_up: torch.Tensor, weight: torch.Tensor, weight_copy: torch.Tensor | None = None, tuned: bool = False
) -> torch.Tensor:
    """silu(gate) * up @ weight.T for gate_up = [gate | up] (..., 2H) and weight (D, H) -> (..., D);
    the result of `swiglu_linear_ref`, computed in gate_up's dtype, with weight's gradient in
    weight's dtype. `weight_copy`: the weight in gate_up's dtype, read instead of a cast. `tuned`
    (`kernels.linear: tuned`): the cuBLAS GEMMs on the faster of cuBLAS's pick and cuBLASLt's
    best for their shapes (kernels/tuned_mm.py)."""
    _check(gate_up, weight)
    h = swiglu_packed(gate_up.detach())  # (..., H); its gradient path is the op's own backward
    copy = usable_weight_copy(weight, weight_copy, gate_up.dtype, "swiglu_linear")
    return _swiglu_linear_fwd(h, gate_up, weight, copy, tuned)


def swiglu_linear_recompute(
    gate_up: torch.Tensor, weight: torch.Tensor, weight_copy: torch.Tensor | None = None, tuned: bool = False
) -> torch.Tensor:
    """`swiglu_linear` without h = swiglu(gate_up) kept for backward (M x H less memory per layer):
    the backward writes h again from its SwiGLU pass. The same results as `swiglu_linear`'s
    unfused backward."""
    _check(gate_up, weight)
    copy = usable_weight_copy(weight, weight_copy, gate_up.dtype, "swiglu_linear")
    return _swiglu_linear_recompute_fwd(gate_up, weight, copy, tuned)
