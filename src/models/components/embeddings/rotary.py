"""Rotary position embeddings (RoPE) with the scaling types Qwen2 checkpoints use.

`compute_inv_freq` reproduces Hugging Face's `ROPE_INIT_FUNCTIONS` (default, linear, dynamic NTK,
YaRN, llama3) so that a checkpoint's `rope_scaling` gives the same frequencies here as there.
`RotaryEmbedding` keeps a cos/sin cache for positions below `max_position` and computes other
positions on the fly; `apply_rotary_ref` (the reference of `kernels/rope.py`) rotates q and k and
is reused unchanged by the KV-cache decoding path.

Layout: rotate-half (GPT-NeoX / Llama / Qwen2): the head dimension is split in two halves
(x1, x2) and rotated as (x1 cos - x2 sin, x2 cos + x1 sin), with cos/sin repeated over halves.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

# Keys each scaling type accepts (besides `type` / `rope_type`), as Hugging Face writes them.
_SCALING_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {
        "factor",
        "original_max_position_embeddings",
        "attention_factor",
        "beta_fast",
        "beta_slow",
        "mscale",
        "mscale_all_dim",
        "truncate",
    },
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def normalize_rope_scaling(scaling: dict[str, Any] | None, max_position: int | None = None) -> dict[str, Any] | None:
    """Validate a `rope_scaling` mapping; return it with the type under `rope_type` (or None).

    A YaRN mapping without `factor` gets max_position / original_max_position_embeddings written
    in (what transformers infers too), so that an exported config carries it: transformers
    refuses a YaRN `rope_parameters` without the key. That needs `max_position`.
    """
    if not scaling:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)  # transformers>=5 stores the base inside rope_parameters
    if rope_type is None:
        raise ValueError("rope_scaling needs a 'rope_type' (one of " + ", ".join(ROPE_TYPES) + ")")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type '{rope_type}' is not supported; choose one of {ROPE_TYPES}")
    unknown = set(scaling) - _SCALING_KEYS[rope_type]
    if unknown:
        raise ValueError(
            f"rope_scaling of type '{rope_type}' got unknown key(s) {sorted(unknown)}; "
            f"valid keys: {sorted(_SCALING_KEYS[rope_type])}"
        )
    if rope_type in ("yarn", "llama3") and scaling.get("original_max_position_embeddings") is None:
        raise ValueError(f"rope_scaling of type '{rope_type}' needs 'original_max_position_embeddings'")
    original = scaling.get("original_max_position_embeddings")
    if original is not None and not _is_positive(original):
        raise ValueError(
            "rope_scaling.original_max_position_embeddings must be > 0 (the pretrained context in tokens), "
            f"got {original!r}"
        )
    if rope_type == "yarn" and scaling.get("factor") is None and max_position is not None:
        scaling["factor"] = max_position / original
    if rope_type != "default":
        factor = scaling.get("factor")
        if factor is None:
            raise ValueError(f"rope_scaling of type '{rope_type}' needs a 'factor' (the context extension, e.g. 4.0)")
        if not _is_positive(factor):
            raise ValueError(f"rope_scaling.factor must be a number > 0, got {factor!r}")
    return {"rope_type": rope_type, **scaling}


def _is_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def compute_inv_freq(
    dim: int, base: float, scaling: dict[str, Any] | None, max_position: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (dim/2,) and the attention scaling applied to cos/sin.

    `max_position` is the model's max_position_embeddings; `seq_len` matters for `dynamic` only.
    """
    scaling = normalize_rope_scaling(scaling, max_position)
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "default":
        return _default_inv_freq(dim, base), 1.0

    if rope_type == "linear":
        return _default_inv_freq(dim, base) / scaling["factor"], 1.0

    if rope_type == "dynamic":
        factor = scaling["factor"]
        seq_len = max(seq_len or max_position, max_position)
        # NTK-aware: grow the base with the context beyond the trained length.
        base = base * ((factor * seq_len / max_position) - (factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(dim, base), 1.0

    if rope_type == "yarn":
        original = scaling["original_max_position_embeddings"]
        factor = scaling["factor"]  # filled in by normalize_rope_scaling when the mapping has none
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
            else:
                attention_factor = get_mscale(factor)
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(num_rotations: float) -> float:
            return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
        extrapolation_weight = 1 - ramp
        inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
        return inv_freq, float(attention_factor)

    # llama3: divide low frequencies by `factor`, keep high ones, interpolate smoothly between.
    inv_freq = _default_inv_freq(dim, base)
    factor, low_ff, high_ff = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low_ff, old_context / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, Hq, D) and k (B, T, Hkv, D) by cos/sin (B or 1, T, D).

    cos/sin are cast to q's dtype first, as Hugging Face does, so bf16 models rotate in bf16.
    """
    cos = cos.to(q.dtype).unsqueeze(2)  # (B, T, 1, D): broadcast over heads
    sin = sin.to(q.dtype).unsqueeze(2)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE.

    forward(position_ids=None, seq_len=T, offset=o) -> cos, sin of shape (1, T, D) from the cache
    (positions o..o+T-1); forward(position_ids (B, T)) -> (B, T, D) computed exactly as the cache
    would be, for any positions (packed documents, left-padded generation). Both in fp32.

    The buffers (frequencies and tables) stay fp32 whatever dtype the model is cast to (`_apply`),
    as transformers keeps `inv_freq`: a bf16 `inv_freq` changes cos at position 3000 by up to 0.3
    (rope_base 1e6), so positions computed on the fly (position_ids, past max_position, dynamic NTK) would
    disagree with the cache and with transformers. The consumers round cos/sin to q's dtype.
    """

    def __init__(self, head_dim: int, base: float, max_position: int, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.base = base
        self.max_position = max_position
        self.scaling = normalize_rope_scaling(scaling, max_position)
        self.rope_type = self.scaling["rope_type"] if self.scaling else "default"
        self.reset_cache()

    def reset_cache(self) -> None:
        """(Re)compute frequencies and tables on the current device, e.g. after `to_empty()`
        materialised a model built on the meta device (non-persistent buffers hold garbage then)."""
        device = self.inv_freq.device if hasattr(self, "inv_freq") else None
        inv_freq, self.attention_scaling = compute_inv_freq(self.head_dim, self.base, self.scaling, self.max_position)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone().to(device), persistent=False)
        self.max_seq_len_cached = self.max_position
        self._build_cache(self.max_position)

    def _apply(self, fn, recurse: bool = True):
        """Follow device moves but not dtype casts (`.to(torch.bfloat16)`, `.half()`): where `fn`
        changes an fp32 buffer's dtype, keep the fp32 original, moved to the new device instead.
        Casting back from bf16 would not restore the rounded frequencies, hence no re-cast."""

        def keep_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype != torch.float32:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_fp32, recurse)

    def _build_cache(self, length: int) -> None:
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float32)
        cos, sin = self._cos_sin(positions[None, :])
        self.register_buffer("cos_cached", cos[0], persistent=False)  # (length, D)
        self.register_buffer("sin_cached", sin[0], persistent=False)

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def _dynamic_update(self, seq_len: int) -> None:
        """Dynamic NTK: new frequencies beyond the trained length, the originals again below it."""
        if seq_len > self.max_seq_len_cached:
            inv_freq, _ = compute_inv_freq(self.head_dim, self.base, self.scaling, self.max_position, seq_len)
            self.inv_freq = inv_freq.to(self.inv_freq.device)
            self.max_seq_len_cached = seq_len
            self._build_cache(seq_len)
        elif seq_len < self.max_position < self.max_seq_len_cached:
            self.inv_freq = self.original_inv_freq.clone()
            self.max_seq_len_cached = self.max_position
            self._build_cache(self.max_position)

    def forward(
        self, position_ids: torch.Tensor | None = None, seq_len: int = 0, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope_type == "dynamic":
            # The frequencies depend on the longest position: one host sync, dynamic type only.
            longest = int(position_ids.max()) + 1 if position_ids is not None else offset + seq_len
            self._dynamic_update(longest)
        if position_ids is not None:
            return self._cos_sin(position_ids)
        if offset + seq_len <= self.cos_cached.shape[0]:
            return self.cos_cached[None, offset : offset + seq_len], self.sin_cached[None, offset : offset + seq_len]
        positions = torch.arange(offset, offset + seq_len, device=self.inv_freq.device)
        return self._cos_sin(positions[None, :])
