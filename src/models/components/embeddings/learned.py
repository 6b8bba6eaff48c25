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
            return nn.functional.embedding(position_ids, self.weight)  # (B, T, dim)
        if offset + seq_len > self.max_positions:
            raise ValueError(
                f"sequence of {offset + seq_len} positions exceeds block_size={self.max_positions} "
                "(learned position embeddings cannot extrapolate); shorten the input"
            )
        return self.weight[offset : offset + seq_len].unsqueeze(0)  # (1, T, dim)
