"""Model configs and checkpoints: strict YAML loading and clear errors on bad input."""

import json

import pytest
import torch

from src.models import (
    AutoModelForCausalLM,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    load_model_config,
)
from src.utils.config import ConfigError

from .hf_helpers import tiny_hf_gpt2, tiny_hf_qwen2


@pytest.mark.parametrize("name", ["gpt_125m", "gpt_1b", "qwen2_0.5b", "gpt2_tiny", "qwen2_tiny"])
def test_shipped_model_configs_load(name):
    cfg = load_model_config(f"configs/model/{name}.yaml")
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
        assert getattr(cfg, key) > 0


def test_qwen2_0_5b_has_the_real_shape():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config("configs/model/qwen2_0.5b.yaml")
    assert isinstance(model, Qwen2ForCausalLM)
    assert model.num_parameters() == 494_032_768  # Qwen2-0.5B's published count


def test_gpt_125m_size():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config("configs/model/gpt_125m.yaml")
    assert isinstance(model, GPT2LMHeadModel)
    assert 123e6 < model.num_parameters() < 125e6


def test_unknown_key_is_an_error_with_suggestion(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model_family: qwen2\nn_layer: 2\nn_head: 4\nnum_kv_head: 2\nn_embd: 64\nvocab_size: 10\nblock_size: 8\n")
    with pytest.raises(ConfigError, match=r"m.yaml: unknown key 'num_kv_head'.*Did you mean 'num_kv_heads'"):
        load_model_config(path)


def test_wrong_type_is_an_error(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model_family: gpt2\nn_layer: two\nn_head: 4\nn_embd: 64\nvocab_size: 10\nblock_size: 8\n")
    with pytest.raises(ConfigError, match=r"key 'n_layer': expected an integer, got 'two'"):
        load_model_config(path)


def test_unknown_family_and_missing_family(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("model_family: llama\nn_layer: 2\n")
    with pytest.raises(ConfigError, match=r"model_family 'llama' is unknown; choose one of \['gpt2', 'qwen2'\]"):
        load_model_config(path)
    path.write_text("n_layer: 2\n")
    with pytest.raises(ConfigError, match="missing 'model_family'"):
        load_model_config(path)


def test_missing_model_yaml_lists_what_exists():
    with pytest.raises(FileNotFoundError, match=r"model config not found: 'configs/model/gpt_126m.yaml'.*gpt_125m.yaml"):
        load_model_config("configs/model/gpt_126m.yaml")


@pytest.mark.parametrize(
    "changes,pattern",
    [
        ({"n_head": 3}, "multiple of num_kv_heads"),
        ({"n_embd": 66}, "divisible by n_head"),
        ({"intermediate_size": None, "ffn_multiplier": None}, "intermediate_size .* or ffn_multiplier"),
        ({"ffn_multiplier": 2.0}, "disagree"),
        ({"use_sliding_window": True}, "sliding_window is not set"),
        ({"rope_scaling": {"rope_type": "ntk"}}, "not supported"),
        ({"rope_scaling": {"rope_type": "linear", "factr": 2.0}}, "unknown key"),
    ],
)
def test_qwen2_cross_field_checks(changes, pattern):
    base = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=10, block_size=8, num_kv_heads=2, intermediate_size=128)
    base.update(changes)
    with pytest.raises(ValueError, match=pattern):
        Qwen2Config(**base)


def test_checkpoint_of_another_family(tmp_path):
    _, gpt2_path = tiny_hf_gpt2(tmp_path)
    with pytest.raises(ValueError, match=r"holds a 'gpt2' checkpoint, but Qwen2ForCausalLM loads 'qwen2'"):
        Qwen2ForCausalLM.from_pretrained(gpt2_path)
    config = json.loads((tmp_path / "hf_gpt2" / "config.json").read_text())
    config["model_type"] = "llama"
    (tmp_path / "hf_gpt2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"'llama' checkpoint; supported model types: \['gpt2', 'qwen2'\]"):
        AutoModelForCausalLM.from_pretrained(gpt2_path)


def test_checkpoint_directory_problems(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "empty")
    _, path = tiny_hf_qwen2(tmp_path)
    (tmp_path / "hf_qwen2" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        AutoModelForCausalLM.from_pretrained(path)


def test_weights_that_do_not_match_the_config(tmp_path):
    _, path = tiny_hf_qwen2(tmp_path)
    config_file = tmp_path / "hf_qwen2" / "config.json"
    config = json.loads(config_file.read_text())
    config["intermediate_size"] = 64  # the weights are 48 wide
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match the model config.*wrong shape.*mlp.gate_up.weight"):
        AutoModelForCausalLM.from_pretrained(path)
    config["intermediate_size"] = 48
    config["num_hidden_layers"] = 3  # only 2 layers stored
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"lacks 'model.layers.2"):
        AutoModelForCausalLM.from_pretrained(path)
