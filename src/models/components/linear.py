"""Linear layers, with an option for the weight gradient to come out of the matmul in fp32.

With fp32 master weights under bf16 autocast, autograd computes a linear layer's weight gradient
`dW = dY.T @ X` as a bf16 matmul and then casts it to fp32 in an elementwise kernel of its own:
the matmul writes 2 bytes per weight, the cast reads them and writes 4. `kernels.linear:
fp32_wgrad` asks the matmul for the fp32 gradient directly (`torch.mm(..., out_dtype=float32)`,
cuBLAS with bf16 inputs, fp32 accumulation and an fp32 output): one 4-byte write per weight, one
launch fewer per layer, and a gradient that is no longer rounded to bf16 on its way to the
optimizer. On Qwen2-0.5B that is 1.4 GB less traffic per step (see benchmarks/README.md).

The forward is autocast's: the input, weight and bias are cast to the autocast dtype and the
matmul runs there; the input gradient is the bf16 matmul autocast computes, cast back to the
input's dtype. Without autocast, or with weights that are not fp32 (bf16 parameters, FSDP2's
bf16 mixed precision), `linear_fp32_wgrad` is `F.linear`.

`ones_column` (the attention's qkv projection sets it): under `fp32_wgrad` the bias gradient comes
out of the same weight-gradient GEMM. The input is kept as x_ext = [x | 1 | 0 ... 0] (M, in + 8),
which the norm before the projection writes directly under torch.compile; the forward GEMM reads
its first `in` columns, and dy.T @ x_ext = [dW | db | 0 ...]: no separate pass over dy for
`db = dy.sum(0)` (see kernels/gelu_mlp.py, which does the same for GPT-2's fc layer).

`kernels.linear: tuned` is `fp32_wgrad` with each of the three GEMMs (and those inside the fused
MLP ops, `swiglu_linear` and `gelu_mlp`) run by `kernels.tuned_mm`: per shape, the faster of
cuBLAS's own pick and the best of cuBLASLt's candidates, timed on the first call. It also takes
over from autograd where the weights are already in the compute dtype (bf16 parameters,
`optimizer.bf16_grads`), with the same math. The picks are timed per process; checkpoints keep
them, so a resumed run runs the kernels of the run it continues (kernels/tuned_mm.py).

`Linear` is `nn.Linear` (same parameters, initialisation and state_dict) that calls the chosen
implementation, so checkpoints and `isinstance(m, nn.Linear)` are unaffected.

bf16 weight copies (`optimizer.bf16_weight_copy`). Under bf16 autocast every matmul casts its fp32
weight to bf16, in forward and again in backward (or keeps the cast from forward): each cast reads
4 bytes and writes 2 per weight, about 2 GB per step for Qwen2-0.5B. `attach_weight_copies` gives
every `Linear` a bf16 buffer `weight_copy` (not in the state_dict), which our AdamW rewrites with
each update from the new fp32 weight, rounded as `.to(bfloat16)` rounds (kernels/adamw.py): 2 bytes
written per weight and step instead of the casts. Where autocast runs in the copy's dtype, the
matmuls read the copy; the gradient still reaches the fp32 weight, in the same dtype and from the
same bf16 operands as without the copy, so the math is unchanged. Anything that changes the weights
outside the optimizer (loading a checkpoint) must call `refresh_weight_copies`; the Trainer does.

bf16 gradients (`optimizer.bf16_grads`, with the copies). The copies can also be where the
gradients land: a copy that requires grad is a leaf the matmuls read in place of the weight, as
they would read a bf16 parameter, so the weight gradient leaves its GEMM in bf16 and stays there
(`copy.grad`) until our AdamW reads it, against 4 bytes per weight written by the GEMM and read by
the gradient norm and by the update. The values are those of `linear: torch` (the bf16 GEMM's
output, there cast to fp32 on its way to `.grad`); the fp32 weights get no `.grad`. The LM head
and any weight shared with another module (a tied embedding) keep fp32 gradients: the fused loss
adds its chunks' gradients in the weight's dtype, and a tied embedding's lookup gradient goes to
the fp32 weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import grads_from_ones_column, mm_out, with_ones_column

from .dispatch import get_kernel


# -- bf16 weight copies ---------------------------------------------------------------------------


class _ComputeWeight(torch.autograd.Function):
    """`weight.to(copy.dtype)` read from `copy`: the same value, no cast; the gradient goes to
    `weight`, cast to its dtype, as the backward of `.to` casts it."""

    @staticmethod
    def forward(ctx, weight, copy):
        ctx.weight_dtype = weight.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.weight_dtype), None  # grads for (weight, copy: none, the optimizer writes it)


def usable_copy(weight: torch.Tensor, copy: torch.Tensor | None) -> torch.Tensor | None:
    """`copy` where a matmul under the current autocast would cast `weight` to the copy's dtype (an
    fp32 weight, autocast on in that dtype); None elsewhere (fp32 runs, evaluation without autocast)."""
    if copy is None or weight.dtype != torch.float32:
        return None
    device = weight.device.type
    if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != copy.dtype:
        return None
    return copy


def compute_weight(weight: torch.Tensor, copy: torch.Tensor | None) -> torch.Tensor:
    """What a matmul under autocast should read for `weight`: its bf16 copy where usable (with the
    gradient flowing to `weight`, or to the copy itself when it requires grad: `optimizer.bf16_grads`),
    else `weight` itself (autocast casts it)."""
    usable = usable_copy(weight, copy)
    if usable is None:
        return weight
    return usable if usable.requires_grad else _ComputeWeight.apply(weight, usable)


def matmul_weight(weight: torch.Tensor, copy: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, copy) to hand an op that takes both: the copy in the weight's place, and no copy,
    where the gradient goes to the copy (`optimizer.bf16_grads`), so that the op treats it as a bf16
    parameter and returns its gradient in bf16; (weight, copy) unchanged otherwise."""
    usable = usable_copy(weight, copy)
    if usable is not None and usable.requires_grad:
        return usable, None
    return weight, copy


def attach_weight_copies(model: nn.Module, dtype: torch.dtype = torch.bfloat16, grads: bool = False) -> int:
    """Give every `Linear` in `model` (the LM heads included) a `weight_copy` of its fp32 weight in
    `dtype`, on the weight's device; tied weights share one copy. Returns how many weights got one.

    `grads` (`optimizer.bf16_grads`): the copies of trainable weights held by one `Linear` alone,
    other than the LM head (`model.lm_head`), require grad, so that their gradients land in them in
    `dtype` (the module's docstring)."""
    copies: dict[int, torch.Tensor] = {}
    holders: dict[int, int] = {}  # id(parameter) -> how many modules hold it
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    head = getattr(model, "lm_head", None)
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.dtype == torch.float32:
            weight = module.weight
            if id(weight) not in copies:
                copies[id(weight)] = weight.detach().to(dtype)
                if grads and weight.requires_grad and holders[id(weight)] == 1 and module is not head:
                    copies[id(weight)].requires_grad_(True)
            module.weight_copy = copies[id(weight)]
    return len(copies)


def gradient_copies(model: nn.Module) -> dict[torch.Tensor, torch.Tensor]:
    """{weight: its copy} of the weights whose gradients land in their copies (`optimizer.bf16_grads`)."""
    return {weight: copy for weight, copy in weight_copies(model).items() if copy.requires_grad}


def weight_copies(model: nn.Module) -> dict[torch.Tensor, torch.Tensor]:
    """{weight: its copy} of every `Linear` in `model` that has one (`attach_weight_copies`)."""
    pairs: dict[torch.Tensor, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, Linear) and module.weight_copy is not None:
            pairs[module.weight] = module.weight_copy
    return pairs


@torch.no_grad()
def refresh_weight_copies(copies: dict[torch.Tensor, torch.Tensor]) -> None:
    """Write each weight into its copy (after a checkpoint load, or an optimizer that does not)."""
    if copies:
        torch._foreach_copy_(list(copies.values()), list(copies.keys()))


# -- implementations ------------------------------------------------------------------------------


def linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, weight_copy: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear`: under autocast, autograd's bf16 weight gradient cast to the weight's dtype
    (`weight_copy`: read in place of autocast's cast of the weight)."""
    return F.linear(x, compute_weight(weight, weight_copy), bias)


class _LinearWeightGradInWeightDtype(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_ext, weight, bias, dtype, weight_copy, tuned):
        """x (..., in), or (M, in) rows of x_ext (M, in + pad) in `dtype` when x_ext is given;
        weight_copy: the weight in `dtype` (None: cast here); tuned: the GEMMs' timed pick."""
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(dtype)
            w_c = weight_copy if weight_copy is not None else weight.to(dtype)
            x2 = x_c.reshape(-1, x_c.shape[-1])  # (M, in)
            b_c = bias.to(dtype) if bias is not None else None
            y = mm_out(x2, w_c.t(), dtype, tuned, bias=b_c).view(*x_c.shape[:-1], w_c.shape[0])  # (..., out)
        ctx.save_for_backward(x_c, w_c, x_ext)
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.tuned = tuned
        return y

    @staticmethod
    def backward(ctx, dy):
        x_c, w_c, x_ext = ctx.saved_tensors
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.to(w_c.dtype).reshape(-1, dy.shape[-1])  # (M, out); M = all leading dims
            if ctx.needs_input_grad[0]:
                # In the compute dtype, as autocast computes it. (The input gradient of an fp32 input
                # in fp32 from the matmul too was measured on an H100: less GPU time, yet slower
                # steps on both models, 0.7-1.7%.)
                dx = mm_out(dy2, w_c, w_c.dtype, ctx.tuned).view(x_c.shape).to(ctx.x_dtype)  # (M, in) -> x's shape
            bias_grad = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
            if x_ext is not None and bias_grad:
                dw, db = grads_from_ones_column(dy2, x_ext, ctx.weight_dtype, ctx.tuned)  # (out, in), (out,)
                dw = dw if ctx.needs_input_grad[2] else None
            else:
                if ctx.needs_input_grad[2]:
                    x2 = x_c.reshape(-1, x_c.shape[-1])  # (M, in)
                    dw = mm_out(dy2.t(), x2, ctx.weight_dtype, ctx.tuned)  # (out, in) from the compute-dtype operands
                if bias_grad:
                    db = dy2.sum(0, dtype=torch.float32)  # (out,)
            db = db.to(ctx.bias_dtype) if db is not None else None
        # grads for (x, x_ext: none, x is its first columns; weight, bias, dtype, weight_copy, tuned)
        return dx, None, dw, db, None, None, None


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor, tuned: bool) -> torch.dtype | None:
    """The dtype the GEMMs run in where `_LinearWeightGradInWeightDtype` applies, else None (plain
    `F.linear`): fp32 weights under fp16/bf16 autocast, and with `tuned` also weights already in
    the compute dtype (bf16 parameters, `optimizer.bf16_grads`' copies)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype == torch.float32:
            return None
        if weight.dtype == torch.float32 or (tuned and weight.dtype == dtype):
            return dtype
        return None
    if tuned and weight.dtype in (torch.float16, torch.bfloat16) and x.dtype == weight.dtype:
        return weight.dtype
    return None


def _linear(x, weight, bias, ones_column: bool, weight_copy, tuned: bool) -> torch.Tensor:
    dtype = _compute_dtype(x, weight, tuned)
    if dtype is None:
        return F.linear(x, weight, bias)
    copy = usable_copy(weight, weight_copy)
    if not (ones_column and bias is not None and bias.requires_grad and torch.is_grad_enabled()):
        return _LinearWeightGradInWeightDtype.apply(x, None, weight, bias, dtype, copy, tuned)
    n_in = x.shape[-1]
    x2 = x.to(dtype).reshape(-1, n_in)  # (M, in)
    x_ext = with_ones_column(x2)  # (M, in + pad): [x | 1 | 0...]
    y = _LinearWeightGradInWeightDtype.apply(x_ext[:, :n_in], x_ext, weight, bias, dtype, copy, tuned)  # (M, out)
    return y.view(*x.shape[:-1], y.shape[-1])


def linear_fp32_wgrad(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ones_column: bool = False,
    weight_copy: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear` whose weight (and bias) gradient leaves the matmul in fp32 when fp32 weights
    run under autocast; plain `F.linear` otherwise. `ones_column`: the bias gradient from that
    matmul too (a column of ones beside x; see the module's docstring). `weight_copy`: the weight
    in the autocast dtype, read instead of casting it."""
    return _linear(x, weight, bias, ones_column, weight_copy, tuned=False)


def linear_tuned(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ones_column: bool = False,
    weight_copy: torch.Tensor | None = None,
) -> torch.Tensor:
    """`linear_fp32_wgrad` with each of its three GEMMs on the faster of cuBLAS's pick and
    cuBLASLt's best for its shape (kernels/tuned_mm.py), also for weights already in the compute
    dtype (bf16 parameters, `optimizer.bf16_grads`). Torch's matmuls where that cannot run (the
    CPU, fp32)."""
    return _linear(x, weight, bias, ones_column, weight_copy, tuned=True)


class Linear(nn.Linear):
    """`nn.Linear` through the `kernels.linear` choice (`torch`, `fp32_wgrad` or `tuned`)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, impl: str = "torch", ones_column: bool = False
    ):
        super().__init__(in_features, out_features, bias=bias)
        self.impl = impl
        self._linear = get_kernel("linear", impl)
        # Only `fp32_wgrad` / `tuned` take the bias gradient from their matmul; worth it where the
        # input's producer (a norm) can write x_ext itself, not where it would be a copy.
        self.ones_column = ones_column and impl in ("fp32_wgrad", "tuned") and bias
        # The weight in bf16, rewritten by the optimizer with each update (`attach_weight_copies`);
        # None: matmuls cast the weight as autocast does.
        self.register_buffer("weight_copy", None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, copy = matmul_weight(self.weight, self.weight_copy)
        if self.ones_column:
            return self._linear(x, weight, self.bias, ones_column=True, weight_copy=copy)
        return self._linear(x, weight, self.bias, weight_copy=copy)

    def extra_repr(self) -> str:
        extra = f", impl={self.impl}" + (", ones_column=True" if self.ones_column else "")
        copy = self.weight_copy
        copy_note = "" if copy is None else ", bf16 weight copy" + (" with its gradient" if copy.requires_grad else "")
        return super().extra_repr() + extra + copy_note
