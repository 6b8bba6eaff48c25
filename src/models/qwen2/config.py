"""Qwen2 configuration: the fields of a `model_family: qwen2` YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..components.embeddings.rotary import normalize_rope_scaling
from ..components.mlp import ffn_hidden_dim
from ..modeling_utils import require_hf_size_keys, require_positive, require_probability, require_token_id

# transformers' Qwen2Config defaults, for a config.json that lacks the key.
HF_MAX_WINDOW_LAYERS = 28
HF_SLIDING_WINDOW = 4096  # used only with use_sliding_window: true
# config.json keys that set the model's size, required (transformers' defaults describe one 4096-wide
# model); num_key_value_heads too, though null is allowed. The other keys default as in transformers.
_REQUIRED_HF_KEYS = ("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size", "intermediate_size")


@dataclass
class Qwen2Config:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int  # max_position_embeddings
    num_kv_heads: int
    model_family: Literal["qwen2"] = "qwen2"
    intermediate_size: int | None = None  # SwiGLU width; give this or ffn_multiplier
    ffn_multiplier: float | None = None  # intermediate_size = ceil(n_embd * ffn_multiplier / 256) * 256
    head_dim: int | None = None  # None means n_embd // n_head
    rope_base: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {rope_type: linear|dynamic|yarn|llama3, factor: ..., ...}
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0  # layers with index >= this use the sliding window
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    hidden_act: str = "silu"
    attention_dropout: float = 0.0
    init_std: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    ffn_dim: int = field(init=False)  # derived: the SwiGLU width
    layer_windows: list = field(init=False)  # derived: sliding window (or None) per layer

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_head % self.num_kv_heads != 0:
            raise ValueError(
                f"n_head ({self.n_head}) must be a multiple of num_kv_heads ({self.num_kv_heads}) for grouped-query attention"
            )
        for name in ("intermediate_size", "ffn_multiplier", "head_dim", "rope_base", "rms_norm_eps"):
            require_positive(name, getattr(self, name))
        if self.use_sliding_window:
            require_positive("sliding_window", self.sliding_window, " when use_sliding_window is true")
        if self.max_window_layers < 0:
            raise ValueError(
                f"max_window_layers must be >= 0 (the first layer index with a window), got {self.max_window_layers}"
            )
        require_probability("attention_dropout", self.attention_dropout)
        for name in ("bos_token_id", "eos_token_id"):
            require_token_id(name, getattr(self, name), self.vocab_size)
        if self.head_dim is None:
            if self.n_embd % self.n_head != 0:
                raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or set head_dim")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.intermediate_size is None and self.ffn_multiplier is None:
            raise ValueError("set intermediate_size (e.g. 4864) or ffn_multiplier (e.g. 5.43)")
        multiplied = ffn_hidden_dim(self.n_embd, self.ffn_multiplier, 256) if self.ffn_multiplier else None
        if self.intermediate_size is not None and multiplied is not None and multiplied != self.intermediate_size:
            raise ValueError(
                f"intermediate_size ({self.intermediate_size}) and ffn_multiplier ({self.ffn_multiplier} -> {multiplied}) "
                "disagree; set only one of them"
            )
        self.ffn_dim = self.intermediate_size or multiplied
        self.rope_scaling = normalize_rope_scaling(self.rope_scaling, self.block_size)
        if self.use_sliding_window and not self.sliding_window:
            raise ValueError("use_sliding_window is true but sliding_window is not set; give it a size in tokens")
        window = self.sliding_window if self.use_sliding_window else None
        self.layer_windows = [window if i >= self.max_window_layers else None for i in range(self.n_layer)]

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> "Qwen2Config":
        """The config of a Hugging Face config.json (as a dict); `source` names the file in errors.
        Keys it lacks take transformers' Qwen2Config defaults, but for the sizes in _REQUIRED_HF_KEYS."""
        # num_key_value_heads may be null: transformers reads it as num_attention_heads
        require_hf_size_keys("Qwen2", hf, _REQUIRED_HF_KEYS, source, nullable=("num_key_value_heads",))
        max_window_layers = hf.get("max_window_layers", HF_MAX_WINDOW_LAYERS)
        use_sliding_window = bool(hf.get("use_sliding_window", False))
        rope = hf.get("rope_parameters") or {}  # transformers >= 5
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        base = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
        if hf.get("layer_types") and use_sliding_window:
            expected = [
                "sliding_attention" if i >= max_window_layers else "full_attention"
                for i in range(hf["num_hidden_layers"])
            ]
            if list(hf["layer_types"]) != expected:
                raise ValueError("Qwen2 checkpoints with custom layer_types are not supported")
        return cls(
            n_layer=hf["num_hidden_layers"],
            n_head=hf["num_attention_heads"],
            n_embd=hf["hidden_size"],
            vocab_size=hf["vocab_size"],
            block_size=hf.get("max_position_embeddings", 32768),
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            head_dim=hf.get("head_dim"),
            rope_base=float(base),
            rope_scaling=scaling,
            use_sliding_window=use_sliding_window,
            # transformers' default window applies only when the window is on; off, the value is unused.
            sliding_window=hf.get("sliding_window", HF_SLIDING_WINDOW if use_sliding_window else None),
            max_window_layers=max_window_layers,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            hidden_act=hf.get("hidden_act", "silu"),
            attention_dropout=hf.get("attention_dropout", 0.0),
            init_std=hf.get("initializer_range", 0.02),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )

    def to_hf_config(self) -> dict[str, Any]:
        if not self.qkv_bias:
            raise ValueError("Hugging Face Qwen2 has q/k/v biases; a qkv_bias=false model cannot be exported")
        rope_parameters = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_base}
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_size": self.n_embd,
            "head_dim": self.head_dim,
            "intermediate_size": self.ffn_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.block_size,
            # Both spellings: transformers < 5 reads rope_theta / rope_scaling, >= 5 rope_parameters.
            "rope_theta": self.rope_base,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": rope_parameters,
            "use_sliding_window": self.use_sliding_window,
            "sliding_window": self.sliding_window,
            "max_window_layers": self.max_window_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "attention_dropout": self.attention_dropout,
            "initializer_range": self.init_std,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": True,
        }
