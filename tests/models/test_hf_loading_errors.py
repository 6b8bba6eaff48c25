"""Hugging Face checkpoints that do not fit their config.json: each must fail loading with an error
that names the problem and the fix, never load as a model other than the one transformers loads.

The checkpoints are the shipped tiny models (configs/model/*_tiny.yaml) saved with
`save_pretrained`, then edited on disk the way a broken exporter or a hand-written config.json would.
"""

import dataclasses
import json
import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from src.models import AutoModelForCausalLM, KernelConfig, Qwen2Config, load_model_config

TINY = {"gpt2": "configs/model/gpt2_tiny.yaml", "qwen2": "configs/model/qwen2_tiny.yaml"}
# The name of the token embedding in each family's Hugging Face checkpoint.
EMBEDDING = {"gpt2": "transformer.wte.weight", "qwen2": "model.embed_tokens.weight"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved checkpoint per family (tied head, as the tiny YAMLs / GPT-2 default); tests edit copies."""
    root = tmp_path_factory.mktemp("tiny_hf")
    paths = {}
    for family, yaml_path in TINY.items():
        config = dataclasses.replace(load_model_config(yaml_path), tie_word_embeddings=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, kernels=KernelConfig.reference())
        paths[family] = str(root / family)
        model.save_pretrained(paths[family])
    return paths


def copy_of(saved, family, tmp_path) -> str:
    path = str(tmp_path / family)
    shutil.copytree(saved[family], path)
    return path


def edit_weights(path, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    state_dict = load_file(file)
    edit(state_dict)
    save_file(state_dict, file, metadata={"format": "pt"})


def edit_config(path, edit) -> None:
    file = os.path.join(path, "config.json")
    with open(file, encoding="utf-8") as f:
        config = json.load(f)
    edit(config)
    with open(file, "w", encoding="utf-8") as f:
        json.dump(config, f)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, kernels=KernelConfig.reference())


# -- a tied config with a stored head --------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_tied_config_with_a_different_stored_head_is_an_error(saved, tmp_path, family):
    # transformers keeps such a head untied (other logits than a tied model's): dropping it is wrong.
    path = copy_of(saved, family, tmp_path)
    edit_weights(path, lambda sd: sd.update({"lm_head.weight": torch.randn_like(sd[EMBEDDING[family]])}))
    with pytest.raises(ValueError, match=r"lm_head\.weight.*differs.*tie_word_embeddings: false in config\.json") as err:
        load(path)
    assert "remove lm_head.weight" in str(err.value)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_tied_config_with_an_equal_stored_head_loads_tied(saved, tmp_path, family):
    # Some exporters write the tied head as well: an equal copy is dropped silently.
    path = copy_of(saved, family, tmp_path)
    edit_weights(path, lambda sd: sd.update({"lm_head.weight": sd[EMBEDDING[family]].clone()}))
    model = load(path)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.get_submodule(EMBEDDING[family].split(".")[-2]).weight


# -- Qwen2: the tensors fused into qkv and gate_up -------------------------------------------------


def move_rows(first: str, second: str, rows: int):
    """An edit that moves `rows` rows from the end of `first` to the start of `second`: the
    concatenation (what the fused projection holds) is unchanged, the split is not."""

    def edit(sd):
        both = torch.cat([sd[first], sd[second]], dim=0)
        cut = sd[first].shape[0] - rows
        sd[first], sd[second] = both[:cut].clone(), both[cut:].clone()

    return edit


ATTN = "model.layers.0.self_attn."
MLP = "model.layers.0.mlp."


@pytest.mark.parametrize(
    "edit,name,shapes",
    [
        (move_rows(ATTN + "k_proj.weight", ATTN + "v_proj.weight", 16), ATTN + "k_proj.weight", "(16, 64) vs model (32, 64)"),
        (move_rows(ATTN + "k_proj.bias", ATTN + "v_proj.bias", 8), ATTN + "k_proj.bias", "(24,) vs model (32,)"),
        (move_rows(ATTN + "q_proj.weight", ATTN + "k_proj.weight", 16), ATTN + "q_proj.weight", "(48, 64) vs model (64, 64)"),
        (move_rows(MLP + "gate_proj.weight", MLP + "up_proj.weight", 56), MLP + "gate_proj.weight", "(200, 64) vs model (256, 64)"),
        # A wrong in-features size used to fail inside torch.cat, naming no tensor.
        (lambda sd: sd.update({ATTN + "k_proj.weight": torch.randn(32, 48)}), ATTN + "k_proj.weight", "(32, 48) vs model (32, 64)"),
        (lambda sd: sd.update({MLP + "up_proj.weight": torch.randn(256, 48)}), MLP + "up_proj.weight", "(256, 48) vs model (256, 64)"),
    ],
    ids=["k_v_split", "k_v_bias_split", "q_k_split", "gate_up_split", "k_in_features", "up_in_features"],
)
def test_qwen2_fused_tensor_with_wrong_shape_is_an_error(saved, tmp_path, edit, name, shapes):
    path = copy_of(saved, "qwen2", tmp_path)
    edit_weights(path, edit)
    with pytest.raises(ValueError, match="config.json") as err:
        load(path)
    assert f"{name}: checkpoint {shapes}" in str(err.value)


# -- GPT-2: Conv1D weights are checked in the file's layout ----------------------------------------


@pytest.mark.parametrize("name", ["transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"])
def test_gpt2_conv1d_weight_in_linear_layout_is_an_error(saved, tmp_path, name):
    # Checked after the transpose, the error named our tensor and a shape the file does not hold.
    path = copy_of(saved, "gpt2", tmp_path)
    edit_weights(path, lambda sd: sd.update({name: sd[name].t().contiguous()}))
    stored = tuple(load_file(os.path.join(path, "model.safetensors"))[name].shape)
    with pytest.raises(ValueError, match=r"Conv1D .*\(in, out\)") as err:
        load(path)
    assert f"{name}: checkpoint {stored} vs model {stored[::-1]}" in str(err.value)


# -- config.json keys ------------------------------------------------------------------------------


def test_gpt2_missing_n_positions_takes_the_transformers_default(tmp_path):
    config = dataclasses.replace(load_model_config(TINY["gpt2"]), block_size=1024)  # transformers' default
    AutoModelForCausalLM.from_config(config, kernels=KernelConfig.reference()).save_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: [c.pop(key) for key in ("n_positions", "n_ctx")])
    assert load(tmp_path).config.block_size == transformers.GPT2Config.from_pretrained(tmp_path).n_positions


@pytest.mark.parametrize(
    "family,key",
    [
        ("gpt2", "n_embd"),
        ("gpt2", "n_layer"),
        ("qwen2", "intermediate_size"),
        ("qwen2", "hidden_size"),
        ("qwen2", "num_key_value_heads"),
    ],
)
def test_missing_size_key_is_an_error_naming_it(saved, tmp_path, family, key):
    # transformers' defaults for these are one model's sizes (GPT-2 small, a 7B Qwen2), not this one's.
    path = copy_of(saved, family, tmp_path)
    edit_config(path, lambda c: c.pop(key))
    with pytest.raises(ValueError, match=rf"config\.json lacks {key}\b.*add them to config\.json"):
        load(path)


def test_qwen2_sliding_window_defaults_match_transformers():
    # Without max_window_layers / sliding_window, transformers slides from layer 28 on with a 4096 window.
    hf = dict(
        num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
        intermediate_size=128, vocab_size=320, use_sliding_window=True,
    )
    theirs = transformers.Qwen2Config(**hf)
    ours = Qwen2Config.from_hf_config(hf)
    expected = [theirs.sliding_window if kind == "sliding_attention" else None for kind in theirs.layer_types]
    assert ours.layer_windows == expected
