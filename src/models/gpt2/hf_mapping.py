"""Parameter names: Hugging Face `GPT2LMHeadModel` <-> ours.

Hugging Face stores GPT-2's linear layers as `Conv1D` with (in, out) weights; ours are
`nn.Linear` with (out, in), so those weights are transposed on the way in and out.
"""

from __future__ import annotations

import re

import torch

from ..modeling_utils import tied_head
from .config import GPT2Config

# (ours, theirs, Conv1D shape) with {i} for the layer index. The shape, (in, out) from the config,
# marks the Conv1D weights, which are transposed; None marks the tensors copied as they are.
_LAYER_NAMES = [
    ("layers.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", None),
    ("layers.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", None),
    ("layers.{i}.attn.qkv.weight", "transformer.h.{i}.attn.c_attn.weight", lambda c: (c.n_embd, 3 * c.n_embd)),
    ("layers.{i}.attn.qkv.bias", "transformer.h.{i}.attn.c_attn.bias", None),
    ("layers.{i}.attn.proj.weight", "transformer.h.{i}.attn.c_proj.weight", lambda c: (c.n_embd, c.n_embd)),
    ("layers.{i}.attn.proj.bias", "transformer.h.{i}.attn.c_proj.bias", None),
    ("layers.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight", None),
    ("layers.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", None),
    ("layers.{i}.mlp.fc.weight", "transformer.h.{i}.mlp.c_fc.weight", lambda c: (c.n_embd, c.ffn_dim)),
    ("layers.{i}.mlp.fc.bias", "transformer.h.{i}.mlp.c_fc.bias", None),
    ("layers.{i}.mlp.proj.weight", "transformer.h.{i}.mlp.c_proj.weight", lambda c: (c.ffn_dim, c.n_embd)),
    ("layers.{i}.mlp.proj.bias", "transformer.h.{i}.mlp.c_proj.bias", None),
]
_GLOBAL_NAMES = [
    ("wte.weight", "transformer.wte.weight"),
    ("wpe.weight", "transformer.wpe.weight"),
    ("ln_f.weight", "transformer.ln_f.weight"),
    ("ln_f.bias", "transformer.ln_f.bias"),
]
# Buffers older GPT-2 checkpoints carry (the causal masks of transformers < 4.x, e.g. the hub's
# openai-community/gpt2): not parameters, never needed. Matched after the `transformer.` prefix is
# added, so they are dropped whichever layout the checkpoint has.
_IGNORED = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def _pairs(config: GPT2Config):
    """(ours, theirs, the Conv1D (in, out) shape or None) for every tensor but the head."""
    for ours, theirs in _GLOBAL_NAMES:
        yield ours, theirs, None
    for i in range(config.n_layer):
        for ours, theirs, conv1d_shape in _LAYER_NAMES:
            yield ours.format(i=i), theirs.format(i=i), conv1d_shape(config) if conv1d_shape else None


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: GPT2Config) -> dict[str, torch.Tensor]:
    hf = {k.removeprefix("module."): v for k, v in hf.items()}
    if not any(k.startswith("transformer.") for k in hf):  # GPT2Model dumps (the hub's gpt2): no prefix
        hf = {f"transformer.{k}" if not k.startswith("lm_head.") else k: v for k, v in hf.items()}
    hf = {k: v for k, v in hf.items() if not _IGNORED.match(k)}
    ours, used = {}, set()
    for our_name, hf_name, conv1d_shape in _pairs(config):
        if hf_name not in hf:
            raise ValueError(f"GPT-2 checkpoint lacks '{hf_name}' (n_layer={config.n_layer} in its config)")
        tensor = hf[hf_name]
        if conv1d_shape is not None and tuple(tensor.shape) != conv1d_shape:
            # Checked here, in the file's layout: after the transpose the model's own check would name
            # our tensor and a shape the file does not hold (an nn.Linear-layout export reads as correct).
            raise ValueError(
                f"GPT-2 checkpoint does not match the model config (config.json): wrong shape {hf_name}: "
                f"checkpoint {tuple(tensor.shape)} vs model {conv1d_shape} (Conv1D layout (in, out), loaded transposed "
                f"into our {our_name}; from n_embd={config.n_embd}, "
                f"MLP width n_inner={config.ffn_dim}); correct config.json, or export the weights as transformers' Conv1D "
                "(in, out) rather than nn.Linear (out, in)"
            )
        ours[our_name] = tensor.t().contiguous() if conv1d_shape is not None else tensor
        used.add(hf_name)
    if config.tie_word_embeddings:
        ours["lm_head.weight"] = tied_head("GPT-2", hf.get("lm_head.weight"), ours["wte.weight"], "transformer.wte.weight")
    elif "lm_head.weight" in hf:
        ours["lm_head.weight"] = hf["lm_head.weight"]
    else:
        # Falling back to the embedding would silently give a different model than the checkpoint's.
        raise ValueError(
            "GPT-2 checkpoint lacks 'lm_head.weight', but its config sets tie_word_embeddings=false; "
            "add the head's weights, or set tie_word_embeddings: true in config.json if the head is the token embedding"
        )
    used.add("lm_head.weight")
    unexpected = sorted(set(hf) - used)
    if unexpected:
        raise ValueError(f"GPT-2 checkpoint has tensors this model does not know: {unexpected[:5]}")
    return ours


def to_hf_state_dict(ours: dict[str, torch.Tensor], config: GPT2Config) -> dict[str, torch.Tensor]:
    hf = {}
    for our_name, hf_name, conv1d_shape in _pairs(config):
        tensor = ours[our_name]
        hf[hf_name] = tensor.t().contiguous() if conv1d_shape is not None else tensor
    if not config.tie_word_embeddings:
        hf["lm_head.weight"] = ours["lm_head.weight"]
    return hf
