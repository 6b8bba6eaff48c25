"""Qwen2: token embeddings, a stack of Qwen2Blocks sharing one RoPE table, RMSNorm, LM head."""

from __future__ import annotations

import torch
from torch import nn

from ..components import KernelConfig, KVCache, Linear, LMLoss, RMSNorm, RotaryEmbedding, build_attention_mask
from ..components.attention.backends import prepare_documents
from ..modeling_utils import CausalLM
from . import hf_mapping
from .config import Qwen2Config
from .layer import Qwen2Block


class Qwen2ForCausalLM(CausalLM):
    config_class = Qwen2Config
    hf_model_type = "qwen2"
    from_hf_state_dict = staticmethod(hf_mapping.from_hf_state_dict)
    to_hf_state_dict = staticmethod(hf_mapping.to_hf_state_dict)

    def __init__(self, config: Qwen2Config, kernels: KernelConfig | None = None):
        super().__init__()
        kernels = kernels or KernelConfig()
        self.config = config
        self.kernels = kernels
        self.head_dim = config.head_dim
        self.n_kv_heads = config.num_kv_heads
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_base, config.block_size, config.rope_scaling)
        self.layers = nn.ModuleList(Qwen2Block(config, i, kernels) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.rms_norm_eps, impl=kernels.rmsnorm)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)  # nn.Linear with a weight_copy slot
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.loss_fn = LMLoss(kernels.cross_entropy, kernels.loss_chunk_tokens)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, init_std) weights, zero biases, unit norms; also rebuilds the RoPE tables."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.rotary.reset_cache()

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final (normalised) hidden states (B, T, C) of input_ids (B, T).

        position_ids (B, T) for packed documents or left padding (default: 0..T-1 after the cache).
        document_ids (B, T) numbers the packed documents of each row; tokens attend only within
        their own document."""
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        x = self.residual_stream(self.embed_tokens(input_ids))  # (B, T, C)
        cos, sin = self.rotary(position_ids, seq_len=T, offset=past)  # (B|1, T, head_dim), fp32
        masks: dict[int | None, torch.Tensor | None] = {}
        for window in set(self.config.layer_windows):
            masks[window] = (
                build_attention_mask(T, past + T, x.device, window, attention_mask)
                if attention_mask is not None
                else None
            )
        documents = None
        if document_ids is not None:  # built once here, read by every layer
            gqa = self.config.n_head != self.n_kv_heads
            dropout_p = self.config.attention_dropout if self.training else 0.0
            windows = set(self.config.layer_windows)
            documents = prepare_documents(document_ids, self.kernels.attention, x, self.head_dim, gqa, windows, dropout_p)
        for block, window in zip(self.layers, self.config.layer_windows):
            x = block(x, cos, sin, mask=masks[window], kv_cache=kv_cache, documents=documents)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x)
