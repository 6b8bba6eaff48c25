"""Cross-entropy over (N, V) logits with ignore_index, label smoothing and an optional z-loss.

Math (per row x with label y, eps = label_smoothing, z = z-loss weight, p = softmax(x)):
    lse  = log(sum_j exp(x_j))                      (online max / sum over blocks of V, fp32)
    loss = lse - (1 - eps) x_y - (eps / V) sum_j x_j + z lse^2        (0 where y == ignore_index)
    dx_j = g * (p_j (1 + 2 z lse) - (1 - eps) [j == y] - eps / V)      (g = upstream gradient)
The forward reads the logits once and keeps only the per-row lse (fp32, N floats). The backward
reads them once more and writes the gradient *into the logits tensor* (in place), so training
needs no second (N, V) buffer and no fp32 copy of bf16 logits. The consequence: after backward
the logits passed in hold their gradient, and a second backward through the same graph is an
error. The returned loss is the fp32 SUM over non-ignored rows (the caller divides by the count).

The two row kernels (`_cross_entropy_fwd_kernel`, `_cross_entropy_bwd_kernel`) and their host
helpers are shared with `fused_linear_cross_entropy.py` and `token_logprobs.py`, which run them on
chunks of logits. References: `cross_entropy_ref` in src/models/components/loss.py; the online
softmax of Milakov & Gimelshein (2018).

Limits: logits (N, V) fp32 / fp16 / bf16 with a unit stride on V; labels (N,) integer in [0, V)
or ignore_index (other values are not checked on the device and give garbage for that row).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# -- kernels --------------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_fwd_kernel(
    LOGITS_ptr,  # (N, V) logits, read only
    LABELS_ptr,  # (N,) integer labels
    LOSS_ptr,  # (N,) fp32 output: per-row loss (0 for ignored rows)
    LSE_ptr,  # (N,) fp32 output: per-row log-sum-exp, saved for backward
    TARGET_ptr,  # (N,) fp32 output: the label's logit x_y (0 for ignored rows)
    stride_lm,
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    label_smoothing = tl.cast(label_smoothing, tl.float32)  # Inductor may pass Python floats as fp64
    z_loss = tl.cast(z_loss, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS_ptr + row).to(tl.int64)
    row_ptr = LOGITS_ptr + row * stride_lm
    if label == ignore_index:  # early return, not a value merged across branches (Triton types those strictly)
        tl.store(LOSS_ptr + row, 0.0)
        tl.store(LSE_ptr + row, 0.0)
        tl.store(TARGET_ptr + row, 0.0)
        return
    m = float("-inf")
    s = 0.0
    x_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
        if HAS_SMOOTHING:
            x_sum += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
    lse = m + tl.log(s)
    # A label outside [0, V) (and not ignore_index) is not read past the row: the row's loss
    # is NaN instead, which the trainer's non-finite check reports (the CPU path raises on it).
    target = tl.load(row_ptr + label, mask=(label >= 0) & (label < V), other=float("nan")).to(tl.float32)
    loss = lse - (1.0 - label_smoothing) * target + z_loss * lse * lse
    if HAS_SMOOTHING:
        loss -= label_smoothing * x_sum / V
    tl.store(LOSS_ptr + row, loss)
    tl.store(LSE_ptr + row, lse)
    tl.store(TARGET_ptr + row, target)


@triton.jit
def _cross_entropy_bwd_kernel(
    LOGITS_ptr,  # (N, V) logits, read
    DLOGITS_ptr,  # (N, V) gradient, written (may be LOGITS_ptr: in place)
    LABELS_ptr,  # (N,) integer labels
    LSE_ptr,  # (N,) fp32 log-sum-exp from the forward
    GRAD_ptr,  # upstream gradient: one fp32 scalar (stride_g = 0) or one per row
    stride_lm,
    stride_dm,
    stride_g,
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    BLOCK_V: tl.constexpr,
):
    label_smoothing = tl.cast(label_smoothing, tl.float32)  # Inductor may pass Python floats as fp64
    z_loss = tl.cast(z_loss, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS_ptr + row).to(tl.int64)
    in_row = LOGITS_ptr + row * stride_lm
    out_row = DLOGITS_ptr + row * stride_dm
    if label == ignore_index:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(out_row + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(DLOGITS_ptr.dtype.element_ty), mask=cols < V)
        return
    g = tl.load(GRAD_ptr + row * stride_g).to(tl.float32)
    lse = tl.load(LSE_ptr + row)
    p_scale = g * (1.0 + 2.0 * z_loss * lse)
    uniform = g * label_smoothing / V
    hit = g * (1.0 - label_smoothing)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(in_row + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.exp(x - lse) * p_scale - uniform - tl.where(cols == label, hit, 0.0)
        tl.store(out_row + cols, d.to(DLOGITS_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cross_entropy_fwd_bwd_kernel(
    LOGITS_ptr,  # (N, V) logits, overwritten with d loss / d logits (upstream gradient 1)
    LABELS_ptr,  # (N,) integer labels
    LOSS_ptr,  # (N,) fp32 output: per-row loss (0 for ignored rows)
    stride_lm,
    N,
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Loss and gradient in one launch: a fixed number of programs (a couple per SM) loop over
    rows, reading each row twice (log-sum-exp, then the gradient written over it). The second pass
    runs backwards, over the most recently read blocks first, which are the likeliest to be still
    in L2. The fused linear + cross-entropy ran it until 2026-12-07 and now reads each row once
    (`fused_linear_cross_entropy.py`); it stays as the baseline of the row-kernel probes
    (benchmarks/probe_ce_split.py, probe_ce_resident.py)."""
    label_smoothing = tl.cast(label_smoothing, tl.float32)  # Inductor may pass Python floats as fp64
    z_loss = tl.cast(z_loss, tl.float32)
    n_blocks = tl.cdiv(V, BLOCK_V)
    for row in range(tl.program_id(0), N, tl.num_programs(0)):
        row_ptr = LOGITS_ptr + tl.cast(row, tl.int64) * stride_lm
        label = tl.load(LABELS_ptr + row).to(tl.int64)
        if label == ignore_index:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                tl.store(row_ptr + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(LOGITS_ptr.dtype.element_ty), mask=cols < V)
            tl.store(LOSS_ptr + row, 0.0)
        else:
            m = float("-inf")
            s = 0.0
            x_sum = 0.0
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
                m = m_new
                if HAS_SMOOTHING:
                    x_sum += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
            lse = m + tl.log(s)
            # A label outside [0, V) (and not ignore_index) is not read past the row: the row's loss
            # is NaN instead, which the trainer's non-finite check reports (the CPU path raises on it).
            target = tl.load(row_ptr + label, mask=(label >= 0) & (label < V), other=float("nan")).to(tl.float32)
            loss = lse - (1.0 - label_smoothing) * target + z_loss * lse * lse
            if HAS_SMOOTHING:
                loss -= label_smoothing * x_sum / V
            tl.store(LOSS_ptr + row, loss)
            p_scale = 1.0 + 2.0 * z_loss * lse
            uniform = label_smoothing / V
            hit = 1.0 - label_smoothing
            for i in range(0, n_blocks):
                cols = (n_blocks - 1 - i) * BLOCK_V + tl.arange(0, BLOCK_V)
                mask = cols < V
                x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
                d = tl.exp(x - lse) * p_scale - uniform - tl.where(cols == label, hit, 0.0)
                tl.store(row_ptr + cols, d.to(LOGITS_ptr.dtype.element_ty), mask=mask)


# -- launchers ------------------------------------------------------------------------------------


def launch_params(vocab: int) -> dict:
    """One program per row, looping over V in blocks of up to 8K columns with 16 warps: each
    thread keeps 16 elements (32 bytes of bf16) in flight per step, which streams at full
    bandwidth for V = 50K-150K; small vocabularies get one block and fewer warps."""
    block_v = min(8192, triton.next_power_of_2(vocab))
    return {"BLOCK_V": block_v, "num_warps": max(1, min(16, block_v // 512))}


def fwd_bwd_launch_params(vocab: int) -> dict:
    """The one-launch loss + gradient kernel: blocks of up to 16K columns with 16 warps (32
    elements per thread per step). On an H100 at 1024 x 151936 bf16 that took 0.324 ms against
    0.343 ms for 8K-column blocks with 32 warps (triton 3.6, the best of 54 launch settings)."""
    block_v = min(16384, triton.next_power_of_2(vocab))
    return {"BLOCK_V": block_v, "num_warps": max(1, min(16, block_v // 1024))}


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, op: str) -> None:
    if logits.dim() != 2 or labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"{op}: expected logits (N, V) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{op}: labels must be an integer tensor, got {labels.dtype}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"{op}: logits must be floating point, got {logits.dtype}")


def ce_forward_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    lse: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> None:
    """Per-row loss, lse and label logit of `logits` (M, V) into the (M,) fp32 buffers."""
    _cross_entropy_fwd_kernel[(logits.shape[0],)](
        logits, labels, loss, lse, target,
        logits.stride(0), logits.shape[1],
        ignore_index, label_smoothing, z_loss,
        HAS_SMOOTHING=label_smoothing > 0.0, **launch_params(logits.shape[1]),
    )  # fmt: skip


def ce_backward_rows(
    logits: torch.Tensor,
    dlogits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> None:
    """Write the gradient of the loss w.r.t. `logits` (M, V), times `grad` (0-d or (M,)), into
    `dlogits` (which may be `logits` itself)."""
    _cross_entropy_bwd_kernel[(logits.shape[0],)](
        logits, dlogits, labels, lse, grad,
        logits.stride(0), dlogits.stride(0), grad.stride(0) if grad.dim() else 0,
        logits.shape[1], ignore_index, label_smoothing, z_loss,
        **launch_params(logits.shape[1]),
    )  # fmt: skip


def ce_forward_backward_rows(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    programs: int,
) -> None:
    """Per-row loss of `logits` (M, V) into `loss` (M,) fp32, and the gradient of their sum
    written over `logits`, in one launch of `programs` programs (see the kernel)."""
    _cross_entropy_fwd_bwd_kernel[(max(1, min(programs, logits.shape[0])),)](
        logits, labels, loss,
        logits.stride(0), logits.shape[0], logits.shape[1],
        ignore_index, label_smoothing, z_loss,
        HAS_SMOOTHING=label_smoothing > 0.0, **fwd_bwd_launch_params(logits.shape[1]),
    )  # fmt: skip


def _cross_entropy_fwd_launch(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float
) -> tuple[torch.Tensor, torch.Tensor]:
    check_logits_labels(logits, labels, "cross_entropy")
    if logits.stride(-1) != 1:
        raise ValueError("cross_entropy: logits need a unit stride on the vocabulary dimension; pass logits.contiguous()")
    N = logits.shape[0]
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    target = torch.empty(N, dtype=torch.float32, device=logits.device)
    ce_forward_rows(logits, labels, loss, lse, target, ignore_index, label_smoothing, z_loss)
    return loss.sum(), lse


def _cross_entropy_bwd_launch_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
) -> None:
    ce_backward_rows(logits, logits, labels, lse, grad.float(), ignore_index, label_smoothing, z_loss)


# -- registration ---------------------------------------------------------------------------------

# `custom_op` (opaque to torch.compile), not `triton_op`: Inductor has nothing to fuse inside a
# row kernel over the whole vocabulary, and tracing into these launchers failed on an H100 with
# torch 2.11 at real sizes. The three loss ops (this one, fused_linear_cross_entropy and
# token_logprobs) are all opaque calls inside a fullgraph compile, run exactly as in eager.
_cross_entropy_fwd = torch.library.custom_op("kernels::cross_entropy_fwd", _cross_entropy_fwd_launch, mutates_args=())


@_cross_entropy_fwd.register_fake
def _(logits, labels, ignore_index, label_smoothing, z_loss):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape[0], dtype=torch.float32)


# Overwrites `logits` with its gradient: the op declares the mutation, so autograd bumps the
# tensor's version and any other saved use of these logits fails loudly instead of reading garbage.
# (Under torch.compile the mutation is functionalized: Inductor may then copy the logits once.)
_cross_entropy_bwd_ = torch.library.custom_op(
    "kernels::cross_entropy_bwd_", _cross_entropy_bwd_launch_, mutates_args=("logits",)
)


def _cross_entropy_setup(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing, z_loss = inputs
    _loss, lse = output
    ctx.args = (ignore_index, label_smoothing, z_loss)
    ctx.consumed = False
    ctx.save_for_backward(logits, labels, lse)


def _cross_entropy_grad(ctx, grad_loss, _grad_lse):
    if ctx.consumed:
        raise RuntimeError(
            "cross_entropy (triton): backward already overwrote the logits with their gradient; "
            "a second backward through the same graph needs kernels.cross_entropy=torch"
        )
    ctx.consumed = True
    logits, labels, lse = ctx.saved_tensors
    _cross_entropy_bwd_(logits, labels, lse, grad_loss, *ctx.args)
    # A new tensor object over the same memory: when the logits are a leaf, AccumulateGrad may
    # then adopt it as .grad instead of cloning (the leaf itself is referenced elsewhere, so
    # returning `logits` made autograd copy all N x V of them).
    return logits.detach(), None, None, None, None  # grads for (logits, labels, ignore_index, label_smoothing, z_loss)


_cross_entropy_fwd.register_autograd(_cross_entropy_grad, setup_context=_cross_entropy_setup)


# -- functional -----------------------------------------------------------------------------------


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Summed cross-entropy (fp32 scalar) of (N, V) logits; as `cross_entropy_ref`.

    The backward overwrites `logits` with its gradient (see the module docstring)."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    # The kernels take a row stride and unit columns; rows that share memory (an expanded row,
    # stride 0) would have their in-place gradients written over each other: both get a copy.
    overlapping_rows = logits.dim() == 2 and logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]
    if logits.stride(-1) != 1 or overlapping_rows:
        logits = logits.contiguous()
    # The kernels read labels[row] at a unit stride (a strided view, e.g. labels[::2], is copied).
    labels = labels.contiguous()
    loss, _lse = _cross_entropy_fwd(logits, labels, int(ignore_index), float(label_smoothing), float(z_loss))
    return loss
