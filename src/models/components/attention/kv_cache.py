"""A preallocated key/value cache for incremental decoding.

One buffer pair per layer, (B, max_len, Hkv, D) in the attention layout, written in place at the
current length: decoding never reallocates or concatenates. All rows share one length; prompts
of different lengths are left-padded and masked (see `generate`).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # tokens already stored (the same for every layer after a full forward)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, T, Hkv, D) after the cached tokens; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; writing up to {end} would overflow it")
        self.keys[layer][:, start:end] = k
        self.values[layer][:, start:end] = v
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def advance(self, n_tokens: int) -> None:
        """Called once per model forward, after every layer has written its `n_tokens`."""
        self.length += n_tokens

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (e.g. after dropping finished sequences)."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]
