"""Triton kernels, one op per file, each registered with `torch.library` (see README.md).

    rmsnorm.py                     rms_norm, add_rms_norm
    layernorm.py                   layer_norm
    rope.py                        apply_rotary
    swiglu.py                      swiglu, swiglu_packed
    swiglu_linear.py               swiglu_linear (the SwiGLU backward inside the down projection's GEMM)
    gelu_mlp.py                    gelu_mlp (GPT-2's MLP, the GELU in cuBLASLt's GEMM epilogues)
    cublaslt.py                    gemm (cuBLASLt matmuls with GELU epilogues, through ctypes; used by gelu_mlp)
    tuned_mm.py                    mm_out, tuned_mm (each GEMM shape on the faster of cuBLAS's pick and cuBLASLt's)
    cross_entropy.py               cross_entropy (+ the row kernels the two ops below reuse)
    fused_linear_cross_entropy.py  fused_linear_cross_entropy
    token_logprobs.py              token_logprobs (per-token log-probabilities for DPO)
    adamw.py                       adamw_step_ (the optimizer update; used by src/trainer/optimizer.py)

This package imports torch and triton only (cuBLASLt is the library PyTorch loaded, called through
ctypes). Importing a module registers its ops under the `kernels::` namespace; nothing runs on a
device until an op is called.
"""

import torch

from kernels import cublaslt, tuned_mm
from kernels.tuned_mm import mm_out  # noqa: F401 (the GEMM every op calls; `tuned` picks the kernel by timing)

GEMM_PICKS_FORMAT = 1


def gemm_picks_state() -> dict:
    """The GEMM kernels this process chose by timing (`tuned_mm`'s picks and cuBLASLt's algorithms,
    by shape key), for a checkpoint: restored with `restore_gemm_picks`, a resumed run computes with
    the same kernels, so in the same summation order, as the run it continues."""
    return {
        "format": GEMM_PICKS_FORMAT,
        "tuned_mm": tuned_mm.picks_state(),
        "cublaslt": cublaslt.picks_state(),
        "cublaslt_version": cublaslt.picks_version(),
    }


def restore_gemm_picks(state: dict) -> int:
    """Use the picks of `gemm_picks_state()` from an earlier process for the keys it timed: they run
    the same kernels here, untimed. Returns how many picks were given; a ValueError names what is
    wrong with a state of another form."""
    if not isinstance(state, dict) or state.get("format") != GEMM_PICKS_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"GEMM picks of format {found!r}, expected {GEMM_PICKS_FORMAT} (from gemm_picks_state())")
    # Both halves checked before either is taken: a state refused here leaves no half restored.
    version = state.get("cublaslt_version")  # absent in checkpoints written before it was recorded
    tuned_mm.check_picks(state.get("tuned_mm", {}))
    cublaslt.check_picks(state.get("cublaslt", {}), version)
    return tuned_mm.restore_picks(state.get("tuned_mm", {})) + cublaslt.restore_picks(state.get("cublaslt", {}), version)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a small fixed count for the CPU interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def as_rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """(..., H) -> (M, H) with a unit stride on H: a view when possible (`.chunk(2, -1)` halves,
    expanded stride-0 gradients are read through their strides), a copy only otherwise."""
    t = t.reshape(-1, hidden)
    return t if t.stride(-1) == 1 else t.contiguous()


# The bias gradient from a weight-gradient GEMM: a layer's input kept as x_ext = [x | 1 | 0 ... 0]
# makes dy.T @ x_ext = [dW | db | 0 ...], the bias gradient one more output column instead of one
# more pass over dy (kernels/gelu_mlp.py says where it pays). One column of ones, seven of zeros:
# x_ext's rows stay 16-byte aligned.
ONES_COLUMN_PAD = 8


def with_ones_column(x2: torch.Tensor) -> torch.Tensor:
    """x2 (M, D) -> x_ext (M, D + ONES_COLUMN_PAD) = [x2 | 1 | 0...]. Under torch.compile the
    producer of x2 (a norm) writes straight into x_ext; read x2 back as the view x_ext[:, :D]."""
    ones = x2.new_ones(x2.shape[0], 1)
    zeros = x2.new_zeros(x2.shape[0], ONES_COLUMN_PAD - 1)
    return torch.cat([x2, ones, zeros], dim=1)


def grads_from_ones_column(
    dy2: torch.Tensor, x_ext: torch.Tensor, dtype: torch.dtype, tuned: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW (N, D), db (N,)) in `dtype`, contiguous as the parameters, from one GEMM: dy2 (M, N)
    and x_ext (M, D + pad) from `with_ones_column`. `tuned`: that GEMM through `mm_out`'s timed pick."""
    D = x_ext.shape[1] - ONES_COLUMN_PAD
    both = mm_out(dy2.t(), x_ext, dtype, tuned)  # (N, D + pad): [dW | db | 0...]
    return both[:, :D].contiguous(), both[:, D].contiguous()


def usable_weight_copy(
    weight: torch.Tensor, copy: torch.Tensor | None, dtype: torch.dtype, op: str
) -> torch.Tensor | None:
    """`copy` where it stands for `weight` cast to `dtype` (the optimizer's bf16 copy under autocast,
    `optimizer.bf16_weight_copy`); None where the op must cast the weight itself."""
    if copy is None or copy.dtype != dtype or weight.dtype == dtype:
        return None
    if copy.shape != weight.shape or copy.device != weight.device:
        raise ValueError(f"{op}: weight copy {tuple(copy.shape)} on {copy.device} is not a copy of the weight "
                         f"{tuple(weight.shape)} on {weight.device}")
    return copy
