"""Feed-forward blocks: the GELU MLP of GPT-2 and the gated SwiGLU of Qwen2 / Llama.

`swiglu_ref` (and `swiglu_packed_ref`, the same on one [gate | up] tensor) is the pure-PyTorch
reference of `kernels/swiglu.py`; `swiglu_linear_ref` (the product, then the down projection) that
of `kernels/swiglu_linear.py`, and `gelu_mlp_ref` (GPT-2's whole MLP) that of `kernels/gelu_mlp.py`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import get_kernel
from .linear import Linear, compute_weight, matmul_weight


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU ("gelu_new"): the tanh approximation."""
    return F.gelu(x, approximate="tanh")


# Activation names follow Hugging Face's `activation_function` / `hidden_act` values.
ACTIVATIONS = {
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_fast": gelu_tanh,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{name}'; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise."""
    return F.silu(gate) * up


def swiglu_packed_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """`swiglu_ref` of the two halves of gate_up (..., 2H), the gate first."""
    return swiglu_ref(*gate_up.chunk(2, dim=-1))


def gelu_mlp_ref(
    x: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    fc_weight_copy: torch.Tensor | None = None,
    proj_weight_copy: torch.Tensor | None = None,
) -> torch.Tensor:
    """`gelu_tanh(x @ fc_weight.T + fc_bias) @ proj_weight.T + proj_bias`: GPT-2's MLP. The
    `_copy` tensors: bf16 copies of the weights, read instead of autocast's casts
    (components/linear.py)."""
    fc_weight, proj_weight = compute_weight(fc_weight, fc_weight_copy), compute_weight(proj_weight, proj_weight_copy)
    return F.linear(gelu_tanh(F.linear(x, fc_weight, fc_bias)), proj_weight, proj_bias)


# The activations `kernels.gelu: cublaslt` computes: cuBLASLt's GELU is the tanh approximation.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def swiglu_linear_ref(
    gate_up: torch.Tensor, weight: torch.Tensor, weight_copy: torch.Tensor | None = None
) -> torch.Tensor:
    """`swiglu_packed_ref(gate_up) @ weight.T`: the SwiGLU product and the down projection (no bias;
    `weight_copy`: a bf16 copy of the weight, read instead of autocast's cast)."""
    return F.linear(swiglu_packed_ref(gate_up), compute_weight(weight, weight_copy))


class GeluMLP(nn.Module):
    """x -> fc (dim -> hidden) -> activation -> proj (hidden -> dim) -> dropout.

    `impl` is the `kernels.gelu` choice. `cublaslt` hands the two projections and the GELU to one
    op (`gelu_mlp`): the fc GEMM writes the GELU and its input from its epilogue, and in backward
    the projection's input-gradient GEMM applies the GELU derivative and sums the fc bias gradient
    in its epilogue. The projections' weight gradients leave their matmuls in the weights' dtype,
    as with `linear: fp32_wgrad`; the parameters (and checkpoints) are the same.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        activation: str = "gelu_new",
        bias: bool = True,
        dropout: float = 0.0,
        linear_impl: str = "torch",
        impl: str = "torch",
    ):
        super().__init__()
        self.fc = Linear(dim, hidden_dim, bias=bias, impl=linear_impl)
        self.proj = Linear(hidden_dim, dim, bias=bias, impl=linear_impl)
        self.act = get_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.impl = impl
        self._mlp = None
        if impl == "cublaslt":
            if activation not in TANH_GELUS:
                raise ValueError(
                    f"kernels.gelu=cublaslt computes the tanh-approximated GELU ({', '.join(TANH_GELUS)}); "
                    f"this model's activation is '{activation}': set kernels.gelu=torch"
                )
            self._mlp = get_kernel("gelu_mlp", "cublaslt")
        elif impl != "torch":
            raise ValueError(f"kernels.gelu: '{impl}' is not available; choose cublaslt or torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mlp is not None:
            fc, proj = self.fc, self.proj
            fc_weight, fc_copy = matmul_weight(fc.weight, fc.weight_copy)
            proj_weight, proj_copy = matmul_weight(proj.weight, proj.weight_copy)
            y = self._mlp(x, fc_weight, fc.bias, proj_weight, proj.bias, fc_weight_copy=fc_copy,
                          proj_weight_copy=proj_copy, tuned=fc.impl == "tuned")
            return self.dropout(y)
        return self.dropout(self.proj(self.act(self.fc(x))))


class SwiGLU(nn.Module):
    """x -> [gate | up] = gate_up(x) -> act(gate) * up -> down.

    gate and up share one (dim -> 2 * hidden) matmul; the first half of its output is the gate.
    With `activation: silu` the product runs through the `swiglu` kernel toggle; `triton` takes the
    projection's output whole (`swiglu_packed`), so that backward writes the gradient of gate_up in
    one piece instead of autograd concatenating the gradients of two halves. `fused_linear` runs the
    product and the down projection as one op (`swiglu_linear`), whose backward computes the SwiGLU
    gradient in the epilogue of the down projection's input-gradient GEMM; the down projection's
    weight gradient then leaves its matmul in the weight's dtype, as with `linear: fp32_wgrad`.
    `fused_linear_recompute` is that op without the product kept for the weight gradient (M x H
    less per layer): its backward writes the product again from the SwiGLU backward's row pass.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        activation: str = "silu",
        bias: bool = False,
        dropout: float = 0.0,
        impl: str = "torch",
        linear_impl: str = "torch",
    ):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gate_up = Linear(dim, 2 * hidden_dim, bias=bias, impl=linear_impl)
        self.down = Linear(hidden_dim, dim, bias=bias, impl=linear_impl)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._glu_linear = None
        if activation in ("silu", "swish") and impl in ("fused_linear", "fused_linear_recompute"):
            self.impl = impl
            op = "swiglu_linear" if impl == "fused_linear" else "swiglu_linear_recompute"
            self._glu_linear = get_kernel(op, "triton", setting=impl)
            self._glu = self._glu_packed = None
        elif activation in ("silu", "swish"):
            self.impl = impl
            self._glu = get_kernel("swiglu", impl)
            self._glu_packed = get_kernel("swiglu_packed", impl) if impl == "triton" else None
        else:
            if impl != "torch":
                raise ValueError(f"kernels.swiglu={impl} fuses silu only; the activation here is '{activation}'")
            act = get_activation(activation)
            self.impl = "torch"
            self._glu = lambda gate, up: act(gate) * up
            self._glu_packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)  # (..., 2 * hidden_dim): [gate | up]
        if self._glu_linear is not None:
            down_weight, down_copy = matmul_weight(self.down.weight, self.down.weight_copy)
            tuned = self.down.impl == "tuned"
            y = self._glu_linear(gate_up, down_weight, weight_copy=down_copy, tuned=tuned)  # (..., dim), gate_up's dtype
            if self.down.bias is not None:
                y = y + self.down.bias.to(y.dtype)
            return self.dropout(y)
        if self._glu_packed is not None:
            return self.dropout(self.down(self._glu_packed(gate_up)))
        gate, up = gate_up.chunk(2, dim=-1)  # each (..., hidden_dim), strided views
        return self.dropout(self.down(self._glu(gate, up)))


def ffn_hidden_dim(dim: int, multiplier: float, multiple_of: int = 1) -> int:
    """Width of the feed-forward layer from a multiplier of the model width, rounded up."""
    hidden = int(math.ceil(dim * multiplier))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
