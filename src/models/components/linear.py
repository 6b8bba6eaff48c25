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

`Linear` is `nn.Linear` (same parameters, initialisation and state_dict) that calls the chosen
implementation, so checkpoints and `isinstance(m, nn.Linear)` are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import grads_from_ones_column, mm_out, with_ones_column

from .dispatch import get_kernel


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear`: under autocast, autograd's bf16 weight gradient cast to the weight's dtype."""
    return F.linear(x, weight, bias)


class _LinearFp32WeightGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_ext, weight, bias, dtype):
        """x (..., in), or (M, in) rows of x_ext (M, in + pad) in `dtype` when x_ext is given."""
        with torch.autocast(x.device.type, enabled=False):
            x_c = x.to(dtype)
            w_c = weight.to(dtype)
            y = F.linear(x_c, w_c, bias.to(dtype) if bias is not None else None)
        ctx.save_for_backward(x_c, w_c, x_ext)
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x_c, w_c, x_ext = ctx.saved_tensors
        dx = dw = db = None
        with torch.autocast(dy.device.type, enabled=False):
            dy2 = dy.to(w_c.dtype).reshape(-1, dy.shape[-1])  # (M, out); M = all leading dims
            if ctx.needs_input_grad[0]:
                # bf16, as autocast computes it. (The input gradient of an fp32 input in fp32 from
                # the matmul too was measured on an H100: less GPU time, yet slower steps on both
                # models, 0.7-1.7%.)
                dx = (dy2 @ w_c).view(x_c.shape).to(ctx.x_dtype)  # (M, in) -> x's shape
            bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
            if x_ext is not None and bias_grad:
                dw, db = grads_from_ones_column(dy2, x_ext, torch.float32)  # (out, in), (out,) fp32
                dw = dw if ctx.needs_input_grad[2] else None
            else:
                if ctx.needs_input_grad[2]:
                    x2 = x_c.reshape(-1, x_c.shape[-1])  # (M, in)
                    dw = mm_out(dy2.t(), x2, torch.float32)  # (out, in) fp32 from the bf16 operands
                if bias_grad:
                    db = dy2.sum(0, dtype=torch.float32)  # (out,)
        return dx, None, dw, db, None  # grads for (x, x_ext: none, x is its first columns; weight, bias, dtype)


def linear_fp32_wgrad(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ones_column: bool = False
) -> torch.Tensor:
    """`F.linear` whose weight (and bias) gradient leaves the matmul in fp32 when fp32 weights
    run under autocast; plain `F.linear` otherwise. `ones_column`: the bias gradient from that
    matmul too (a column of ones beside x; see the module's docstring)."""
    device = x.device.type
    if weight.dtype != torch.float32 or not torch.is_autocast_enabled(device):
        return F.linear(x, weight, bias)
    dtype = torch.get_autocast_dtype(device)
    if dtype == torch.float32:
        return F.linear(x, weight, bias)
    if not (ones_column and bias is not None and bias.requires_grad and torch.is_grad_enabled()):
        return _LinearFp32WeightGrad.apply(x, None, weight, bias, dtype)
    n_in = x.shape[-1]
    x2 = x.to(dtype).reshape(-1, n_in)  # (M, in)
    x_ext = with_ones_column(x2)  # (M, in + pad): [x | 1 | 0...]
    y = _LinearFp32WeightGrad.apply(x_ext[:, :n_in], x_ext, weight, bias, dtype)  # (M, out)
    return y.view(*x.shape[:-1], y.shape[-1])


class Linear(nn.Linear):
    """`nn.Linear` through the `kernels.linear` choice (`torch` or `fp32_wgrad`)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, impl: str = "torch", ones_column: bool = False
    ):
        super().__init__(in_features, out_features, bias=bias)
        self.impl = impl
        self._linear = get_kernel("linear", impl)
        # Only `fp32_wgrad` takes the bias gradient from its matmul; worth it where the input's
        # producer (a norm) can write x_ext itself, not where it would be a copy.
        self.ones_column = ones_column and impl == "fp32_wgrad" and bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ones_column:
            return self._linear(x, self.weight, self.bias, ones_column=True)
        return self._linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, impl={self.impl}" + (", ones_column=True" if self.ones_column else "")
