"""flash_attn backend: FlashAttention-3 (`flash_attn_interface`, Hopper) or FlashAttention-2 (`flash_attn`).

Both packages are optional: nothing here imports them until a call needs them. Both take our
layout (B, T, H, D) directly, handle GQA without repeating K/V, align the causal mask bottom-right
when Tq < Tk (as we do), and take a sliding window as window_size=(left, right) with
key j kept when i - left <= j <= i + right; our window w keeps j > i - w, so left = w - 1.
Packed documents go through the varlen kernels: the batch is flattened to (B * T, H, D) and
cu_seqlens marks where each document starts.

FlashAttention-3 runs on sm90 only and has no dropout; FlashAttention-2 serves the rest.
"""

from __future__ import annotations

import importlib.util

import torch

# Whether the packages are installed, looked up once from package metadata (nothing is imported).
# Plain module constants: torch.compile reads them without a graph break, where a cached function
# (functools.cache) in the attention path broke every compiled block's graph on torch 2.11.
_FA3_INSTALLED = importlib.util.find_spec("flash_attn_interface") is not None
_FA2_INSTALLED = importlib.util.find_spec("flash_attn") is not None


def fa3_installed() -> bool:
    return _FA3_INSTALLED


def fa2_installed() -> bool:
    return _FA2_INSTALLED


def flash_version(device: torch.device, dropout_p: float) -> int:
    """3 or 2: the FlashAttention generation that will run on `device`; 0 when none can."""
    if device.type != "cuda":
        return 0
    if fa3_installed() and torch.cuda.get_device_properties(device).major == 9 and dropout_p == 0.0:
        return 3
    return 2 if fa2_installed() else 0


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    documents=None,
) -> torch.Tensor:
    """Same contract as `backends.attend` (no explicit mask; `backends` checks that first)."""
    version = flash_version(q.device, dropout_p)
    module = importlib.import_module("flash_attn_interface" if version == 3 else "flash_attn")
    kwargs = {"softmax_scale": scale, "causal": causal}
    if version == 2:
        kwargs["dropout_p"] = dropout_p
    if sliding_window is not None and causal:
        kwargs["window_size"] = (sliding_window - 1, 0)
    if documents is None:
        out = module.flash_attn_func(q, k, v, **kwargs)
    else:
        B, T, Hq, D = q.shape
        cu_seqlens, max_seqlen = documents.varlen()
        out = module.flash_attn_varlen_func(
            q.reshape(B * T, Hq, D),  # (B * T, Hq, D): documents never cross rows
            k.reshape(B * T, k.shape[2], D),
            v.reshape(B * T, v.shape[2], D),
            cu_seqlens,
            cu_seqlens,
            max_seqlen,
            max_seqlen,
            **kwargs,
        )
    if isinstance(out, tuple):  # some FlashAttention-3 releases also return the log-sum-exp
        out = out[0]
    return out.view(q.shape)  # (B, Tq, Hq, D)
