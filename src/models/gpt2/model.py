"""GPT-2: token + learned position embeddings, a stack of GPT2Blocks, final LayerNorm, LM head."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..components import KernelConfig, KVCache, Linear, LearnedPositionalEmbedding, LayerNorm, LMLoss, build_attention_mask
from ..components.attention.backends import prepare_documents
from ..modeling_utils import CausalLM
from . import hf_mapping
from .config import GPT2Config
from .layer import GPT2Block


class GPT2LMHeadModel(CausalLM):
    config_class = GPT2Config
    hf_model_type = "gpt2"
    uses_learned_positions = True
    from_hf_state_dict = staticmethod(hf_mapping.from_hf_state_dict)
    to_hf_state_dict = staticmethod(hf_mapping.to_hf_state_dict)

    def __init__(self, config: GPT2Config, kernels: KernelConfig | None = None):
        super().__init__()
        kernels = kernels or KernelConfig()
        self.config = config
        self.kernels = kernels
        self.head_dim = config.head_dim
        self.n_kv_heads = config.n_head
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = LearnedPositionalEmbedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop) if config.embd_pdrop > 0 else nn.Identity()
        self.layers = nn.ModuleList(GPT2Block(config, i, kernels) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_eps, bias=config.bias, impl=kernels.layernorm)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)  # nn.Linear with a weight_copy slot
        if config.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        self.loss_fn = LMLoss(kernels.cross_entropy, kernels.loss_chunk_tokens)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)."""
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=std / 2)
        for block in self.layers:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final (normalised) hidden states (B, T, C) of input_ids (B, T).

        document_ids (B, T) numbers the packed documents of each row; tokens attend only within
        their own document (pass position_ids restarting at 0 at each document with it)."""
        B, T = input_ids.shape
        past = kv_cache.length if kv_cache is not None else 0
        x = self.wte(input_ids) + self.wpe(position_ids, seq_len=T, offset=past)  # (B, T, C)
        x = self.residual_stream(x)
        x = self.drop(x)
        mask = None
        if attention_mask is not None:  # padding: explicit (B, 1, T, past + T) keep-mask
            mask = build_attention_mask(T, past + T, x.device, padding_mask=attention_mask)
        documents = None
        if document_ids is not None:  # built once here, read by every layer
            dropout_p = self.config.attn_pdrop if self.training else 0.0
            documents = prepare_documents(document_ids, self.kernels.attention, x, self.head_dim, False, {None}, dropout_p)
        for block in self.layers:
            x = block(x, mask=mask, kv_cache=kv_cache, documents=documents)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)
