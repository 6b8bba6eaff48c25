"""Language-modelling losses: the references of `kernels/cross_entropy.py` and
`kernels/fused_linear_cross_entropy.py`, and the loss head the model families share.

Both return the *sum* of per-token losses in fp32; the caller divides by the number of tokens
whose label is not `ignore_index` (so gradient accumulation can normalise over a whole step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import get_kernel

IGNORE_INDEX = -100


def cross_entropy_ref(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Summed cross-entropy of (N, V) logits against (N,) labels, computed in fp32."""
    return F.cross_entropy(
        logits.float(), labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
    )


def fused_linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Reference of the fused kernel: logits = hidden @ weight.T, then summed cross-entropy."""
    return cross_entropy_ref(hidden @ weight.t(), labels, ignore_index, label_smoothing)


class LMLoss:
    """Mean next-token cross-entropy over labels != -100, through the configured kernel.

    `choice` is the `kernels.cross_entropy` value: `fused_linear` never builds the logits, the
    others compute logits = hidden @ lm_head.weight.T and then the loss.
    """

    def __init__(self, choice: str):
        self.fused = choice == "fused_linear"
        if self.fused:
            self._fn = get_kernel("fused_linear_cross_entropy", "triton")
        else:
            self._fn = get_kernel("cross_entropy", choice)

    def __call__(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None
    ) -> torch.Tensor:
        labels = labels.reshape(-1)
        # Clamp avoids 0/0 for a batch with no supervised token (loss is then 0, with zero gradients).
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        if self.fused:
            total = self._fn(hidden.reshape(-1, hidden.shape[-1]), weight, labels)
        else:
            total = self._fn(logits.reshape(-1, logits.shape[-1]), labels)
        return total / n_valid
