"""The one attention entry point both families use, and its backends.

    out = attend(q, k, v, backend="auto", causal=True, sliding_window=None, mask=None)

q: (B, Tq, Hq, D), k and v: (B, Tk, Hkv, D) with Hq a multiple of Hkv (GQA/MQA without repeating
K/V where the backend allows). Returns (B, Tq, Hq, D). When Tq < Tk (decoding with a KV cache)
the causal mask is aligned bottom-right: query i sits at position Tk - Tq + i.

`mask` is an optional boolean keep-mask (B, 1, Tq, Tk) (True = may attend) that already contains
causality, the sliding window and padding; `build_attention_mask` makes one. Training passes no
mask and gets the fused causal paths.

Backends:
    flash_attn  the flash-attn package (FlashAttention-2); CUDA, fp16/bf16, no explicit mask.
    sdpa        torch.nn.functional.scaled_dot_product_attention.
    eager       explicit softmax(q k^T / sqrt(D)) v in fp32: the reference.
    auto        flash_attn when it can serve the call, else sdpa; the choice and its reason are
                logged once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "sdpa", "flex", "eager")

_logged: set[tuple[str, str]] = set()


def _log_once(backend: str, reason: str) -> None:
    if (backend, reason) not in _logged:
        _logged.add((backend, reason))
        logger.info("attention backend: %s (%s)", backend, reason)


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_attn_unsupported_reason(q: torch.Tensor, mask: torch.Tensor | None, dropout_p: float) -> str | None:
    if not flash_attn_available():
        return "the flash_attn package is not installed"
    if not q.is_cuda:
        return "flash_attn needs a CUDA tensor"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attn needs fp16/bf16, got {q.dtype}"
    if mask is not None:
        return "flash_attn takes no explicit mask (padding)"
    return None


def resolve_backend(requested: str, q: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0) -> str:
    """The backend that will run this call. An explicit choice that cannot serve it is an error."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend '{requested}' is unknown; choose one of {BACKENDS}")
    if requested == "flex":
        raise ValueError("attention backend 'flex' is not available in this build; use sdpa, eager or auto")
    if requested == "flash_attn":
        reason = _flash_attn_unsupported_reason(q, mask, dropout_p)
        if reason:
            raise RuntimeError(f"attention backend 'flash_attn' cannot run this call: {reason}; use attention: auto or sdpa")
        return "flash_attn"
    if requested != "auto":
        return requested
    reason = _flash_attn_unsupported_reason(q, mask, dropout_p)
    if reason is None:
        _log_once("flash_attn", "flash_attn importable, CUDA, half precision")
        return "flash_attn"
    _log_once("sdpa", f"fallback from flash_attn: {reason}")
    return "sdpa"


def build_attention_mask(
    q_len: int,
    kv_len: int,
    device: torch.device,
    sliding_window: int | None = None,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean keep-mask (B|1, 1, Tq, Tk): causal (bottom-right), optional window and key padding.

    padding_mask: (B, Tk) with 1/True for real tokens. A query row that would see no key at all
    (a padded query) keeps its own position so softmax stays finite; its output is never used.
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (Tq, 1) absolute positions
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, Tk)
    keep = k_pos <= q_pos
    if sliding_window is not None:
        keep = keep & (k_pos > q_pos - sliding_window)
    keep = keep[None, None]  # (1, 1, Tq, Tk)
    if padding_mask is not None:
        keep = keep & padding_mask.bool()[:, None, None, :]  # (B, 1, Tq, Tk)
        keep = keep | (~keep.any(-1, keepdim=True) & (k_pos == q_pos))
    return keep


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Reference attention with explicit masks, softmax in fp32. Same layout as `attend`."""
    B, Tq, Hq, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = scale if scale is not None else 1.0 / math.sqrt(D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)  # (B, Hq, Tk, D)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = (q @ k.transpose(-2, -1)).float() * scale  # (B, Hq, Tq, Tk)
    if mask is None and (causal or sliding_window is not None):
        mask = build_attention_mask(Tq, Tk, q.device, sliding_window if causal else None)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return (probs @ v).transpose(1, 2)  # (B, Tq, Hq, D)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    Tq, Hq = q.shape[1], q.shape[2]
    Tk, Hkv = k.shape[1], k.shape[2]
    is_causal = False
    if mask is None and causal:
        if sliding_window is not None and sliding_window < Tk:
            mask = build_attention_mask(Tq, Tk, q.device, sliding_window)
        elif Tq == Tk:
            is_causal = True  # the fused causal kernels
        elif Tq > 1:
            mask = build_attention_mask(Tq, Tk, q.device)  # bottom-right alignment
        # Tq == 1 with a cache: the one query sees every key, no mask needed.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),  # (B, Hq, Tq, D)
        k.transpose(1, 2),  # (B, Hkv, Tk, D)
        v.transpose(1, 2),
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=Hq != Hkv,
    )
    return out.transpose(1, 2)  # (B, Tq, Hq, D)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    from flash_attn import flash_attn_func

    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, -1)
    # flash_attn aligns the causal mask bottom-right when Tq < Tk, as we do.
    return flash_attn_func(q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=causal, window_size=window)


_IMPLS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attn": flash_attention}


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    backend: str = "auto",
    causal: bool = True,
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    name = resolve_backend(backend, q, mask, dropout_p)
    return _IMPLS[name](q, k, v, causal, sliding_window, mask, dropout_p, scale)
