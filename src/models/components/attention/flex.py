"""FlexAttention backend: block-sparse masks for causal, sliding-window and packed-document attention.

FlexAttention (torch.nn.attention.flex_attention) generates one fused attention kernel from a
`mask_mod(b, h, q_idx, kv_idx) -> keep`. A BlockMask records, per 128 x 128 tile, whether the tile
is fully masked (skipped), fully kept (no per-element mask) or partial, so a sliding window or
many short documents cost only the tiles they touch, which dense-mask SDPA cannot do.

- The kernel is compiled once (`compiled_flex_attention`) and shared by every layer and call;
  inside an already compiled region the plain function is traced into that graph instead.
- Causal / sliding-window BlockMasks depend only on (T, window, device) and are cached; packed-
  document BlockMasks are built once per forward by `PackedDocuments.block_mask`.
- Decoding (Tq < Tk) and explicit keep-masks (padded generation) change every call, so they run
  uncompiled through a BlockMask read from the dense mask: small tensors, correct, not fast.
- FlexAttention has no backward on CPU and no attention dropout; `backends` refuses those calls.
- On the CPU every call takes FlexAttention's reference path, even inside a compiled region (a
  graph break there). Inductor's C++ kernel (torch 2.13, seen on an AVX2 machine) returned wrong
  values without an error for some shapes: 24 tokens with head_dim 8 or 16, GQA, or query/key
  views transposed from our layout (errors of 1-2.7; NaN in a tiny model). The reference path
  gives the eager values. The CPU is where tests run, not where training is fast.

Layout in and out is ours, (B, T, H, D); FlexAttention takes (B, H, T, D) views.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once: Inductor turns the mask into a fused Triton (GPU) or C++ (CPU) kernel."""
    return torch.compile(flex_attention)


@torch.compiler.disable
def _cpu_flex_attention(*args, **kwargs):
    """flex_attention kept out of any compiled graph (a graph break inside one): it runs eagerly,
    on the reference path."""
    return flex_attention(*args, **kwargs)


def _causal_mask_mod(sliding_window: int | None):
    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    def windowed(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < sliding_window)

    return causal if sliding_window is None else windowed


@functools.lru_cache(maxsize=64)
def causal_block_mask(seq_len: int, sliding_window: int | None, device: str) -> BlockMask:
    """Causal (optionally windowed) BlockMask for Tq == Tk == seq_len, shared by all batch rows and heads."""
    return create_block_mask(_causal_mask_mod(sliding_window), B=None, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)


def document_block_mask(segments: torch.Tensor, sliding_window: int | None) -> BlockMask:
    """Block-causal BlockMask of packed documents; segments (B, T) gives each token's document."""
    B, T = segments.shape

    def same_document(b, h, q_idx, kv_idx):
        return segments[b, q_idx] == segments[b, kv_idx]

    causal = _causal_mask_mod(sliding_window)

    def mask_mod(b, h, q_idx, kv_idx):
        return same_document(b, h, q_idx, kv_idx) & causal(b, h, q_idx, kv_idx)

    return create_block_mask(mask_mod, B=B, H=None, Q_LEN=T, KV_LEN=T, device=segments.device)


def dense_block_mask(keep: torch.Tensor) -> BlockMask:
    """BlockMask that reads an explicit boolean keep-mask (B|1, 1, Tq, Tk)."""
    keep = keep[:, 0]  # (B|1, Tq, Tk)
    rows, Tq, Tk = keep.shape

    def mask_mod(b, h, q_idx, kv_idx):
        return keep[b if rows > 1 else 0, q_idx, kv_idx]

    return create_block_mask(mask_mod, B=rows if rows > 1 else None, H=None, Q_LEN=Tq, KV_LEN=Tk, device=keep.device)


def flex_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    documents=None,
    compiled: bool = True,
) -> torch.Tensor:
    """Same contract as `backends.attend`. `compiled=False` runs FlexAttention's unfused reference path."""
    Tq, Hq, Tk, Hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    window = sliding_window if causal else None
    dynamic_mask = False
    if documents is not None:
        block_mask = documents.block_mask(window)
    elif mask is not None or (causal and Tq != Tk):
        if mask is None:  # decoding: bottom-right causal alignment as a dense mask
            from .backends import build_attention_mask

            mask = build_attention_mask(Tq, Tk, q.device, window)
        block_mask, dynamic_mask = dense_block_mask(mask), True
    elif causal:
        block_mask = causal_block_mask(Tq, window, str(q.device))
    else:
        block_mask = None
    if q.device.type == "cpu":  # the reference path, compiling or not: see the module docstring
        fn = _cpu_flex_attention
    elif dynamic_mask or not compiled or torch.compiler.is_compiling():
        fn = flex_attention
    else:
        fn = compiled_flex_attention()
    out = fn(
        q.transpose(1, 2),  # (B, Hq, Tq, D)
        k.transpose(1, 2),  # (B, Hkv, Tk, D)
        v.transpose(1, 2),
        block_mask=block_mask,
        scale=scale,
        enable_gqa=Hq != Hkv,
    )
    return out.transpose(1, 2)  # (B, Tq, Hq, D)
