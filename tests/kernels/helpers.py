"""Shared by the kernel tests: where kernels run, the per-dtype tolerance table, comparisons.

On a CPU machine the kernels run through Triton's interpreter (TRITON_INTERPRET=1, set by
scripts/test.sh before triton is imported); on a GPU machine they run compiled, on CUDA.
"""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
needs_triton = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (scripts/test.sh sets it)",
)

# (atol, rtol) per dtype, applied after scaling atol by the reference's largest magnitude:
# fp32 kernels differ from PyTorch by summation order only; bf16 results by one or two roundings
# of 2^-8 relative (sums over many rows, e.g. weight gradients, accumulate a few of those).
TOLERANCE = {
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (1.6e-2, 2e-2),
    torch.float16: (2e-3, 4e-3),
}
DTYPES = [torch.float32, torch.bfloat16]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    atol, rtol = TOLERANCE[dtype]
    scale = max(1.0, expected.detach().float().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().float(), expected.detach().float(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A fresh leaf copy requiring grad (each implementation gets its own)."""
    return t.detach().clone().requires_grad_(True)


def grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.grad for t in tensors]


def row_losses_ref(logits, labels, label_smoothing, z_loss, ignore_index=-100):
    """Per-row cross-entropy losses (fp32, z-loss included) and the gradient of their sum, by
    autograd in fp32: the reference of the one-launch loss + gradient row kernels."""
    x = logits.detach().float().requires_grad_(True)
    rows = torch.nn.functional.cross_entropy(x, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    rows = rows + z_loss * torch.logsumexp(x, dim=-1).square() * (labels != ignore_index)
    rows.sum().backward()
    return rows.detach(), x.grad


def assert_rows_match_ref(loss, grads, logits, labels, label_smoothing, z_loss, ignore_index=-100):
    """A row kernel's per-row losses and logits gradient against `row_losses_ref`, at the logits'
    dtype tolerance (the loss is fp32); ignored rows exactly 0."""
    loss_ref, grads_ref = row_losses_ref(logits, labels, label_smoothing, z_loss, ignore_index)
    assert grads.dtype == logits.dtype and loss.dtype == torch.float32
    assert_close(loss, loss_ref, logits.dtype, "loss")
    assert_close(grads, grads_ref, logits.dtype, "dlogits")
    ignored = labels == ignore_index
    assert (grads[ignored] == 0).all() and (loss[ignored] == 0).all()
