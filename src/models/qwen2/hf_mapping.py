"""Parameter names: Hugging Face `Qwen2ForCausalLM` <-> ours.

Ours fuses q/k/v into one projection (`qkv`, rows [q | k | v]) and gate/up into one
(`gate_up`, rows [gate | up]): one matmul each instead of three and two. Loading concatenates,
saving splits.
"""

from __future__ import annotations

import torch

from .config import Qwen2Config


def _layer(i: int) -> tuple[str, str]:
    return f"layers.{i}.", f"model.layers.{i}."


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: Qwen2Config) -> dict[str, torch.Tensor]:
    hf = dict(hf)
    ours: dict[str, torch.Tensor] = {}

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise ValueError(f"Qwen2 checkpoint lacks '{name}' (n_layer={config.n_layer} in its config)")
        return hf.pop(name)

    ours["embed_tokens.weight"] = take("model.embed_tokens.weight")
    ours["norm.weight"] = take("model.norm.weight")
    for i in range(config.n_layer):
        o, h = _layer(i)
        attn = h + "self_attn."
        ours[o + "self_attn.qkv.weight"] = torch.cat(
            [take(attn + "q_proj.weight"), take(attn + "k_proj.weight"), take(attn + "v_proj.weight")], dim=0
        )
        if config.qkv_bias:
            ours[o + "self_attn.qkv.bias"] = torch.cat(
                [take(attn + "q_proj.bias"), take(attn + "k_proj.bias"), take(attn + "v_proj.bias")], dim=0
            )
        ours[o + "self_attn.o_proj.weight"] = take(attn + "o_proj.weight")
        ours[o + "mlp.gate_up.weight"] = torch.cat(
            [take(h + "mlp.gate_proj.weight"), take(h + "mlp.up_proj.weight")], dim=0
        )
        ours[o + "mlp.down.weight"] = take(h + "mlp.down_proj.weight")
        ours[o + "input_layernorm.weight"] = take(h + "input_layernorm.weight")
        ours[o + "post_attention_layernorm.weight"] = take(h + "post_attention_layernorm.weight")
    lm_head = hf.pop("lm_head.weight", None)
    if config.tie_word_embeddings:
        ours["lm_head.weight"] = ours["embed_tokens.weight"]  # a stored copy of the tied head is ignored
    elif lm_head is not None:
        ours["lm_head.weight"] = lm_head
    else:
        # Falling back to the embedding would silently give a different model than the checkpoint's.
        raise ValueError(
            "Qwen2 checkpoint lacks 'lm_head.weight', but its config sets tie_word_embeddings=false; "
            "add the head's weights, or set tie_word_embeddings: true in config.json if the head is the token embedding"
        )
    leftover = sorted(k for k in hf if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise ValueError(f"Qwen2 checkpoint has tensors this model does not know: {leftover[:5]}")
    return ours


def to_hf_state_dict(ours: dict[str, torch.Tensor], config: Qwen2Config) -> dict[str, torch.Tensor]:
    q_size = config.n_head * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    hf = {
        "model.embed_tokens.weight": ours["embed_tokens.weight"],
        "model.norm.weight": ours["norm.weight"],
    }
    for i in range(config.n_layer):
        o, h = _layer(i)
        attn = h + "self_attn."
        q, k, v = ours[o + "self_attn.qkv.weight"].split([q_size, kv_size, kv_size], dim=0)
        hf.update({attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v})
        if config.qkv_bias:
            qb, kb, vb = ours[o + "self_attn.qkv.bias"].split([q_size, kv_size, kv_size], dim=0)
            hf.update({attn + "q_proj.bias": qb, attn + "k_proj.bias": kb, attn + "v_proj.bias": vb})
        hf[attn + "o_proj.weight"] = ours[o + "self_attn.o_proj.weight"]
        gate, up = ours[o + "mlp.gate_up.weight"].chunk(2, dim=0)
        hf[h + "mlp.gate_proj.weight"] = gate
        hf[h + "mlp.up_proj.weight"] = up
        hf[h + "mlp.down_proj.weight"] = ours[o + "mlp.down.weight"]
        hf[h + "input_layernorm.weight"] = ours[o + "input_layernorm.weight"]
        hf[h + "post_attention_layernorm.weight"] = ours[o + "post_attention_layernorm.weight"]
    if not config.tie_word_embeddings:
        hf["lm_head.weight"] = ours["lm_head.weight"]
    return hf
