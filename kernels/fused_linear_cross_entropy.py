"""Fused linear + cross-entropy: loss(hidden @ weight.T, labels) without the (N, V) logits.

For each chunk of C tokens (C x V logits, a few hundred MiB at most):
    logits_c  = hidden_c @ weight.T                       (cuBLAS*, in the activation dtype)
    one pass over logits_c (`_loss_and_numerators_kernel`): the row losses, and over the logits
              the gradient's numerators G'_c, with d loss_c / d logits_c = a * G'_c - eps / V
              for one fp32 scale a per row
    dhidden_c = a * (G'_c @ weight) - (eps / V) sum_v weight_v         (cuBLAS*, fp32 result)
    dweight  += G'_c.T @ (a * hidden_c)                                (cuBLAS*)
and, with label smoothing, dweight -= (eps / V) sum_i hidden_i (one broadcast row) at the end.
(*) Each GEMM runs the faster of torch's call and cuBLASLt's best candidate for its shape, timed on
its first call (tuned_mm.py; kept in checkpoints like the linear layers' picks). On an H100 that
took the logits GEMM from 0.388 to 0.351 ms per 1024-token chunk and the accumulation into dweight
(cuBLAS's beta = 1) from 0.484 to about 0.39 (kernels/README.md).
The loss is a sum, so its gradients are linear in the upstream scalar g: they are computed in the
forward pass with g = 1 and scaled by g in backward. That takes three matmuls (the minimum) instead
of recomputing the logits in backward, and keeps at most one chunk of logits alive. The weight
gradient accumulates in the weight's dtype, chunk by chunk, like Liger-Kernel's default. With tied
embeddings autograd adds dweight to the embedding's gradient as usual. When no gradient is needed
(evaluation, the frozen reference model of DPO) only the first matmul and the loss run.

Why numerators. The gradient p - onehot needs the row's log-sum-exp before its first element can
be written, and a row of Qwen2's vocabulary (304 KB in bf16) fits in no SM: written directly, the
gradient costs two reads of the logits and a write. Instead the pass writes exp(x - c) with a shift
c fixed before the row is read, sums those in fp32 (Z), and leaves the division by Z to the
matmuls' row scale a: one read and one write (2/3 of the bytes). Per row (label y, eps = label
smoothing, z = z-loss weight, lse = c + log Z):
    G'_j = exp(x_j - c)                     for j != y
    G'_y = exp(x_y - c) - (1 - eps) / a     (computed in fp32 before rounding, as p_y - 1 is)
    a    = (1 + 2 z lse) / Z                so that a * G' - eps / V = p (1 + 2 z lse) - (1 - eps) onehot - eps / V
    loss = lse - (1 - eps) x_y - (eps / V) sum_j x_j + z lse^2
c starts at the label's logit x_y, so Z >= 1 and no term underflows that would not in the
softmax itself. A block whose maximum exceeds c by more than RESCALE_NATS (the row's loss is
above ~30 nats: a diverging model) raises c to that maximum and rescales the row's written blocks
once more (read and write): exact in every case, slower only in that one. Ignored rows are zero
(a = 0). The cross-entropy op's own row kernels are in `cross_entropy.py`.

Reference: `fused_linear_cross_entropy_ref` in src/models/components/loss.py; the chunking idea of
mgmalek/efficient_cross_entropy and Liger-Kernel; the online softmax of Milakov & Gimelshein (2018).

Limits: hidden (N, H) and weight (V, H) of one floating dtype (under autocast both are cast to the
autocast dtype first, as the reference matmul is); labels (N,) in [0, V) or ignore_index; no bias.
fp16 cannot hold the numerators (Z alone reaches V, beyond 65504): in fp16 the pass writes the
gradient itself with cross_entropy.py's two-read row kernel (one read more per row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import num_sms
from kernels.cross_entropy import ce_forward_backward_rows, ce_forward_rows, check_logits_labels, fwd_bwd_launch_params
from kernels.tuned_mm import mm_into, mm_out, plan_into

# -- kernels --------------------------------------------------------------------------------------
# The matmuls are cuBLAS / cuBLASLt (tuned_mm.py); the evaluation path uses cross_entropy.py's
# forward row kernel.

RESCALE_NATS = 30.0  # see the module docstring: bounds Z by V * e^30, far inside fp32 and bf16


@triton.jit
def _store_scaled_row(SRC_ptr, DST_ptr, scale, H, BLOCK_H: tl.constexpr):
    """dst[:H] = scale * src[:H], in dst's dtype."""
    for start in range(0, H, BLOCK_H):
        cols = start + tl.arange(0, BLOCK_H)
        mask = cols < H
        x = tl.load(SRC_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DST_ptr + cols, (x * scale).to(DST_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _loss_and_numerators_kernel(
    LOGITS_ptr,  # (C, V) a chunk's logits, overwritten with the gradient numerators G'
    LABELS_ptr,  # (C,) integer labels
    LOSS_ptr,  # (C,) fp32 output: per-row loss (0 for ignored rows)
    SCALE_ptr,  # (C,) fp32 output: per-row a (0 for ignored rows)
    HIDDEN_ptr,  # (C, H) the chunk's hidden states, read when WRITE_HS
    HS_ptr,  # (C, H) output when WRITE_HS: a * hidden, the weight gradient's right operand
    stride_lm,
    stride_hm,
    stride_sm,
    N,
    V,
    H,
    ignore_index,
    label_smoothing,
    z_loss,
    RESCALE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    WRITE_HS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    MAX_BLOCKS: tl.constexpr,  # a power of two >= cdiv(V, BLOCK_V)
):
    """A fixed number of programs (a few per SM) loop over rows; one read and one write of each
    row (plus a rescale pass over a row's written part when its shift must move: see the module
    docstring)."""
    label_smoothing = tl.cast(label_smoothing, tl.float32)  # Inductor may pass Python floats as fp64
    z_loss = tl.cast(z_loss, tl.float32)
    dtype = LOGITS_ptr.dtype.element_ty
    for row in range(tl.program_id(0), N, tl.num_programs(0)):
        row_ptr = LOGITS_ptr + tl.cast(row, tl.int64) * stride_lm
        hidden_row = HIDDEN_ptr + tl.cast(row, tl.int64) * stride_hm
        hs_row = HS_ptr + tl.cast(row, tl.int64) * stride_sm
        label = tl.load(LABELS_ptr + row).to(tl.int64)
        if label == ignore_index:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(row_ptr + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(dtype), mask=cols < V)
            tl.store(LOSS_ptr + row, 0.0)
            tl.store(SCALE_ptr + row, 0.0)
            if WRITE_HS:
                _store_scaled_row(hidden_row, hs_row, 0.0, H, BLOCK_H)
        else:
            # A label outside [0, V) (and not ignore_index) is neither read nor written past the row:
            # its target is NaN, so the row's loss and gradients are NaN, which the trainer's
            # non-finite check reports (the CPU path raises on it).
            in_vocab = (label >= 0) & (label < V)
            target = tl.load(row_ptr + label, mask=in_vocab, other=float("nan")).to(tl.float32)
            shift = target
            z = tl.zeros((), dtype=tl.float32)
            x_sum = tl.zeros((), dtype=tl.float32)
            block_ids = tl.arange(0, MAX_BLOCKS)
            shifts = tl.zeros((MAX_BLOCKS,), dtype=tl.float32) + target  # the shift each block was written with
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < V
                x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
                # A block whose max exceeds the shift by RESCALE moves the shift up, without a
                # branch; the blocks written before are rescaled after the loop, so this loop
                # stays a plain stream.
                block_max = tl.max(x, axis=0)
                new_shift = tl.where(block_max > shift + RESCALE, block_max, shift)
                e = tl.exp(x - new_shift)  # masked tail: exp(-inf) = 0
                z = z * tl.exp(shift - new_shift) + tl.sum(e, axis=0)
                shift = new_shift
                shifts = tl.where(block_ids == start // BLOCK_V, shift, shifts)
                if HAS_SMOOTHING:
                    x_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
                # The label's entry is rewritten last. Leaving it out of this store instead (a mask
                # `cols != label`, not uniform over a vector's elements) made Triton store element
                # by element: 0.90 ms per 1024 x 151936 bf16 chunk on an H100 against 0.23.
                tl.store(row_ptr + cols, e.to(dtype), mask=mask)
            if tl.min(shifts, axis=0) < shift:  # rare: blocks written with an older shift
                for start in range(0, V, BLOCK_V):
                    block_shift = tl.sum(tl.where(block_ids == start // BLOCK_V, shifts, 0.0), axis=0)
                    if block_shift < shift:
                        cols = start + tl.arange(0, BLOCK_V)
                        keep = cols < V
                        p = tl.load(row_ptr + cols, mask=keep, other=0.0).to(tl.float32)
                        tl.store(row_ptr + cols, (p * tl.exp(block_shift - shift)).to(dtype), mask=keep)
            lse = shift + tl.log(z)
            loss = lse - (1.0 - label_smoothing) * target + z_loss * lse * lse
            if HAS_SMOOTHING:
                loss -= label_smoothing * x_sum / V
            scale = (1.0 + 2.0 * z_loss * lse) / z
            # 1 + 2 z lse == 0 (a z-loss exactly cancelling) would leave G'_y infinite; a scale of
            # 1e-30 instead keeps it finite and changes the other entries by 1e-30 * p.
            scale = tl.where(tl.abs(scale) < 1e-30, 1e-30, scale)
            tl.debug_barrier()  # the block stores above, by any thread, land before the label's entry
            tl.store(row_ptr + label, (tl.exp(target - shift) - (1.0 - label_smoothing) / scale).to(dtype), mask=in_vocab)
            tl.store(LOSS_ptr + row, loss)
            tl.store(SCALE_ptr + row, scale)
            if WRITE_HS:
                _store_scaled_row(hidden_row, hs_row, scale, H, BLOCK_H)


@triton.jit
def _finish_dhidden_kernel(
    RAW_ptr,  # (C, H) fp32: G' @ weight
    SCALE_ptr,  # (C,) fp32: a per row
    LABELS_ptr,  # (C,)
    WSUM_ptr,  # (H,) fp32: sum_v weight_v, read when HAS_SMOOTHING
    DH_ptr,  # (C, H) output: a * raw - [y != ignore] (eps / V) wsum, in the hidden dtype
    stride_rm,
    stride_dm,
    H,
    ignore_index,
    uniform,  # eps / V
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    d = tl.load(RAW_ptr + row * stride_rm + cols, mask=mask, other=0.0) * tl.load(SCALE_ptr + row)
    if HAS_SMOOTHING:
        label = tl.load(LABELS_ptr + row).to(tl.int64)
        weight = tl.where(label == ignore_index, 0.0, tl.cast(uniform, tl.float32))
        d -= weight * tl.load(WSUM_ptr + cols, mask=mask, other=0.0)
    tl.store(DH_ptr + row * stride_dm + cols, d.to(DH_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(
    X_ptr,  # (n,) contiguous, scaled in place
    G_ptr,  # () the upstream gradient
    n,
    BLOCK: tl.constexpr,
):
    """x *= g with g read on the device. (Eager `x.mul_(g)` with a 0-d CUDA tensor ran at a third
    of the bandwidth on an H100: 0.53 ms for the 272 MB weight gradient of Qwen2-0.5B.)
    g == 1, a plain `loss.backward()` of a mean loss, leaves x as it is: each program reads g and
    returns, so the pass over x (two bytes read and written per element) is skipped without the
    host sync that checking g on the host would cost."""
    g = tl.load(G_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
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
    return max(1, min(n_tokens, 1 << (fit.bit_length() - 1)))  # at least 1: no tokens make no chunks


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
    N, H = hidden.shape
    V = weight.shape[0]
    chunk = chunk_size or chunk_tokens(N, V, hidden.element_size())
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    dhidden = hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty(0)  # contiguous rows
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

    # Training: per chunk, the logits, one pass writing the loss and the gradient's numerators over
    # them, then the two gradient matmuls. Running the loss pass on a
    # second stream beside the matmuls was measured slower on an H100 (cuBLAS occupies every SM),
    # so all runs in order.
    programs = ce_programs(hidden.device)
    C = min(chunk, N)
    buffer = torch.empty((C, V), dtype=hidden.dtype, device=hidden.device)  # logits, then G' (or G)
    # The numerators need fp32's exponent range (Z alone reaches V, beyond fp16's 65504): fp16
    # writes the gradient G itself with the two-read row kernel, and the matmuls use it unscaled.
    numerators = hidden.dtype != torch.float16
    scale = torch.empty(N, dtype=torch.float32, device=hidden.device)
    hs = torch.empty((C, H), dtype=hidden.dtype, device=hidden.device) if grad_weight and numerators else hidden
    smoothing = label_smoothing > 0.0
    weight_sum = weight.sum(0, dtype=torch.float32) if numerators and smoothing and grad_hidden else scale  # (H,)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        grads = buffer[: end - start]  # (c, V)
        mm_into(hidden[start:end], weight.t(), grads)
        if numerators:
            rhs = hs[: end - start]  # (c, H): a * hidden, written by the pass
            loss_and_numerators_rows(
                grads, labels[start:end], loss[start:end], scale[start:end], hidden[start:end], rhs,
                ignore_index, label_smoothing, z_loss, programs, write_hs=grad_weight,
            )  # fmt: skip
        else:
            rhs = hidden[start:end]
            ce_forward_backward_rows(grads, labels[start:end], loss[start:end], ignore_index, label_smoothing, z_loss, programs)
        if grad_hidden and numerators:
            raw = _mm_fp32(grads, weight)  # (c, H)
            _finish_dhidden_kernel[(end - start, triton.cdiv(H, FINISH_BLOCK_H))](
                raw, scale[start:end], labels[start:end], weight_sum, dhidden[start:end],
                raw.stride(0), dhidden.stride(0), H, ignore_index, label_smoothing / V,
                HAS_SMOOTHING=smoothing, BLOCK_H=FINISH_BLOCK_H,
            )  # fmt: skip
        elif grad_hidden:
            mm_into(grads, weight, dhidden[start:end])  # (c, H)
        if grad_weight:
            if start == 0:
                dweight = weight.new_empty(weight.shape)  # contiguous, whatever the weight's strides
                plan_dweight_accumulation(grads, rhs, dweight, N, chunk)
            mm_into(grads.t(), rhs, dweight, accumulate=start > 0)  # dweight (V, H) (+)= G'_c.T @ rhs
    if grad_weight and N == 0:  # no tokens, no chunks: the weight's gradient is zero
        dweight = weight.new_zeros(weight.shape)
    if grad_weight and numerators and smoothing:  # the uniform term: every vocabulary row gets -(eps / V) sum_i h_i
        kept = (labels != ignore_index)[:, None]
        dweight.sub_(torch.where(kept, hidden, 0).sum(0, dtype=torch.float32).mul_(label_smoothing / V))
    return loss.sum(), dhidden, dweight


FINISH_BLOCK_H = 1024


def plan_dweight_accumulation(grads: torch.Tensor, rhs: torch.Tensor, dweight: torch.Tensor, N: int, chunk: int) -> None:
    """Time the accumulating dweight GEMMs of the chunks after the first (full chunks, and a shorter
    last one) on the fresh dweight before the first chunk writes it: timed later, they would need
    a copy of dweight (272 MB for Qwen2-0.5B) to keep its sum."""
    if N <= chunk:  # one chunk: nothing accumulates
        return
    for rows in sorted({chunk, N % chunk} - {0}):
        plan_into(grads[:rows].t(), rhs[:rows], dweight, accumulate=True)


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result, rounded once: a bf16 / fp16 GEMM with fp32 output on a GPU (the
    faster of torch's `out_dtype` call and cuBLASLt's). The CPU (the interpreter's tests) has no such
    mm; there the product is rounded to the operands' dtype first."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda:
        return mm_out(a, b, torch.float32, tuned=True)
    return torch.mm(a, b).float()


def loss_and_numerators_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    scale: torch.Tensor,
    hidden: torch.Tensor,
    hs: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    programs: int,
    write_hs: bool = True,
    launch: dict | None = None,
) -> None:
    """Per-row loss and scale a of `logits` (M, V) into the (M,) fp32 buffers, the gradient's
    numerators G' written over `logits`, and a * hidden into `hs` (M, H) when `write_hs`, in one
    launch of `programs` programs. d (sum of losses) / d logits = a[:, None] * G' - eps / V.
    `launch` overrides the block size and warps (BLOCK_V, num_warps) for tests and sweeps."""
    if logits.stride(-1) != 1 or (write_hs and (hidden.stride(-1) != 1 or hs.stride(-1) != 1)):
        raise ValueError("fused_linear_cross_entropy: the logits, hidden and hs rows need a unit stride")
    H = hidden.shape[-1]
    launch = launch or fwd_bwd_launch_params(logits.shape[1])
    _loss_and_numerators_kernel[(max(1, min(programs, logits.shape[0])),)](
        logits, labels, loss, scale, hidden, hs,
        logits.stride(0), hidden.stride(0), hs.stride(0),
        logits.shape[0], logits.shape[1], H,
        ignore_index, label_smoothing, z_loss,
        RESCALE=RESCALE_NATS, HAS_SMOOTHING=label_smoothing > 0.0, WRITE_HS=write_hs,
        BLOCK_H=min(1024, triton.next_power_of_2(H)), MAX_BLOCKS=triton.next_power_of_2(triton.cdiv(logits.shape[1], launch["BLOCK_V"])),
        **launch,
    )  # fmt: skip


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
    dhidden = hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty(0)  # contiguous, as the op's
    dweight = weight.new_empty(weight.shape) if grad_weight else weight.new_empty(0)
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
    labels = labels.contiguous()  # the kernels read labels[row] at a unit stride
    grad = torch.is_grad_enabled()
    loss, _dhidden, _dweight = _fused_linear_cross_entropy_fwd(
        hidden, weight, labels,
        int(ignore_index), float(label_smoothing), float(z_loss), int(chunk_size or 0),
        grad and hidden.requires_grad, grad and weight.requires_grad,
    )  # fmt: skip
    return loss

