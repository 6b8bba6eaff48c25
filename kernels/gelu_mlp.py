"""GPT-2's MLP with its GELU in the epilogues of cuBLASLt's GEMMs (llm.c's `gelu_fusion=2`).

    y = gelu_tanh(x @ fc_weight.T + fc_bias) @ proj_weight.T + proj_bias
        x (M, D), fc_weight (H, D), proj_weight (D, H), y (M, D)

Forward: one cuBLASLt GEMM with the GELU_AUX_BIAS epilogue writes h = gelu_tanh(pre) and the
pre-activation pre = x @ fc_weight.T + fc_bias (kept for backward); the projection is a cuBLAS
`mm`, its bias added after the op. Backward, given dy (M, D):
    dproj_weight = dy.T @ h                                    (cuBLAS; dproj_bias outside the op)
    dpre         = (dy @ proj_weight) * gelu_tanh'(pre)        one GEMM, DGELU epilogue
    dfc_weight   = dpre.T @ x,  dfc_bias = sum_rows(dpre)      one GEMM, BGRADB epilogue
    dx           = dpre @ fc_weight
Unfused, the GELU forward is a pass of its own over the (M, H) activations (read pre, write h),
and the backward writes dh, then reads it back with pre to write dpre (Inductor sums the bias
gradient in the same pass). Fused, the GELU and its derivative run on each tile's fp32 accumulator
inside cuBLAS's kernels, and h is kept from the forward instead of being recomputed in backward.
The fc bias gradient is one more read of dpre if it is summed on its own: cuBLAS runs its BGRADB
epilogue as a kernel of its own (43 us per gpt_125m layer on an H200, 48 on an H100, about what
`dpre.sum(0)` costs), and the DGELU_BGRAD epilogue that would sum it in the DGELU GEMM took 436 us
against 170 us without it. So the weight-gradient GEMM sums it instead, from a column of ones:
the op's input is kept as x_ext = [x | 1 | 0 ... 0] (M, D + 8), written by the norm before it
(under torch.compile, Inductor writes the norm's output straight into that buffer), the forward
GEMM reads its first D columns (a row stride of D + 8), and

    dpre.T @ x_ext = [dfc_weight | dfc_bias | 0 ... 0]                        (H, D + 8), fp32

The eight columns keep each row 16-byte aligned; the seven zero ones cost 1% more of that GEMM.
The epilogue works from the accumulator, so h and dpre come from unrounded values (the unfused
path rounds pre and dh to the activation dtype first): the same function, within bf16 rounding.
In the compiled gpt_125m step the op gained 1.6-2.1% tokens/s on an H200 (kernels/README.md).

Weights: under autocast they are fp32 masters and the activations bf16. `gelu_mlp` casts the
weights to the activations' dtype outside the op (where Inductor schedules the casts, as autocast's)
and hands the op both the compute copies and the parameters, so that the op returns the weight and
bias gradients in the parameters' dtype, the weight gradients straight from the matmul's fp32
accumulator (as `kernels.linear: fp32_wgrad`). With `optimizer.bf16_weight_copy` the compute copies
are the ones the optimizer keeps (`fc_weight_copy`, `proj_weight_copy`): no cast at all.

Where the fused GEMMs run: CUDA, fp16 / bf16 activations, and shapes cuBLASLt has an epilogue
kernel for (it reports when it has none). Everywhere else (the CPU, fp32) the op computes the
same math unfused in PyTorch, so tests on the CPU check the autograd wiring and the GPU tests check
the epilogues against the reference.

Reference: `gelu_mlp_ref` in src/models/components/mlp.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import as_rows, cublaslt, grads_from_ones_column, mm_out, usable_weight_copy, with_ones_column

# -- host launchers -------------------------------------------------------------------------------


def _rows(x: torch.Tensor, D: int) -> torch.Tensor:
    """x (..., D) as (M, D) rows a GEMM can read: x_ext's first D columns as they are (a row
    stride of D + pad), a copy only for layouts without one row after another (an expanded x)."""
    x2 = as_rows(x, D)
    return x2 if x2.stride(0) >= D else x2.contiguous()


def _fused_supported(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def _fc_gelu(x2: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, pre) for x2 (M, D) and w1 (H, D) in one dtype: pre = x2 @ w1.T + b1, h = gelu_tanh(pre)."""
    M, H = x2.shape[0], w1.shape[0]
    if _fused_supported(x2):
        h = torch.empty((M, H), dtype=x2.dtype, device=x2.device)
        pre = torch.empty_like(h)
        try:
            epilogue = cublaslt.EPILOGUE_GELU_AUX_BIAS if b1 is not None else cublaslt.EPILOGUE_GELU_AUX
            cublaslt.gemm(x2, w1.t(), h, epilogue, bias=b1, aux=pre)
            return h, pre
        except cublaslt.CublasLtUnsupported:
            pass
    pre = F.linear(x2, w1, b1)  # (M, H)
    return F.gelu(pre, approximate="tanh"), pre


def _dgelu(dy2: torch.Tensor, w2: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """dpre = (dy2 @ w2) * gelu_tanh'(pre) for dy2 (M, D), w2 (D, H), pre (M, H).

    The DGELU epilogue, without the bias gradient: DGELU_BGRAD, which sums it in the same GEMM,
    took 436 us against 170 us without it at gpt_125m's shape (H200); the bias gradient comes out
    of the weight-gradient GEMM instead (`_fc_weight_grad`)."""
    if _fused_supported(dy2):
        dpre = torch.empty_like(pre)
        try:
            return cublaslt.gemm(dy2, w2, dpre, cublaslt.EPILOGUE_DGELU, aux=pre)
        except cublaslt.CublasLtUnsupported:
            pass
    return torch.ops.aten.gelu_backward(torch.mm(dy2, w2), pre, approximate="tanh")


def _fc_weight_grad(
    dpre: torch.Tensor,
    x2: torch.Tensor,
    weight_dtype: torch.dtype,
    bias_grad: bool,
    x_ext: torch.Tensor | None,
    tuned: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dfc_weight = dpre.T @ x2 in weight_dtype, dfc_bias = sum_rows(dpre) fp32 or None). With
    x_ext = [x2 | 1 | 0...] one GEMM writes both, the bias gradient from the column of ones;
    otherwise, with a bias, one cuBLASLt GEMM whose BGRADB epilogue sums it from the dpre tiles."""
    H, D = dpre.shape[1], x2.shape[1]
    if bias_grad and x_ext is not None:
        return grads_from_ones_column(dpre, x_ext, weight_dtype, tuned)
    if bias_grad and _fused_supported(dpre):
        dw = torch.empty((H, D), dtype=weight_dtype, device=dpre.device)
        db = torch.empty(H, dtype=weight_dtype, device=dpre.device)
        try:
            cublaslt.gemm(dpre.t(), x2, dw, cublaslt.EPILOGUE_BGRAD_OF_A, bias=db)
            return dw, db
        except cublaslt.CublasLtUnsupported:
            pass
    dw = mm_out(dpre.t(), x2, weight_dtype, tuned)
    return dw, dpre.sum(0, dtype=torch.float32) if bias_grad else None


def _compute_copy(weight: torch.Tensor, copy: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`, detached: `copy` when it is one (the optimizer's), else autocast's cast."""
    usable = usable_weight_copy(weight, copy, dtype, "gelu_mlp")
    return usable if usable is not None else weight.detach().to(dtype)


def _check(x: torch.Tensor, fc_weight: torch.Tensor, proj_weight: torch.Tensor) -> None:
    H, D = fc_weight.shape
    if x.shape[-1] != D or proj_weight.shape != (D, H):
        raise ValueError(
            f"gelu_mlp: x (..., D), fc_weight (H, D) and proj_weight (D, H) disagree: "
            f"{tuple(x.shape)}, {tuple(fc_weight.shape)}, {tuple(proj_weight.shape)}"
        )
    if not (x.dtype.is_floating_point and fc_weight.dtype.is_floating_point and proj_weight.dtype.is_floating_point):
        dtypes = f"{x.dtype}, {fc_weight.dtype}, {proj_weight.dtype}"
        raise ValueError(f"gelu_mlp: expected floating-point tensors, got {dtypes}")
    if not (x.device == fc_weight.device == proj_weight.device):
        devices = f"{x.device}, {fc_weight.device}, {proj_weight.device}"
        raise ValueError(f"gelu_mlp: x, fc_weight and proj_weight are on {devices}")


def _gelu_mlp_fwd_launch(
    x: torch.Tensor,
    x_ext: torch.Tensor | None,
    fc_weight: torch.Tensor,
    fc_weight_c: torch.Tensor,
    fc_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_weight_c: torch.Tensor,
    tuned: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y without the projection's bias, h, pre). The `_c` weights are the parameters cast to x's
    dtype (the compute copies); the parameters themselves are inputs only so that autograd routes
    their gradients here. x may be the first D columns of x_ext (rows with a stride of D + pad);
    x_ext itself is only kept for backward. `tuned`: the GEMMs without an epilogue through
    `mm_out`'s timed pick (kernels/tuned_mm.py)."""
    with torch.autocast(x.device.type, enabled=False):
        x2 = _rows(x, x.shape[-1])  # (M, D)
        b1 = fc_bias.to(x.dtype) if fc_bias is not None else None
        h, pre = _fc_gelu(x2, fc_weight_c, b1)  # each (M, H)
        y = mm_out(h, proj_weight_c.t(), h.dtype, tuned)  # (M, D)
    return y.view(x.shape), h, pre


def _gelu_mlp_bwd_launch(
    dy: torch.Tensor,
    x: torch.Tensor,
    x_ext: torch.Tensor | None,
    fc_weight_c: torch.Tensor,
    proj_weight_c: torch.Tensor,
    h: torch.Tensor,
    pre: torch.Tensor,
    fc_bias_grad: bool,
    weight_dtype: torch.dtype,
    tuned: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dfc_weight, dfc_bias, dproj_weight), the weight gradients in `weight_dtype`; without a
    bias gradient to compute, dfc_bias is an empty tensor (custom ops return no optional tensors)."""
    dtype = h.dtype
    with torch.autocast(dy.device.type, enabled=False):
        D = proj_weight_c.shape[0]
        dy2 = dy.reshape(-1, D).to(dtype).contiguous()  # (M, D); an expanded gradient is copied
        x2 = _rows(x, D)  # (M, D)
        dproj_weight = mm_out(dy2.t(), h, weight_dtype, tuned)  # (D, H)
        dpre = _dgelu(dy2, proj_weight_c, pre)  # (M, H)
        dfc_weight, dfc_bias = _fc_weight_grad(dpre, x2, weight_dtype, fc_bias_grad, x_ext, tuned)  # (H, D), (H,)
        dx = mm_out(dpre, fc_weight_c, dtype, tuned).view(x.shape)  # (M, D) -> x's shape
    dfc_bias = dfc_bias.to(weight_dtype) if dfc_bias is not None else dfc_weight.new_empty(0)
    return dx, dfc_weight, dfc_bias, dproj_weight


# -- registration ---------------------------------------------------------------------------------

# `custom_op` (opaque to torch.compile), like `swiglu_linear`: the bodies call cuBLASLt through
# ctypes, which Dynamo cannot trace; Inductor schedules them as single calls. What Inductor can
# fuse stays outside: the weights' casts and the projection's bias (added after the op, it fuses
# with the residual add, and its gradient, a sum of dy, with the neighbouring reductions).
_gelu_mlp_fwd = torch.library.custom_op("kernels::gelu_mlp_fwd", _gelu_mlp_fwd_launch, mutates_args=())
_gelu_mlp_bwd = torch.library.custom_op("kernels::gelu_mlp_bwd", _gelu_mlp_bwd_launch, mutates_args=())


@_gelu_mlp_fwd.register_fake
def _(x, x_ext, fc_weight, fc_weight_c, fc_bias, proj_weight, proj_weight_c, tuned):
    M, H = x.numel() // x.shape[-1], fc_weight.shape[0]
    return x.new_empty(x.shape), x.new_empty((M, H)), x.new_empty((M, H))


@_gelu_mlp_bwd.register_fake
def _(dy, x, x_ext, fc_weight_c, proj_weight_c, h, pre, fc_bias_grad, weight_dtype, tuned):
    H, D = fc_weight_c.shape
    dfc_bias = torch.empty(H if fc_bias_grad else 0, dtype=weight_dtype, device=x.device)
    return (
        x.new_empty(x.shape), torch.empty((H, D), dtype=weight_dtype, device=x.device), dfc_bias,
        torch.empty((D, H), dtype=weight_dtype, device=x.device),
    )  # fmt: skip


def _gelu_mlp_setup(ctx, inputs, output):
    x, x_ext, fc_weight, fc_weight_c, fc_bias, proj_weight, proj_weight_c, tuned = inputs
    _, h, pre = output
    ctx.save_for_backward(x, x_ext, fc_weight_c, proj_weight_c, h, pre)  # x: a view into x_ext when it is given
    ctx.has_fc_bias = fc_bias is not None
    ctx.weight_dtype = fc_weight.dtype
    ctx.tuned = tuned


def _gelu_mlp_grad(ctx, dy, _dh, _dpre):
    x, x_ext, fc_weight_c, proj_weight_c, h, pre = ctx.saved_tensors
    dx, dfc_weight, dfc_bias, dproj_weight = _gelu_mlp_bwd(
        dy, x, x_ext, fc_weight_c, proj_weight_c, h, pre, ctx.has_fc_bias, ctx.weight_dtype, ctx.tuned
    )
    if not ctx.has_fc_bias:
        dfc_bias = None
    # grads for (x; x_ext: none, its first D columns are x; fc_weight; fc_weight_c: none, a
    # detached copy; fc_bias, proj_weight; proj_weight_c: none; tuned)
    return dx, None, dfc_weight, None, dfc_bias, dproj_weight, None, None


_gelu_mlp_fwd.register_autograd(_gelu_mlp_grad, setup_context=_gelu_mlp_setup)


# -- functional -----------------------------------------------------------------------------------


def gelu_mlp(
    x: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    ones_column: bool | None = None,
    fc_weight_copy: torch.Tensor | None = None,
    proj_weight_copy: torch.Tensor | None = None,
    tuned: bool = False,
) -> torch.Tensor:
    """gelu_tanh(x @ fc_weight.T + fc_bias) @ proj_weight.T + proj_bias for x (..., D) -> (..., D);
    the result of `gelu_mlp_ref`, computed in the autocast dtype under autocast and in x's dtype
    otherwise, with the parameters' gradients in their dtypes. Without a gradient to compute (no
    grad mode, or no input that requires one) it is the unfused reference math.

    `ones_column`: the fc bias gradient from a column of ones beside x (see the module's
    docstring); None takes it where the fused GEMMs run (CUDA, fp16/bf16) and the fc layer has a
    bias. The CPU tests force it on to check its math. `fc_weight_copy` / `proj_weight_copy`: the
    weights in the compute dtype, read instead of casting them. `tuned` (`kernels.linear: tuned`):
    the GEMMs without an epilogue on the faster of cuBLAS's pick and cuBLASLt's best for their
    shapes (kernels/tuned_mm.py)."""
    _check(x, fc_weight, proj_weight)
    if fc_weight.dtype != proj_weight.dtype:
        raise ValueError(
            f"gelu_mlp: fc_weight is {fc_weight.dtype} but proj_weight {proj_weight.dtype}; give both one dtype"
        )
    params = (x, fc_weight, fc_bias, proj_weight, proj_bias)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)):
        # Evaluation and generation: the pre-activation the fused forward writes for backward would
        # be wasted, and each new decoding shape would time cuBLASLt's candidates once.
        return F.linear(F.gelu(F.linear(x, fc_weight, fc_bias), approximate="tanh"), proj_weight, proj_bias)
    device = x.device.type
    if torch.is_autocast_enabled(device):
        x = x.to(torch.get_autocast_dtype(device))
    fc_weight_c = _compute_copy(fc_weight, fc_weight_copy, x.dtype)  # (H, D), the compute copies
    proj_weight_c = _compute_copy(proj_weight, proj_weight_copy, x.dtype)  # (D, H)
    if ones_column is None:
        ones_column = fc_bias is not None and _fused_supported(x)
    shape, x_ext = x.shape, None
    if ones_column and fc_bias is not None:
        D = shape[-1]
        x2 = x.reshape(-1, D)  # (M, D)
        x_ext = with_ones_column(x2)  # (M, D + pad): [x | 1 | 0...]
        x = x_ext[:, :D]  # (M, D), a row stride of D + pad
    y = _gelu_mlp_fwd(x, x_ext, fc_weight, fc_weight_c, fc_bias, proj_weight, proj_weight_c, tuned)[0]
    y = y.view(shape)
    return y + proj_bias.to(y.dtype) if proj_bias is not None else y
