"""Learned absolute position embeddings (GPT-2)."""

from __future__ import annotations

import torch
from torch import nn


class LearnedPositionalEmbedding(nn.Module):
    """A (max_positions, dim) table added to the token embeddings.

    `forward(position_ids)` takes (B, T) positions; `forward(None, seq_len, offset)` uses
    positions offset..offset+seq_len-1 without building an index tensor's gather.
    """

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.max_positions = max_positions
        self.weight = nn.Parameter(torch.empty(max_positions, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, position_ids: torch.Tensor | None, seq_len: int = 0, offset: int = 0) -> torch.Tensor:
        if position_ids is not None:
            # Checked only where it is free: reading the largest position of a GPU tensor would
            # stall the host every step, and torch.compile would break its graph on it. CPU runs
            # (tests, generation on the CPU) get the clear error instead of embedding's IndexError.
            if position_ids.device.type == "cpu" and not torch.compiler.is_compiling() and position_ids.numel():
                self._check_length(int(position_ids.max()) + 1)
            return nn.functional.embedding(position_ids, self.weight)  # (B, T, dim)
        self._check_length(offset + seq_len)
        return self.weight[offset : offset + seq_len].unsqueeze(0)  # (1, T, dim)

    def _check_length(self, n_positions: int) -> None:
        if n_positions > self.max_positions:
            raise ValueError(
                f"sequence of {n_positions} positions exceeds block_size={self.max_positions} "
                "(learned position embeddings cannot extrapolate); shorten the input"
            )
