"""GPT-2 configuration: the fields of a `model_family: gpt2` YAML file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..modeling_utils import require_hf_size_keys, require_positive, require_probability, require_token_id

_DROPOUTS = ("embd_pdrop", "attn_pdrop", "resid_pdrop")
GPT2_END_OF_TEXT = 50256  # <|endoftext|> of GPT-2's tokenizer: its bos and eos
GPT2_N_POSITIONS = 1024  # transformers' GPT2Config default for a config.json without n_positions
# config.json keys that set the model's size, required (transformers' defaults describe GPT-2 small);
# the other keys default as in transformers.
_REQUIRED_HF_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size")


@dataclass
class GPT2Config:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    block_size: int  # max_position: the length of the learned position table
    model_family: Literal["gpt2"] = "gpt2"
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation: str = "gelu_new"  # Hugging Face's activation_function names
    # Dropout, with Hugging Face GPT-2's three rates: after the embeddings (embd_pdrop), on the
    # attention probabilities (attn_pdrop), and on the attention and MLP outputs before the
    # residual add (resid_pdrop). `dropout` is the shorthand for all three; a rate given on its own
    # wins over it. After __post_init__ the three hold the rates in use.
    dropout: float | None = None
    embd_pdrop: float | None = None
    attn_pdrop: float | None = None
    resid_pdrop: float | None = None
    bias: bool = True  # biases in linear layers and LayerNorms
    layer_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    init_std: float = 0.02
    bos_token_id: int | None = GPT2_END_OF_TEXT
    eos_token_id: int | None = GPT2_END_OF_TEXT
    head_dim: int = field(init=False)  # derived
    ffn_dim: int = field(init=False)  # derived

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        require_positive("n_inner", self.n_inner, " (or null for 4 * n_embd)")
        require_positive("layer_norm_eps", self.layer_norm_eps)
        if self.dropout is not None:
            require_probability("dropout", self.dropout)
        for name in _DROPOUTS:
            if getattr(self, name) is None:
                setattr(self, name, self.dropout or 0.0)
            require_probability(name, getattr(self, name))
        for name in ("bos_token_id", "eos_token_id"):
            token = getattr(self, name)
            if token == GPT2_END_OF_TEXT and self.vocab_size <= token:
                # The default names GPT-2's tokenizer's <|endoftext|>, which a smaller vocabulary (a
                # byte-level toy model) lacks: unset, the trainer takes its tokenizer's end token.
                setattr(self, name, None)
            else:
                require_token_id(name, token, self.vocab_size)
        self.head_dim = self.n_embd // self.n_head
        self.ffn_dim = self.n_inner or 4 * self.n_embd

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> "GPT2Config":
        """The config of a Hugging Face config.json (as a dict); `source` names the file in errors.
        Keys it lacks take transformers' GPT2Config defaults, but for the sizes in _REQUIRED_HF_KEYS."""
        require_hf_size_keys("GPT-2", hf, _REQUIRED_HF_KEYS, source)
        unsupported = {
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "scale_attn_weights": True,
            "add_cross_attention": False,
        }
        for key, expected in unsupported.items():
            if hf.get(key, expected) != expected:
                raise ValueError(f"GPT-2 checkpoints with {key}={hf[key]} are not supported (expected {expected})")
        rates = {name: float(hf.get(name, 0.1)) for name in _DROPOUTS}  # transformers' default: 0.1 each
        # Equal rates come back as the `dropout` shorthand, as a YAML file would write them.
        dropouts = {"dropout": rates["embd_pdrop"]} if len(set(rates.values())) == 1 else rates
        return cls(
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            vocab_size=hf["vocab_size"],
            block_size=hf.get("n_positions", GPT2_N_POSITIONS),
            n_inner=hf.get("n_inner"),
            activation=hf.get("activation_function", "gelu_new"),
            **dropouts,
            layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            init_std=hf.get("initializer_range", 0.02),
            # transformers' default; __post_init__ unsets it for a vocabulary without that token.
            bos_token_id=hf.get("bos_token_id", GPT2_END_OF_TEXT),
            eos_token_id=hf.get("eos_token_id", GPT2_END_OF_TEXT),
        )

    def to_hf_config(self) -> dict[str, Any]:
        if not self.bias:
            raise ValueError("Hugging Face GPT-2 has biases everywhere; a bias=false model cannot be exported")
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_inner": self.n_inner,
            "activation_function": self.activation,
            "embd_pdrop": self.embd_pdrop,
            "attn_pdrop": self.attn_pdrop,
            "resid_pdrop": self.resid_pdrop,
            "layer_norm_epsilon": self.layer_norm_eps,
            "initializer_range": self.init_std,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "scale_attn_weights": True,
            "use_cache": True,
        }
