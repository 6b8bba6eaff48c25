"""Fused linear + cross-entropy: loss(hidden @ weight.T, labels) without the (N, V) logits.

For each chunk of C tokens (C x V logits, a few hundred MiB at most):
    logits_c  = hidden_c @ weight.T                          (cuBLAS, in the activation dtype)
    loss_c    = row losses of logits_c,  G_c = d loss_c / d logits_c written over logits_c
                (one launch of `_cross_entropy_fwd_bwd_kernel`, in place)
    dhidden_c = G_c @ weight,   dweight += G_c.T @ hidden_c   (cuBLAS)
The loss is a sum, so its gradients are linear in the upstream scalar g: they are computed in the
forward pass with g = 1 and scaled by g in backward. That takes three matmuls (the minimum) instead
of recomputing the logits in backward, and keeps at most one chunk of logits alive. The weight
gradient accumulates in the weight's dtype, chunk by chunk, like Liger-Kernel's default. With tied
embeddings autograd adds dweight to the embedding's gradient as usual. When no gradient is needed
(evaluation, the frozen reference model of DPO) only the first matmul and the loss run.

Math of the row kernels (ignore_index, label smoothing, z-loss): see `cross_entropy.py`.
Reference: `fused_linear_cross_entropy_ref` in src/models/components/loss.py; the chunking idea of
mgmalek/efficient_cross_entropy and Liger-Kernel.

Limits: hidden (N, H) and weight (V, H) of one floating dtype (under autocast both are cast to the
autocast dtype first, as the reference matmul is); labels (N,) in [0, V) or ignore_index; no bias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import num_sms
from kernels.cross_entropy import ce_forward_backward_rows, ce_forward_rows, check_logits_labels

# -- kernels --------------------------------------------------------------------------------------
# The row kernels are those of cross_entropy.py; the matmuls are cuBLAS (torch.mm).


@triton.jit
def _scale_kernel(
    X_ptr,  # (n,) contiguous, scaled in place
    G_ptr,  # () the upstream gradient
    n,
    BLOCK: tl.constexpr,
):
    """x *= g with g read on the device. (Eager `x.mul_(g)` with a 0-d CUDA tensor ran at a third
    of the bandwidth on an H100: 0.53 ms for the 272 MB weight gradient of Qwen2-0.5B.)"""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G_ptr).to(tl.float32)
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(X_ptr + offs, (x * g).to(X_ptr.dtype.element_ty), mask=mask)


# -- launchers ------------------------------------------------------------------------------------

LOGITS_CHUNK_BYTES = 320 * 2**20


def chunk_tokens(n_tokens: int, vocab: int, itemsize: int) -> int:
    """Tokens per chunk: the largest power of two whose logits fit in LOGITS_CHUNK_BYTES (1024
    tokens for a 151936 bf16 vocabulary, 2048 for 50304), at least 16 and at most the token count.
    Bigger chunks make the dweight accumulation (which reads and writes all of dweight once per
    chunk) cheaper relative to its matmul; the budget keeps the extra memory near 0.3 GiB."""
    fit = max(16, LOGITS_CHUNK_BYTES // (vocab * itemsize))
    return min(n_tokens, 1 << (fit.bit_length() - 1))


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, op: str) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"{op}: hidden is {hidden.dtype} but weight is {weight.dtype}; cast them to one dtype (or run under autocast)"
        )
    check_logits_labels(hidden, labels, op)


def ce_programs(device: torch.device) -> int:
    """Programs of the one-launch loss + gradient kernel: CE_PROGRAMS_PER_SM per SM, each looping
    over rows. On an H100 four per SM (32 warps each) were fastest in the whole op; one program
    per SM or fewer leave HBM idle (each program reads its row sequentially)."""
    return max(1, num_sms(device) * CE_PROGRAMS_PER_SM)


CE_PROGRAMS_PER_SM = 4


def _fused_linear_cross_entropy_fwd_launch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    chunk_size: int,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_linear_inputs(hidden, weight, labels, "fused_linear_cross_entropy")
    N = hidden.shape[0]
    V = weight.shape[0]
    chunk = chunk_size or chunk_tokens(N, V, hidden.element_size())
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    dhidden = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    dweight = weight.new_empty(0)
    if not (grad_hidden or grad_weight):  # evaluation: one matmul and the loss row kernel per chunk
        lse, target = torch.empty_like(loss), torch.empty_like(loss)
        for start in range(0, N, chunk):
            end = min(start + chunk, N)
            logits = torch.mm(hidden[start:end], weight.t())  # (C, V)
            ce_forward_rows(
                logits, labels[start:end], loss[start:end], lse[start:end], target[start:end],
                ignore_index, label_smoothing, z_loss,
            )  # fmt: skip
            del logits  # free this chunk before the next one is allocated
        return loss.sum(), dhidden, dweight

    # Training: per chunk, logits (cuBLAS), loss + gradient over the logits in one launch, then
    # the two gradient matmuls (cuBLAS). Running the loss kernel on a second stream beside the
    # matmuls was measured slower on an H100 (cuBLAS occupies every SM), so all runs in order.
    programs = ce_programs(hidden.device)
    buffer = torch.empty((min(chunk, N), V), dtype=hidden.dtype, device=hidden.device)  # logits, then their gradient
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        grads = buffer[: end - start]  # (C, V)
        torch.mm(hidden[start:end], weight.t(), out=grads)
        ce_forward_backward_rows(grads, labels[start:end], loss[start:end], ignore_index, label_smoothing, z_loss, programs)
        if grad_hidden:
            torch.mm(grads, weight, out=dhidden[start:end])  # (C, H)
        if grad_weight:
            if start == 0:
                dweight = torch.mm(grads.t(), hidden[start:end])  # (V, H)
            else:
                dweight.addmm_(grads.t(), hidden[start:end])
    return loss.sum(), dhidden, dweight


def _scale_launch_(x: torch.Tensor, grad: torch.Tensor) -> None:
    if not x.is_contiguous():
        raise ValueError("fused_linear_cross_entropy: the saved gradient to scale must be contiguous")
    block = 2048
    _scale_kernel[(triton.cdiv(x.numel(), block),)](x, grad.float(), x.numel(), BLOCK=block, num_warps=8)


# -- registration ---------------------------------------------------------------------------------
# `custom_op`, not `triton_op`: torch.compile treats these ops as opaque calls instead of tracing
# into the chunk loop. Inductor has nothing to fuse there (cuBLAS matmuls and one row kernel per
# chunk), and tracing the loop's writes into views of one buffer and in-place accumulation made
# Inductor emit wrong code at real sizes on an H100 with torch 2.11 (an illegal memory access
# with several chunks). Opaque, the op runs exactly as in eager, inside a fullgraph compile.

_scale_ = torch.library.custom_op("kernels::fused_linear_cross_entropy_scale_", _scale_launch_, mutates_args=("x",))

_fused_linear_cross_entropy_fwd = torch.library.custom_op(
    "kernels::fused_linear_cross_entropy_fwd", _fused_linear_cross_entropy_fwd_launch, mutates_args=()
)


@_fused_linear_cross_entropy_fwd.register_fake
def _(hidden, weight, labels, ignore_index, label_smoothing, z_loss, chunk_size, grad_hidden, grad_weight):
    loss = hidden.new_empty((), dtype=torch.float32)
    dhidden = torch.empty_like(hidden) if grad_hidden else hidden.new_empty(0)
    dweight = torch.empty_like(weight) if grad_weight else weight.new_empty(0)
    return loss, dhidden, dweight


def _fused_linear_cross_entropy_setup(ctx, inputs, output):
    _loss, dhidden, dweight = output
    ctx.mark_non_differentiable(dhidden, dweight)
    ctx.set_materialize_grads(False)
    ctx.consumed = False
    ctx.save_for_backward(dhidden, dweight)


def _fused_linear_cross_entropy_grad(ctx, grad_loss, _none_dhidden, _none_dweight):
    if ctx.consumed:
        raise RuntimeError(
            "fused_linear_cross_entropy: backward already scaled its precomputed gradients; a second backward "
            "through the same graph needs kernels.cross_entropy=torch"
        )
    ctx.consumed = True
    dhidden, dweight = ctx.saved_tensors
    if torch.compiler.is_compiling():
        # Traced into a compiled backward: out of place, so that Inductor folds the scale into the
        # kernel that reads the gradient next (the cast to fp32 master weights, the tied embedding's
        # add) instead of a pass of its own over dweight (272 MB for Qwen2-0.5B); the product is
        # not kept beside dweight, since that kernel consumes it.
        dhidden = dhidden * grad_loss if ctx.needs_input_grad[0] else None
        dweight = dweight * grad_loss if ctx.needs_input_grad[1] else None
        return dhidden, dweight, None, None, None, None, None, None, None
    # Eager: scale in place, since a second copy of dweight would cost as much memory as the chunked
    # logits saved.
    if ctx.needs_input_grad[0]:
        _scale_(dhidden, grad_loss)
    if ctx.needs_input_grad[1]:
        _scale_(dweight, grad_loss)
    dhidden = dhidden if ctx.needs_input_grad[0] else None
    dweight = dweight if ctx.needs_input_grad[1] else None
    # grads for (hidden, weight, labels, ignore_index, label_smoothing, z_loss, chunk_size, grad_hidden, grad_weight)
    return dhidden, dweight, None, None, None, None, None, None, None


_fused_linear_cross_entropy_fwd.register_autograd(
    _fused_linear_cross_entropy_grad, setup_context=_fused_linear_cross_entropy_setup
)


# -- functional -----------------------------------------------------------------------------------


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of hidden (N, H) @ weight (V, H).T against labels (N,),
    never building the (N, V) logits; as `fused_linear_cross_entropy_ref`. `chunk_size` (tokens per
    chunk) defaults to `chunk_tokens(...)`."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"fused_linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"fused_linear_cross_entropy: chunk_size must be positive, got {chunk_size}")
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    hidden = hidden.contiguous()
    grad = torch.is_grad_enabled()
    loss, _dhidden, _dweight = _fused_linear_cross_entropy_fwd(
        hidden, weight, labels,
        int(ignore_index), float(label_smoothing), float(z_loss), int(chunk_size or 0),
        grad and hidden.requires_grad, grad and weight.requires_grad,
    )  # fmt: skip
    return loss

