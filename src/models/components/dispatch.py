"""Kernel toggles: which implementation runs each op.

The `kernels:` block of a config picks, per op, the pure-PyTorch reference (`torch`), our Triton
kernel (`triton`, from `kernels/`) or Liger-Kernel (`liger`, an optional peer). Components ask
`get_kernel(op, choice)` for a callable once, at construction, so the forward pass does no lookups.

Every implementation of one op has the reference's signature:

    rmsnorm        (x, weight, eps) -> y
    layernorm      (x, weight, bias, eps) -> y
    rope           (q, k, cos, sin) -> (q, k)        q: (B, T, Hq, D), k: (B, T, Hkv, D), cos/sin: (B|1, T, D)
    swiglu         (gate, up) -> silu(gate) * up
    swiglu_packed  (gate_up (..., 2H), gate first) -> silu(gate) * up   (the SwiGLU module's layout, used
                   with `kernels.swiglu: triton`: its backward writes the gradient of gate_up whole)
    swiglu_linear  (gate_up (..., 2H), weight (D, H)) -> swiglu_packed(gate_up) @ weight.T   (used with
                   `kernels.swiglu: fused_linear`: the SwiGLU backward runs in the down projection's GEMM)
    swiglu_linear_recompute  the same, without the product kept for backward (`kernels.swiglu:
                   fused_linear_recompute`: the SwiGLU backward's row pass writes it again)
    gelu_mlp       (x (..., D), fc_weight (H, D), fc_bias (H,) | None, proj_weight (D, H), proj_bias (D,) | None)
                   -> gelu_tanh(x @ fc_weight.T + fc_bias) @ proj_weight.T + proj_bias   (GPT-2's MLP; `kernels.gelu:
                   cublaslt` runs the GELU and its backward in cuBLASLt's GEMM epilogues)
    cross_entropy  (logits (N, V), labels (N,), ignore_index, label_smoothing) -> summed loss (fp32 scalar)
    fused_linear_cross_entropy (hidden (N, H), weight (V, H), labels (N,), ignore_index, label_smoothing)
                   -> summed loss (fp32 scalar), never materialising (N, V) logits
    token_logprobs (hidden (N, H), weight (V, H), labels (N,), ignore_index) -> (N,) fp32 log p(label),
                   0 at ignored labels (DPO), never materialising (N, V) logits
    linear         (x, weight, bias) -> y       the projections inside blocks; `fp32_wgrad` takes the
                   weight gradient from the matmul in fp32 under autocast (components/linear.py);
                   `tuned` is `fp32_wgrad` with every GEMM of the blocks (the fused MLP ops' too) on the
                   faster of cuBLAS's pick and cuBLASLt's best for its shape (kernels/tuned_mm.py)

A choice that cannot run (Triton without a GPU or the interpreter, Liger not installed, a kernel
module missing) is an error naming the op, the choice and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from src.utils.config import ConfigError

# op -> choice -> "module:function". `torch` entries are the references in components/.
_REGISTRY: dict[str, dict[str, str]] = {
    "rmsnorm": {
        "torch": "src.models.components.norms:rms_norm_ref",
        "triton": "kernels.rmsnorm:rms_norm",
        "liger": "liger_kernel.ops.rms_norm:LigerRMSNormFunction",
    },
    "layernorm": {
        "torch": "src.models.components.norms:layer_norm_ref",
        "triton": "kernels.layernorm:layer_norm",
    },
    "rope": {
        "torch": "src.models.components.embeddings.rotary:apply_rotary_ref",
        "triton": "kernels.rope:apply_rotary",
        "liger": "liger_kernel.ops.rope:LigerRopeFunction",
    },
    "swiglu": {
        "torch": "src.models.components.mlp:swiglu_ref",
        "triton": "kernels.swiglu:swiglu",
        "liger": "liger_kernel.ops.swiglu:LigerSiLUMulFunction",
    },
    "swiglu_packed": {
        "torch": "src.models.components.mlp:swiglu_packed_ref",
        "triton": "kernels.swiglu:swiglu_packed",
    },
    "swiglu_linear": {
        "torch": "src.models.components.mlp:swiglu_linear_ref",
        "triton": "kernels.swiglu_linear:swiglu_linear",
    },
    "swiglu_linear_recompute": {
        "torch": "src.models.components.mlp:swiglu_linear_ref",
        "triton": "kernels.swiglu_linear:swiglu_linear_recompute",
    },
    "gelu_mlp": {
        "torch": "src.models.components.mlp:gelu_mlp_ref",
        "cublaslt": "kernels.gelu_mlp:gelu_mlp",
    },
    "cross_entropy": {
        "torch": "src.models.components.loss:cross_entropy_ref",
        "triton": "kernels.cross_entropy:cross_entropy",
        "liger": "liger_kernel.ops.cross_entropy:LigerCrossEntropyFunction",
    },
    "fused_linear_cross_entropy": {
        "torch": "src.models.components.loss:fused_linear_cross_entropy_ref",
        "triton": "kernels.fused_linear_cross_entropy:fused_linear_cross_entropy",
        "liger": "liger_kernel.ops.fused_linear_cross_entropy:LigerFusedLinearCrossEntropyFunction",
    },
    "token_logprobs": {
        "torch": "src.models.components.loss:token_logprobs_ref",
        "triton": "kernels.token_logprobs:token_logprobs",
    },
    "linear": {
        "torch": "src.models.components.linear:linear_ref",
        "fp32_wgrad": "src.models.components.linear:linear_fp32_wgrad",
        "tuned": "src.models.components.linear:linear_tuned",
    },
}

# Adapters turn Liger's autograd Functions into our signatures (checked against liger-kernel 0.8.5:
# cross_entropy, fused_linear_cross_entropy and rope in tests/kernels/test_dispatch.py on the CPU
# interpreter, rmsnorm and swiglu on the GPU). Liger writes the logits gradient into the logits
# during the forward, and rotates contiguous q / k in place.
_LIGER_ADAPTERS: dict[str, Callable[[object], Callable]] = {
    "rmsnorm": lambda fn: (lambda x, weight, eps: fn.apply(x, weight, eps, 0.0, "llama", False)),
    "rope": lambda fn: (
        lambda q, k, cos, sin: tuple(
            t.transpose(1, 2) for t in fn.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        )
    ),
    "swiglu": lambda fn: (lambda gate, up: fn.apply(gate, up)),
    "cross_entropy": lambda fn: (
        lambda logits, labels, ignore_index=-100, label_smoothing=0.0: fn.apply(
            logits, labels, None, ignore_index, 0.0, label_smoothing, "sum"
        )[0]
    ),
    "fused_linear_cross_entropy": lambda fn: (
        lambda hidden, weight, labels, ignore_index=-100, label_smoothing=0.0: fn.apply(
            hidden, weight, labels, None, None, ignore_index, 0.0, label_smoothing, "sum"
        )[0]
    ),
}


@dataclass
class KernelConfig:
    """The `kernels:` block. `torch` everywhere + `attention: sdpa` is the pure-PyTorch reference."""

    rmsnorm: Literal["triton", "liger", "torch"] = "torch"
    layernorm: Literal["triton", "torch"] = "torch"
    rope: Literal["triton", "liger", "torch"] = "torch"
    swiglu: Literal["fused_linear", "fused_linear_recompute", "triton", "liger", "torch"] = "torch"
    gelu: Literal["cublaslt", "torch"] = "torch"
    cross_entropy: Literal["fused_linear", "triton", "liger", "torch"] = "torch"
    linear: Literal["tuned", "fp32_wgrad", "torch"] = "torch"
    attention: Literal["auto", "flash_attn", "sdpa", "flex", "eager"] = "auto"
    # Tokens per chunk of `cross_entropy: fused_linear` (each chunk's (C, V) logits live at once);
    # 0 picks as many as fit 320 MiB of logits (1024 for Qwen2's 152K bf16 vocabulary). Bigger
    # chunks trade memory for speed: 2048 costs Qwen2-0.5B 0.29 GiB and gains ~0.5% per step.
    loss_chunk_tokens: int = 0

    def __post_init__(self):
        if self.loss_chunk_tokens < 0:
            raise ValueError(
                f"kernels.loss_chunk_tokens must be >= 0 (0 = sized to 320 MiB of logits), got {self.loss_chunk_tokens}"
            )

    @classmethod
    def reference(cls) -> "KernelConfig":
        return cls(
            rmsnorm="torch", layernorm="torch", rope="torch", swiglu="torch", gelu="torch", cross_entropy="torch",
            linear="torch", attention="sdpa",
        )  # fmt: skip

    def replace(self, **changes) -> "KernelConfig":
        return dataclasses.replace(self, **changes)


def triton_available() -> bool:
    """Triton kernels run on a CUDA GPU, or on the CPU through the interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return torch.cuda.is_available()


# The `kernels:` key that selects each registry op, where the two differ (errors name the key a user
# can set), and the values of a key that select another op than its own (shown among the choices).
_CONFIG_KEY = {
    "swiglu_packed": "swiglu",
    "swiglu_linear": "swiglu",
    "swiglu_linear_recompute": "swiglu",
    "gelu_mlp": "gelu",
    "fused_linear_cross_entropy": "cross_entropy",
    "token_logprobs": "cross_entropy",
}
_OTHER_VALUES = {"swiglu": ["fused_linear", "fused_linear_recompute"], "cross_entropy": ["fused_linear"]}


def get_kernel(op: str, choice: str, setting: str | None = None) -> Callable:
    """The callable implementing `op` with `choice`; a clear error if it cannot run here, naming the
    config key and value that chose it (`setting`: that value where it is not `choice`, e.g.
    `fused_linear` for the fused loss's `triton` op)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op '{op}'; known ops: {sorted(_REGISTRY)}")
    choices = _REGISTRY[op]
    key = _CONFIG_KEY.get(op, op)
    setting = setting or choice
    if choice not in choices:
        valid = sorted(set(choices) | set(_OTHER_VALUES.get(key, [])))
        raise ConfigError(f"kernels.{key}: '{setting}' is not available for this op; choose one of {valid}")
    if choice == "triton" and not triton_available():
        raise ConfigError(
            f"kernels.{key}: '{setting}' runs Triton kernels, which need a CUDA GPU (or TRITON_INTERPRET=1 for the "
            f"slow CPU interpreter); set kernels.{key}=torch to run on this machine"
        )
    module_name, attr = choices[choice].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        fix = "pip install liger-kernel" if choice == "liger" else f"set kernels.{key}=torch"
        raise ConfigError(f"kernels.{key}: '{setting}' cannot be imported ({e}); {fix}") from e
    fn = getattr(module, attr)
    if choice == "liger":
        fn = _LIGER_ADAPTERS[op](fn)
    return fn


# The registry ops (and their choice) that each `kernels:` value runs, where they are not the key's
# own op with the value as its choice.
_OPS_OF_VALUE = {
    ("swiglu", "triton"): [("swiglu", "triton"), ("swiglu_packed", "triton")],
    ("swiglu", "fused_linear"): [("swiglu_linear", "triton")],
    ("swiglu", "fused_linear_recompute"): [("swiglu_linear_recompute", "triton")],
    ("gelu", "cublaslt"): [("gelu_mlp", "cublaslt")],
    ("cross_entropy", "fused_linear"): [("fused_linear_cross_entropy", "triton")],
}


# The `kernels:` keys each model family builds (a GPT-2 has no RoPE or RMSNorm, a Qwen2 no
# LayerNorm or GELU MLP): a choice for an op the model never runs is not checked.
FAMILY_KERNEL_KEYS = {
    "gpt2": ("layernorm", "gelu", "cross_entropy", "linear"),
    "qwen2": ("rmsnorm", "rope", "swiglu", "cross_entropy", "linear"),
}


def check_kernels(cfg: KernelConfig, family: str | None = None) -> None:
    """Before anything is built: every implementation the `kernels:` block chooses for the ops of
    `family` (all ops when None) can run on this machine (a `ConfigError` naming the key and the
    fix, instead of an error in the first forward). Attention is checked for what does not depend
    on the call: an explicit `flash_attn` needs flash-attn installed."""
    keys = FAMILY_KERNEL_KEYS.get(family) if family is not None else None
    for field in dataclasses.fields(cfg):
        key, value = field.name, getattr(cfg, field.name)
        if key in ("attention", "loss_chunk_tokens") or value == "torch" or (keys is not None and key not in keys):
            continue
        for op, choice in _OPS_OF_VALUE.get((key, value), [(key, value)]):
            get_kernel(op, choice, setting=value)
    if cfg.attention == "flash_attn":
        from .attention.flash import fa2_installed, fa3_installed

        if not (fa2_installed() or fa3_installed()):
            raise ConfigError(
                "kernels.attention: 'flash_attn' needs flash-attn, and neither flash_attn (FlashAttention-2) nor "
                "flash_attn_interface (FlashAttention-3) is installed; pip install flash-attn, or set "
                "kernels.attention to auto (or sdpa)"
            )
