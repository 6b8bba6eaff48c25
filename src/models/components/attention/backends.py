"""The one attention entry point both families use, and its backends.

    out = attend(q, k, v, backend="auto", causal=True, sliding_window=None, mask=None, documents=None)

q: (B, Tq, Hq, D), k and v: (B, Tk, Hkv, D) with Hq a multiple of Hkv (GQA/MQA without repeating
K/V where the backend allows). Returns (B, Tq, Hq, D). When Tq < Tk (decoding with a KV cache)
the causal mask is aligned bottom-right: query i sits at position Tk - Tq + i.

`mask` is an optional boolean keep-mask (B|1, 1, Tq, Tk) (True = may attend) that already contains
causality, the sliding window and padding; `build_attention_mask` makes one (padded generation).
`documents` (a `PackedDocuments`, see documents.py) makes attention block-causal within each packed
document. Training passes neither mask and gets the fused causal / block-sparse paths.

Backends:
    flash_attn  FlashAttention-3 or -2 (flash.py); optional packages, CUDA, fp16/bf16, no explicit mask.
    sdpa        F.scaled_dot_product_attention, on CUDA with an explicit kernel priority per GPU
                (`sdpa_priority`); windows, documents and decoding go in as dense masks.
    flex        FlexAttention (flex.py): block-sparse masks, compiled once.
    eager       explicit softmax(q k^T / sqrt(D)) v with the softmax in fp32: the reference.
    auto        the fastest backend that serves the call (`_auto_choice` says why); the choice and
                its reason are logged once per distinct choice.

An explicitly named backend that cannot serve a call raises an error naming the reason and the fix.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from src.utils.config import ConfigError

from .documents import PackedDocuments
from .flash import fa2_installed, fa3_installed, flash_attention, flash_version
from .flex import flex_attention_forward

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "flash_attn", "sdpa", "flex", "eager")

# SDPA kernel priority by GPU generation (compute capability major), from measurement: on one H100
# with torch 2.11, causal fwd+bwd at 4x16x4096x128 ran at 491 TFLOP/s with cuDNN against 269 with
# SDPA's flash kernel (torch's default order never picks cuDNN first). Ampere keeps the flash
# kernel first. A kernel that cannot serve a call is skipped for the next one.
_SDPA_PRIORITY = {
    9: [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    10: [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
}
_SDPA_DEFAULT_PRIORITY = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
]


def sdpa_priority(device: torch.device) -> list[SDPBackend]:
    """SDPA kernels to try, in order, on this CUDA device."""
    return list(_SDPA_PRIORITY.get(torch.cuda.get_device_properties(device).major, _SDPA_DEFAULT_PRIORITY))


# ----------------------------------------------------------------------------------------------
# What a call needs, and who can serve it


@dataclass(frozen=True)
class AttentionRequest:
    """The properties of one attention call that decide which backends can serve it."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int
    seq_len: int  # keys per row (Tk)
    gqa: bool  # fewer key/value heads than query heads
    causal: bool
    sliding_window: bool  # a window shorter than the keys, so it masks something
    documents: bool  # packed documents (block-causal)
    decoding: bool  # Tq < Tk: queries after a KV cache
    padding_mask: bool  # an explicit keep-mask
    dropout: bool
    needs_grad: bool


def describe_call(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool = True,
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
    documents: PackedDocuments | None = None,
    dropout_p: float = 0.0,
) -> AttentionRequest:
    Tq, Tk = q.shape[1], k.shape[1]
    return AttentionRequest(
        device=q.device,
        dtype=q.dtype,
        head_dim=q.shape[3],
        seq_len=Tk,
        gqa=q.shape[2] != k.shape[2],
        causal=causal,
        sliding_window=causal and sliding_window is not None and sliding_window < Tk,
        documents=documents is not None,
        decoding=Tq != Tk,
        padding_mask=mask is not None,
        dropout=dropout_p > 0.0,
        needs_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad),
    )


def _flash_attn_unsupported(r: AttentionRequest) -> str | None:
    if not (fa2_installed() or fa3_installed()):
        return "neither flash_attn (FlashAttention-2) nor flash_attn_interface (FlashAttention-3) is installed"
    if r.device.type != "cuda":
        return f"flash-attn runs on CUDA only, the tensors are on {r.device.type}"
    if r.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs fp16/bf16 inputs, got {r.dtype}"
    if r.head_dim > 256 or r.head_dim % 8 != 0:
        return f"flash-attn needs head_dim <= 256 and a multiple of 8, got {r.head_dim}"
    if r.padding_mask:
        return "flash-attn takes no explicit keep-mask (padded generation)"
    if flash_version(r.device, 0.1 if r.dropout else 0.0) == 0:
        return "FlashAttention-3 has no dropout and FlashAttention-2 is not installed"
    return None


FLEX_MIN_HEAD_DIM = 32
# Below this many keys per row, SDPA with a dense keep-mask beat compiled FlexAttention on packed
# documents (H100, torch 2.11: 71 vs 23-60 TFLOP/s fwd+bwd at 512 tokens; flex ahead from 1024).
FLEX_MIN_SEQ_LEN = 1024


def _flex_unsupported(r: AttentionRequest) -> str | None:
    if r.dropout:
        return "FlexAttention has no attention dropout"
    if r.device.type not in ("cuda", "cpu"):
        return f"FlexAttention runs on CUDA and CPU here, the tensors are on {r.device.type}"
    if r.device.type == "cpu" and r.needs_grad:
        return "FlexAttention has no backward on CPU"
    if r.device.type == "cuda" and r.head_dim < FLEX_MIN_HEAD_DIM:
        # Seen on an H100 with torch 2.11: Inductor's flex templates found no valid kernel
        # configuration for head_dim 8 and 16 (with GQA).
        return f"FlexAttention's GPU kernels need head_dim >= {FLEX_MIN_HEAD_DIM}, got {r.head_dim}"
    return None


_UNSUPPORTED = {
    "flash_attn": _flash_attn_unsupported,
    "flex": _flex_unsupported,
    "sdpa": lambda r: None,
    "eager": lambda r: None,
}


def _auto_choice(r: AttentionRequest) -> tuple[str, str]:
    """The fastest backend for the request, and why. The order follows benchmarks/attention.py."""
    if r.device.type != "cuda":
        return "sdpa", f"{r.device.type}: SDPA's fused CPU kernels; flash-attn and compiled FlexAttention target GPUs"
    flash_reason = _flash_attn_unsupported(r)
    if flash_reason is None:
        version = flash_version(r.device, 0.1 if r.dropout else 0.0)
        major = torch.cuda.get_device_properties(r.device).major
        # cuDNN SDPA beats FlashAttention-2 on plain causal attention from Hopper on; FA2 keeps
        # windows, documents (varlen) and decoding, where SDPA would need a dense mask.
        if version == 3 or major < 9 or r.sliding_window or r.documents or r.decoding:
            return "flash_attn", f"FlashAttention-{version} serves this call natively"
    sparse = r.sliding_window or r.documents
    long_enough = r.seq_len >= FLEX_MIN_SEQ_LEN
    if sparse and long_enough and not r.decoding and not r.padding_mask and _flex_unsupported(r) is None:
        what = "packed documents" if r.documents else "a sliding window"
        return "flex", f"{what}: FlexAttention skips fully masked blocks, SDPA would need a dense mask"
    order = ", ".join(b.name.lower() for b in sdpa_priority(r.device))
    return "sdpa", f"SDPA with kernel priority {order}"


@torch.compiler.assume_constant_result
def _log_choice(requested: str, chosen: str, reason: str) -> bool:
    """Log a choice once. Runs at trace time under torch.compile, so it never breaks a graph."""
    key = (requested, chosen, reason)
    if key not in _logged:
        _logged.add(key)
        logger.info("attention backend (%s): %s (%s)", requested, chosen, reason)
    return True


_logged: set[tuple[str, str, str]] = set()


def resolve_backend(requested: str, request: AttentionRequest) -> str:
    """The backend that will run this call. An explicit choice that cannot serve it is an error."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend '{requested}' is unknown; choose one of {BACKENDS}")
    if requested == "auto":
        chosen, reason = _auto_choice(request)
        _log_choice(requested, chosen, reason)
        return chosen
    reason = _UNSUPPORTED[requested](request)
    if reason is not None:
        raise ConfigError(
            f"attention backend '{requested}' cannot run this call: {reason}; "
            "set kernels.attention to auto (or sdpa / eager, which serve every call)"
        )
    return requested


# ----------------------------------------------------------------------------------------------
# Masks


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


def _dense_mask(
    Tq: int,
    Tk: int,
    device: torch.device,
    causal: bool,
    sliding_window: int | None,
    mask: torch.Tensor | None,
    documents: PackedDocuments | None,
) -> torch.Tensor | None:
    """The explicit keep-mask a dense backend needs, or None when no position is masked."""
    if documents is not None:
        return documents.keep_mask(sliding_window)
    if mask is not None or not causal:
        return mask
    return build_attention_mask(Tq, Tk, device, sliding_window)


# ----------------------------------------------------------------------------------------------
# Backends


def eager_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    sliding_window: int | None = None,
    mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    documents: PackedDocuments | None = None,
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
    keep = _dense_mask(Tq, Tk, q.device, causal, sliding_window, mask, documents)
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
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
    documents: PackedDocuments | None = None,
    priority: list[SDPBackend] | None = None,
) -> torch.Tensor:
    """SDPA; on CUDA it tries the kernels in `priority` (default: `sdpa_priority`) in that order.

    Passing one kernel forces it (tests and benchmarks do); a call it cannot serve then raises.
    """
    Tq, Hq = q.shape[1], q.shape[2]
    Tk, Hkv = k.shape[1], k.shape[2]
    plain_causal = causal and mask is None and documents is None and (sliding_window is None or sliding_window >= Tk)
    if plain_causal and Tq == Tk:
        is_causal, keep = True, None  # the fused causal kernels
    elif plain_causal and Tq == 1:
        is_causal, keep = False, None  # one query after the cache sees every key
    else:
        is_causal, keep = False, _dense_mask(Tq, Tk, q.device, causal, sliding_window, mask, documents)
    args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, T, D)
    kwargs = dict(attn_mask=keep, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=Hq != Hkv)
    if q.is_cuda:
        with sdpa_kernel(priority or sdpa_priority(q.device), set_priority=True):
            out = F.scaled_dot_product_attention(*args, **kwargs)
    else:
        out = F.scaled_dot_product_attention(*args, **kwargs)
    return out.transpose(1, 2)  # (B, Tq, Hq, D)


_IMPLS = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flex": flex_attention_forward,
    "flash_attn": flash_attention,
}


def _check_call(q, k, v, causal, mask, documents) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"attention takes q (B, Tq, Hq, D) and k, v (B, Tk, Hkv, D); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch size or head_dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of key/value heads ({k.shape[2]})")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"more queries ({q.shape[1]}) than keys ({k.shape[1]}); keys include the queries' own")
    if documents is not None:
        if mask is not None:
            raise ValueError("pass either documents (packed training) or an explicit mask (padded generation), not both")
        if not causal:
            raise ValueError("packed documents are block-causal; call attend with causal=True")
        if documents.shape != (q.shape[0], q.shape[1]) or q.shape[1] != k.shape[1]:
            raise ValueError(
                f"document_ids {documents.shape} must match the batch and sequence of q {tuple(q.shape[:2])} "
                "with no KV cache (packed documents are a training-time input)"
            )


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
    documents: PackedDocuments | None = None,
) -> torch.Tensor:
    _check_call(q, k, v, causal, mask, documents)
    request = describe_call(q, k, causal, sliding_window, mask, documents, dropout_p)
    name = resolve_backend(backend, request)
    return _IMPLS[name](q, k, v, causal, sliding_window, mask, dropout_p, scale, documents)


def prepare_documents(
    document_ids: torch.Tensor,
    backend: str,
    hidden: torch.Tensor,
    head_dim: int,
    gqa: bool,
    windows: set[int | None],
    dropout_p: float = 0.0,
) -> PackedDocuments:
    """PackedDocuments for one forward, with the mask form each layer's backend reads built up front.

    Called by a model before its layers (outside compiled blocks). `hidden` is the (B, T, C)
    input of the first layer: its device, and the autocast dtype when autocast is on, are those
    of the q, k, v the layers will pass to `attend`.
    """
    documents = PackedDocuments(document_ids)
    device = hidden.device
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
    for window in windows:
        request = AttentionRequest(
            device=device,
            dtype=dtype,
            head_dim=head_dim,
            seq_len=documents.seq_len,
            gqa=gqa,
            causal=True,
            sliding_window=window is not None and window < documents.seq_len,
            documents=True,
            decoding=False,
            padding_mask=False,
            dropout=dropout_p > 0.0,
            needs_grad=torch.is_grad_enabled() and hidden.requires_grad,
        )
        name = resolve_backend(backend, request)
        if name == "flash_attn":
            documents.varlen()
        elif name == "flex":
            documents.block_mask(window)
        else:
            documents.keep_mask(window)
    return documents
