"""Tiny randomly initialised Hugging Face models for parity tests (no download)."""

from __future__ import annotations

import torch
import transformers


def tiny_hf_gpt2(tmp_path, **overrides) -> tuple[transformers.GPT2LMHeadModel, str]:
    cfg = dict(
        vocab_size=97,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        initializer_range=0.1,
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()
    model.config._attn_implementation = "eager"
    path = str(tmp_path / "hf_gpt2")
    model.save_pretrained(path)
    return model, path


def tiny_hf_qwen2(tmp_path, **overrides) -> tuple[transformers.Qwen2ForCausalLM, str]:
    cfg = dict(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        initializer_range=0.1,  # larger than default so position effects show in the logits
    )
    cfg.update(overrides)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg)).eval()
    # Random (not zero) biases so the q/k/v bias mapping is actually tested.
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
            layer.input_layernorm.weight.normal_(1, 0.1)
    model.config._attn_implementation = "eager"
    path = str(tmp_path / "hf_qwen2")
    model.save_pretrained(path)
    return model, path
