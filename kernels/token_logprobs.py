"""Per-token log-probabilities log p(label | hidden) = x_y - lse(x), x = hidden @ weight.T, chunked.

DPO needs, for every response token, the log-probability of the label under the policy and under
the frozen reference model; materialising (N, V) fp32 log-softmax for that costs gigabytes. Here,
for each chunk of C tokens:
    forward   logits_c = hidden_c @ weight.T;  logprob = x_y - lse  (row kernel of cross_entropy.py)
    backward  logits_c recomputed;  G_c = g * (onehot(y) - softmax(logits_c)) written over logits_c;
              dhidden_c = G_c @ weight,  dweight += G_c.T @ hidden_c
Unlike the summed loss of `fused_linear_cross_entropy.py`, the upstream gradient g differs per
token, so dweight cannot be formed in the forward pass: the backward recomputes the chunk's logits
(four matmuls in all). The frozen reference model pays for one matmul and one row pass only.
Rows whose label is ignore_index get log-probability 0 and no gradient.
The GEMMs write into one chunk buffer and the gradients' own contiguous buffers through
`tuned_mm.mm_into` (the faster of torch's call and cuBLASLt's best candidate per shape, the
accumulation into dweight with cuBLAS's beta = 1), as the fused linear + cross-entropy's do.
Reference: `token_logprobs_ref` in src/models/components/loss.py.

Limits: hidden (N, H) and weight (V, H) of one floating dtype (cast to the autocast dtype under
autocast); labels (N,) in [0, V) or ignore_index. Returns fp32 (N,).
"""

from __future__ import annotations

import torch

from kernels.cross_entropy import ce_backward_rows, ce_forward_rows
from kernels.fused_linear_cross_entropy import check_linear_inputs, chunk_tokens, plan_dweight_accumulation
from kernels.tuned_mm import mm_into

# -- kernels --------------------------------------------------------------------------------------
# The row kernels are those of cross_entropy.py; the matmuls are cuBLAS / cuBLASLt (tuned_mm.py).


# -- launchers ------------------------------------------------------------------------------------


def _token_logprobs_fwd_launch(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    check_linear_inputs(hidden, weight, labels, "token_logprobs")
    N, V = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or chunk_tokens(N, V, hidden.element_size())
    buffer = torch.empty((min(chunk, N), V), dtype=hidden.dtype, device=hidden.device)  # one chunk's logits
    neg_logprobs = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse, target = torch.empty_like(neg_logprobs), torch.empty_like(neg_logprobs)
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        logits = buffer[: end - start]  # (c, V)
        mm_into(hidden[start:end], weight.t(), logits)
        # With no smoothing and no z-loss the row loss is lse - x_y = -log p(y).
        ce_forward_rows(logits, labels[start:end], neg_logprobs[start:end], lse[start:end], target[start:end],
                        ignore_index, 0.0, 0.0)  # fmt: skip
    return neg_logprobs.neg_(), lse


def _token_logprobs_bwd_launch(
    grad: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    chunk_size: int,
    grad_hidden: bool,
    grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    N, V = hidden.shape[0], weight.shape[0]
    chunk = chunk_size or chunk_tokens(N, V, hidden.element_size())
    # d logprob / d x = onehot - softmax = -(d loss / d x): run the loss gradient with -g.
    neg_grad = grad.float().neg()
    # The gradients in contiguous buffers of their own, whatever the inputs' strides (as the fake says).
    dhidden = hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty(0)
    dweight = weight.new_empty(0)
    if grad_weight:  # written by the first chunk; zero when there are no tokens (no chunks)
        dweight = weight.new_empty(weight.shape) if N else weight.new_zeros(weight.shape)
    buffer = torch.empty((min(chunk, N), V), dtype=hidden.dtype, device=hidden.device)  # logits, then G
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        hidden_c = hidden[start:end]
        grads = buffer[: end - start]  # (c, V)
        mm_into(hidden_c, weight.t(), grads)
        ce_backward_rows(grads, grads, labels[start:end], lse[start:end], neg_grad[start:end], ignore_index, 0.0, 0.0)
        if grad_hidden:
            mm_into(grads, weight, dhidden[start:end])  # (c, H)
        if grad_weight:
            if start == 0:
                plan_dweight_accumulation(grads, hidden_c, dweight, N, chunk)
            mm_into(grads.t(), hidden_c, dweight, accumulate=start > 0)  # dweight (V, H) (+)= G_c.T @ hidden_c
    return dhidden, dweight


# -- registration ---------------------------------------------------------------------------------

# `custom_op` (opaque to torch.compile), as the other two loss ops: see cross_entropy.py.
_token_logprobs_fwd = torch.library.custom_op("kernels::token_logprobs_fwd", _token_logprobs_fwd_launch, mutates_args=())
_token_logprobs_bwd = torch.library.custom_op("kernels::token_logprobs_bwd", _token_logprobs_bwd_launch, mutates_args=())


@_token_logprobs_fwd.register_fake
def _(hidden, weight, labels, ignore_index, chunk_size):
    n = hidden.shape[0]
    return hidden.new_empty(n, dtype=torch.float32), hidden.new_empty(n, dtype=torch.float32)


@_token_logprobs_bwd.register_fake
def _(grad, hidden, weight, labels, lse, ignore_index, chunk_size, grad_hidden, grad_weight):
    dhidden = hidden.new_empty(hidden.shape) if grad_hidden else hidden.new_empty(0)  # contiguous, as the op's
    dweight = weight.new_empty(weight.shape) if grad_weight else weight.new_empty(0)
    return dhidden, dweight


def _token_logprobs_setup(ctx, inputs, output):
    hidden, weight, labels, ignore_index, chunk_size = inputs
    _logprobs, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (ignore_index, chunk_size)
    ctx.save_for_backward(hidden, weight, labels, lse)


def _token_logprobs_grad(ctx, grad, _grad_lse):
    hidden, weight, labels, lse = ctx.saved_tensors
    ignore_index, chunk_size = ctx.args
    grad_hidden, grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dhidden, dweight = _token_logprobs_bwd(
        grad, hidden, weight, labels, lse, ignore_index, chunk_size, grad_hidden, grad_weight
    )
    # grads for (hidden, weight, labels, ignore_index, chunk_size)
    return dhidden if grad_hidden else None, dweight if grad_weight else None, None, None, None


_token_logprobs_fwd.register_autograd(_token_logprobs_grad, setup_context=_token_logprobs_setup)


# -- functional -----------------------------------------------------------------------------------


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T)[label] per token, fp32 (N,), 0 where labels == ignore_index;
    as `token_logprobs_ref`, never building the (N, V) logits."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"token_logprobs: chunk_size must be positive, got {chunk_size}")
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    # The kernels read labels[row] at a unit stride (a strided view, e.g. labels[::2], is copied).
    logprobs, _lse = _token_logprobs_fwd(hidden.contiguous(), weight, labels.contiguous(), int(ignore_index),
                                         int(chunk_size or 0))  # fmt: skip
    return logprobs
