"""GELU (tanh approximation) followed by a projection, with the GELU backward and the bias
gradient of the layer before it fused into a Triton GEMM. GPT-2's MLP:

    pre = x @ fc_weight.T + fc_bias        (the fc layer: its matmul runs outside this op, bias-free)
    y   = gelu(pre) @ weight.T + bias      gelu(z) = z/2 * (1 + tanh(k (z + 0.044715 z^3))), k = sqrt(2/pi)

The op takes `pre0 = x @ fc_weight.T` (no bias) and `fc_bias`, and owns everything after them.
Forward: h = gelu(pre0 + fc_bias) (computed outside the op, where Inductor fuses the bias add and
the GELU into one kernel), then y = h @ weight.T + bias (cuBLAS). Backward, given dy (M, D):
    dh       = dy @ weight                                  (M, H), never written to memory
    dpre     = dh * gelu'(pre0 + fc_bias)                   the gradient of pre0 (and of pre)
    dfc_bias = sum over rows of dpre
    dweight  = dy.T @ h,   dbias = sum over rows of dy      (cuBLAS / a reduction)
`_dpre_kernel` computes dh tile by tile (TMA, wgmma, a persistent grid); each (128 x 128) tile's
epilogue loads the pre0 tile, writes dpre, and writes the tile's column sums of dpre to an
fp32 (row tiles, H) buffer that one small reduction turns into dfc_bias. Unfused, dh goes to
memory and comes back for the GELU backward, and dpre is read once more for the bias gradient.
Measured per gpt_125m layer (16384 tokens, H = 3072) on an H100: 273 us against 408 us for cuBLAS
plus eager PyTorch's GELU backward and bias sum; inside a compiled step, where Inductor fuses the
GELU backward with the bias reduction, the step was 1.4% slower with it (README.md).

dh and dpre are rounded to the activation dtype where the unfused path stores them, so both paths
compute the same function of the same values (pre = pre0 + fc_bias is formed in fp32 here, where
the unfused reference rounds it once more).

Weights: under autocast the weight and biases are fp32 and the activations bf16. The op casts
them to the activations' dtype for its matmuls, as autocast would, and returns their gradients in
their own dtype, the weight's straight from the matmul's fp32 accumulator (as `kernels.linear:
fp32_wgrad`).

Where the fused kernel runs: as `kernels/swiglu_linear.py` (fp16 / bf16 on a GPU with TMA, H and
D multiples of 8, fp16 under the CPU interpreter); elsewhere the unfused backward, same results.

Reference: `gelu_linear_ref` in src/models/components/mlp.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import num_sms
from kernels.swiglu_linear import (
    BLOCK_K,
    BLOCK_M,
    BLOCK_N,
    GROUP_M,
    STAGES,
    WARPS,
    TensorDescriptor,
    _mm_out,
    _tile_ids,
    fused_backward_supported,
)

SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))  # a jit function reads globals only as constexpr


# -- kernel ---------------------------------------------------------------------------------------


@triton.jit
def _dpre_kernel(
    dy_desc,  # (M, D) upstream gradient, blocks (BM, BK)
    w_desc,  # (D, H) projection weight, blocks (BK, BN)
    pre_desc,  # (M, H) pre0: the fc layer's output without its bias, blocks (BM, BN)
    dpre_desc,  # (M, H) output: the gradient of pre0
    FC_BIAS_ptr,  # (H,) the fc layer's bias (unused without HAS_FC_BIAS)
    PARTIAL_ptr,  # (row tiles, H) fp32 output: per row tile, the column sums of dpre
    M,
    H,
    D,
    HAS_FC_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(H, BN)
    k_tiles = tl.cdiv(D, BK)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(k_tiles):
            a = dy_desc.load([off_m, k * BK])  # (BM, BK)
            b = w_desc.load([k * BK, off_n])  # (BK, BN)
            acc = tl.dot(a, b, acc)
        dh = acc.to(dpre_desc.dtype).to(tl.float32)  # rounded as the unfused path stores it
        cols = off_n + tl.arange(0, BN)
        z = pre_desc.load([off_m, off_n]).to(tl.float32)
        if HAS_FC_BIAS:
            z += tl.load(FC_BIAS_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)[None, :]
        inner = SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner)
        dgelu = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z)
        dpre = (dh * dgelu).to(dpre_desc.dtype)
        dpre_desc.store([off_m, off_n], dpre)
        # Rows past M were loaded as zeros (TMA padding) and give dpre = 0: the sums stay exact.
        col_sums = tl.sum(dpre.to(tl.float32), axis=0)  # (BN,)
        tl.store(PARTIAL_ptr + pid_m.to(tl.int64) * H + cols, col_sums, mask=cols < H)


# -- launchers ------------------------------------------------------------------------------------


def _dpre_fused(
    dy: torch.Tensor, weight: torch.Tensor, pre0: torch.Tensor, fc_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dpre (M, H), column sums of dpre (H,) fp32) from dy (M, D), weight (D, H), pre0 (M, H),
    all one dtype and contiguous."""
    M, D = dy.shape
    H = weight.shape[1]
    dpre = torch.empty_like(pre0)
    row_tiles = triton.cdiv(M, BLOCK_M)
    partial = torch.empty((row_tiles, H), dtype=torch.float32, device=dy.device)
    tiles = row_tiles * triton.cdiv(H, BLOCK_N)
    programs = max(1, min(num_sms(dy.device), tiles))
    _dpre_kernel[(programs,)](
        TensorDescriptor.from_tensor(dy, [BLOCK_M, BLOCK_K]),
        TensorDescriptor.from_tensor(weight, [BLOCK_K, BLOCK_N]),
        TensorDescriptor.from_tensor(pre0, [BLOCK_M, BLOCK_N]),
        TensorDescriptor.from_tensor(dpre, [BLOCK_M, BLOCK_N]),
        fc_bias if fc_bias is not None else partial, partial,
        M, H, D,
        HAS_FC_BIAS=fc_bias is not None,
        BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K, GROUP_M=GROUP_M, NUM_PROGRAMS=programs,
        num_stages=STAGES, num_warps=WARPS,
    )  # fmt: skip
    return dpre, partial.sum(0)


def _dpre_unfused(
    dy: torch.Tensor, weight: torch.Tensor, pre0: torch.Tensor, fc_bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    pre = pre0 if fc_bias is None else pre0 + fc_bias
    dpre = torch.ops.aten.gelu_backward(torch.mm(dy, weight), pre, approximate="tanh")
    return dpre, dpre.sum(0, dtype=torch.float32)


def _check(pre0: torch.Tensor, fc_bias: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    H = pre0.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H:
        raise ValueError(f"gelu_linear: pre (..., H) and weight (D, H) disagree: {tuple(pre0.shape)} and {tuple(weight.shape)}")
    if fc_bias is not None and tuple(fc_bias.shape) != (H,):
        raise ValueError(f"gelu_linear: fc_bias must be ({H},), got {tuple(fc_bias.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"gelu_linear: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if not pre0.dtype.is_floating_point or not weight.dtype.is_floating_point:
        raise ValueError(f"gelu_linear: expected floating-point tensors, got {pre0.dtype} and {weight.dtype}")


def _gelu_linear_fwd_launch(
    h: torch.Tensor, pre0: torch.Tensor, fc_bias: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    with torch.autocast(h.device.type, enabled=False):
        y = F.linear(h, weight.to(h.dtype), bias.to(h.dtype) if bias is not None else None)
    return y


def _gelu_linear_bwd_launch(
    dy: torch.Tensor, h: torch.Tensor, pre0: torch.Tensor, fc_bias: torch.Tensor | None, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dpre0, dfc_bias, dweight, dbias). The two bias gradients are always returned (a custom op
    returns no optional tensors); the autograd wrapper drops those of absent biases."""
    with torch.autocast(dy.device.type, enabled=False):
        H, dtype = pre0.shape[-1], pre0.dtype
        pre2 = pre0.reshape(-1, H).contiguous()  # (M, H)
        h2 = h.reshape(-1, H)  # (M, H)
        dy2 = dy.reshape(-1, weight.shape[0]).to(dtype).contiguous()  # (M, D); an expanded gradient is copied
        w = weight.to(dtype).contiguous()  # (D, H)
        b = fc_bias.to(dtype) if fc_bias is not None else None
        if fused_backward_supported(pre2, w):
            dpre, dfc_bias = _dpre_fused(dy2, w, pre2, b)
        else:
            dpre, dfc_bias = _dpre_unfused(dy2, w, pre2, b)
        dweight = _mm_out(dy2.t(), h2, weight.dtype)  # (D, H)
        dbias = dy2.sum(0, dtype=torch.float32).to(weight.dtype)  # (D,)
    return dpre.view(pre0.shape), dfc_bias.to(fc_bias.dtype if fc_bias is not None else torch.float32), dweight, dbias


# -- registration ---------------------------------------------------------------------------------

# `custom_op` (opaque to torch.compile), as in swiglu_linear.py: the op is the projection only,
# h = gelu(pre0 + fc_bias) is computed outside it from detached inputs (Inductor fuses it;
# selective checkpointing recomputes it), and the op's backward returns the gradients of pre0 and
# fc_bias itself, through h.
_gelu_linear_fwd = torch.library.custom_op("kernels::gelu_linear_fwd", _gelu_linear_fwd_launch, mutates_args=())
_gelu_linear_bwd = torch.library.custom_op("kernels::gelu_linear_bwd", _gelu_linear_bwd_launch, mutates_args=())


@_gelu_linear_fwd.register_fake
def _(h, pre0, fc_bias, weight, bias):
    return h.new_empty((*h.shape[:-1], weight.shape[0]))


@_gelu_linear_bwd.register_fake
def _(dy, h, pre0, fc_bias, weight):
    dfc_bias_dtype = fc_bias.dtype if fc_bias is not None else torch.float32
    return (
        pre0.new_empty(pre0.shape),
        pre0.new_empty(pre0.shape[-1], dtype=dfc_bias_dtype),
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[0]),
    )


def _gelu_linear_setup(ctx, inputs, output):
    h, pre0, fc_bias, weight, bias = inputs
    ctx.has_biases = (fc_bias is not None, bias is not None)
    ctx.save_for_backward(h, pre0, fc_bias, weight)


def _gelu_linear_grad(ctx, dy):
    h, pre0, fc_bias, weight = ctx.saved_tensors
    dpre, dfc_bias, dweight, dbias = _gelu_linear_bwd(dy, h, pre0, fc_bias, weight)
    has_fc_bias, has_bias = ctx.has_biases
    return (  # grads for (h: none, it carries no graph; pre0; fc_bias; weight; bias)
        None, dpre, dfc_bias if has_fc_bias else None, dweight, dbias if has_bias else None
    )  # grads for (h: none, it carries no graph; pre0; fc_bias; weight; bias)


_gelu_linear_fwd.register_autograd(_gelu_linear_grad, setup_context=_gelu_linear_setup)


# -- functional -----------------------------------------------------------------------------------


def gelu_linear(
    pre0: torch.Tensor, fc_bias: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """gelu_tanh(pre0 + fc_bias) @ weight.T + bias for pre0 (..., H), weight (D, H) -> (..., D);
    the result of `gelu_linear_ref`, in pre0's dtype, with each parameter's gradient in its dtype."""
    _check(pre0, fc_bias, weight, bias)
    # h from detached inputs carries no graph: its gradient path is the op's own backward.
    pre = pre0.detach() if fc_bias is None else pre0.detach() + fc_bias.detach().to(pre0.dtype)
    h = F.gelu(pre, approximate="tanh")
    return _gelu_linear_fwd(h, pre0, fc_bias, weight, bias)
