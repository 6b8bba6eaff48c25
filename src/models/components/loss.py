"""Language-modelling losses: the references of `kernels/cross_entropy.py`,
`kernels/fused_linear_cross_entropy.py` and `kernels/token_logprobs.py`, and the loss head the
model families share.

The two losses return the *sum* of per-token losses in fp32; the caller divides by the number of tokens
whose label is not `ignore_index` (so gradient accumulation can normalise over a whole step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import get_kernel

IGNORE_INDEX = -100


def cross_entropy_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Summed cross-entropy of (N, V) logits against (N,) labels, computed in fp32.

    `z_loss` > 0 adds z_loss * logsumexp(logits)^2 per supervised token (PaLM's auxiliary loss
    that keeps the softmax normaliser near 1)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum")
    if z_loss:
        supervised = labels != ignore_index
        loss = loss + z_loss * (torch.logsumexp(logits, dim=-1).square() * supervised).sum()
    return loss


def fused_linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Reference of the fused kernel: logits = hidden @ weight.T, then summed cross-entropy."""
    return cross_entropy_ref(hidden @ weight.t(), labels, ignore_index, label_smoothing, z_loss)


def token_logprobs_ref(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-token log p(label) under logits = hidden (N, H) @ weight (V, H).T, in fp32, shape (N,);
    0 where labels == ignore_index. The reference of `kernels/token_logprobs.py` (used by DPO)."""
    logits = (hidden @ weight.t()).float()  # (N, V)
    ignored = labels == ignore_index
    safe_labels = torch.where(ignored, torch.zeros_like(labels), labels)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, safe_labels[:, None]).squeeze(-1)  # (N,)
    return logprobs.masked_fill(ignored, 0.0)


class LMLoss:
    """Mean next-token cross-entropy over labels != -100, through the configured kernel.

    `choice` is the `kernels.cross_entropy` value: `fused_linear` never builds the logits, the
    others compute logits = hidden @ lm_head.weight.T and then the loss. `chunk_tokens`
    (`kernels.loss_chunk_tokens`) sets the fused op's tokens per chunk; 0 lets it choose.
    """

    def __init__(self, choice: str, chunk_tokens: int = 0):
        self.fused = choice == "fused_linear"
        self.chunk_tokens = chunk_tokens or None
        if self.fused:
            self._fn = get_kernel("fused_linear_cross_entropy", "triton", setting=choice)
        else:
            self._fn = get_kernel("cross_entropy", choice)

    def __call__(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor | None
    ) -> torch.Tensor:
        labels = labels.reshape(-1)
        # Clamp avoids 0/0 for a batch with no supervised token (loss is then 0, with zero gradients).
        n_valid = (labels != IGNORE_INDEX).sum().clamp(min=1)
        if self.fused:
            total = self._fn(hidden.reshape(-1, hidden.shape[-1]), weight, labels, chunk_size=self.chunk_tokens)
        else:
            total = self._fn(logits.reshape(-1, logits.shape[-1]), labels)
        return total / n_valid
