"""Parameter names: Hugging Face `Qwen2ForCausalLM` <-> ours.

Ours fuses q/k/v into one projection (`qkv`, rows [q | k | v]) and gate/up into one
(`gate_up`, rows [gate | up]): one matmul each instead of three and two. Loading concatenates,
saving splits.
"""

from __future__ import annotations

import torch

from ..modeling_utils import tied_head
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

    def take_shaped(name: str, shape: tuple[int, ...], fused_into: str) -> torch.Tensor:
        # For the tensors fused into qkv / gate_up: torch.cat checks only the summed rows, so k and v
        # (or gate and up) split at another row than the config's would load silently as a different
        # attention (MLP), and a wrong in-features size fails inside torch.cat naming no tensor.
        tensor = take(name)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"Qwen2 checkpoint does not match the model config (config.json): wrong shape {name}: "
                f"checkpoint {tuple(tensor.shape)} vs model {shape}, a part of our {fused_into} "
                f"(from hidden_size={config.n_embd}, num_attention_heads={config.n_head}, num_key_value_heads={config.num_kv_heads}, "
                f"head_dim={config.head_dim}, intermediate_size={config.ffn_dim}); "
                "correct config.json or the checkpoint so they describe the same model"
            )
        return tensor

    q_size = config.n_head * config.head_dim
    kv_size = config.num_kv_heads * config.head_dim
    proj_sizes = {"q_proj": q_size, "k_proj": kv_size, "v_proj": kv_size}
    ours["embed_tokens.weight"] = take("model.embed_tokens.weight")
    ours["norm.weight"] = take("model.norm.weight")
    for i in range(config.n_layer):
        o, h = _layer(i)
        attn, qkv, gate_up = h + "self_attn.", o + "self_attn.qkv.", o + "mlp.gate_up.weight"
        ours[qkv + "weight"] = torch.cat(
            [take_shaped(f"{attn}{p}.weight", (rows, config.n_embd), qkv + "weight") for p, rows in proj_sizes.items()],
            dim=0,
        )  # (q_size + 2 * kv_size, C)
        if config.qkv_bias:
            ours[qkv + "bias"] = torch.cat(
                [take_shaped(f"{attn}{p}.bias", (rows,), qkv + "bias") for p, rows in proj_sizes.items()], dim=0
            )
        ours[o + "self_attn.o_proj.weight"] = take(attn + "o_proj.weight")
        ours[gate_up] = torch.cat(
            [take_shaped(f"{h}mlp.{p}.weight", (config.ffn_dim, config.n_embd), gate_up) for p in ("gate_proj", "up_proj")],
            dim=0,
        )  # (2 * ffn_dim, C)
        ours[o + "mlp.down.weight"] = take(h + "mlp.down_proj.weight")
        ours[o + "input_layernorm.weight"] = take(h + "input_layernorm.weight")
        ours[o + "post_attention_layernorm.weight"] = take(h + "post_attention_layernorm.weight")
    lm_head = hf.pop("lm_head.weight", None)
    if config.tie_word_embeddings:
        ours["lm_head.weight"] = tied_head("Qwen2", lm_head, ours["embed_tokens.weight"], "model.embed_tokens.weight")
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
