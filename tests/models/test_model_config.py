"""Model configs and checkpoints: strict YAML loading and clear errors on bad input."""

import json

import pytest
import torch

from src.models import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    load_model_config,
    model_config_from_dict,
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


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_untied_checkpoint_without_lm_head_is_an_error(tmp_path, family):
    """tie_word_embeddings=false and no lm_head.weight: an error, not the embedding as the head."""
    from safetensors.torch import load_file, save_file

    _, path = (tiny_hf_gpt2 if family == "gpt2" else tiny_hf_qwen2)(tmp_path, tie_word_embeddings=False)
    weights = tmp_path / f"hf_{family}" / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["lm_head.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 'lm_head.weight', but its config sets tie_word_embeddings=false"):
        AutoModelForCausalLM.from_pretrained(path)


GPT2_BASE = dict(model_family="gpt2", n_layer=1, n_head=4, n_embd=32, vocab_size=50, block_size=16)
QWEN2_BASE = dict(
    model_family="qwen2", n_layer=1, n_head=4, num_kv_heads=2, n_embd=32, vocab_size=50, block_size=16,
    intermediate_size=48,
)  # fmt: skip


@pytest.mark.parametrize(
    "base,changes,pattern",
    [
        (GPT2_BASE, {"n_inner": 0}, r"n_inner must be > 0 \(or null for 4 \* n_embd\), got 0"),
        (GPT2_BASE, {"n_inner": -5}, r"n_inner must be > 0"),
        (GPT2_BASE, {"layer_norm_eps": -1.0}, r"layer_norm_eps must be > 0, got -1.0"),
        (GPT2_BASE, {"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        (GPT2_BASE, {"attn_pdrop": -0.1}, r"attn_pdrop must be in \[0, 1\)"),
        (QWEN2_BASE, {"intermediate_size": 0}, r"intermediate_size must be > 0, got 0"),
        (QWEN2_BASE, {"intermediate_size": -1}, r"intermediate_size must be > 0"),
        (QWEN2_BASE, {"intermediate_size": None, "ffn_multiplier": -1.0}, r"ffn_multiplier must be > 0"),
        (QWEN2_BASE, {"intermediate_size": None, "ffn_multiplier": 0.0}, r"ffn_multiplier must be > 0"),
        (QWEN2_BASE, {"head_dim": 0}, r"head_dim must be > 0"),
        (QWEN2_BASE, {"head_dim": -4}, r"head_dim must be > 0"),
        (QWEN2_BASE, {"rope_base": 0.0}, r"rope_base must be > 0"),
        (QWEN2_BASE, {"rms_norm_eps": -1.0}, r"rms_norm_eps must be > 0"),
        (QWEN2_BASE, {"attention_dropout": 1.5}, r"attention_dropout must be in \[0, 1\)"),
        (
            QWEN2_BASE,
            {"use_sliding_window": True, "sliding_window": -3},
            r"sliding_window must be > 0 when use_sliding_window",
        ),
        (QWEN2_BASE, {"max_window_layers": -1}, r"max_window_layers must be >= 0"),
        (
            QWEN2_BASE,
            {"rope_scaling": {"rope_type": "linear", "factor": 0.0}},
            r"rope_scaling.factor must be a number > 0",
        ),
        (QWEN2_BASE, {"rope_scaling": {"rope_type": "dynamic"}}, r"rope_scaling of type 'dynamic' needs a 'factor'"),
        (
            QWEN2_BASE,
            {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 0}},
            r"rope_scaling.original_max_position_embeddings must be > 0",
        ),
    ],
)
def test_out_of_range_values_are_errors(base, changes, pattern):
    """Caught at load, naming the key and the range, not as a shape error or NaNs in the model."""
    with pytest.raises(ConfigError, match=r"model config: " + pattern):
        model_config_from_dict({**base, **changes})


def test_gpt2_dropout_shorthand_and_separate_rates():
    config = model_config_from_dict({**GPT2_BASE, "dropout": 0.1})
    assert (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) == (0.1, 0.1, 0.1)
    config = model_config_from_dict({**GPT2_BASE, "dropout": 0.1, "attn_pdrop": 0.0})  # a rate of its own wins
    assert (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) == (0.1, 0.0, 0.1)
    config = model_config_from_dict(GPT2_BASE)
    assert (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop) == (0.0, 0.0, 0.0)
    hf = config.to_hf_config() | {"embd_pdrop": 0.0, "attn_pdrop": 0.0, "resid_pdrop": 0.1}
    assert GPT2Config.from_hf_config(hf).to_hf_config() == hf  # not merged into their maximum


def test_learned_positions_beyond_block_size_are_a_clear_error():
    """Explicit position_ids past the learned table: the block_size error, not embedding's IndexError."""
    model = AutoModelForCausalLM.from_config({**GPT2_BASE, "block_size": 16}).eval()
    input_ids = torch.randint(0, 50, (1, 4))
    with torch.no_grad():
        model(input_ids, position_ids=torch.arange(12, 16)[None])  # the last row of the table: fine
        with pytest.raises(ValueError, match=r"17 positions exceeds block_size=16"):
            model(input_ids, position_ids=torch.arange(13, 17)[None])


def test_end_token_ids_inside_the_vocabulary():
    """GPT-2's default <|endoftext|> (50256) is unset for a smaller vocabulary (the trainer then
    takes its tokenizer's); an explicit id outside the vocabulary is an error."""
    from src.models import GPT2Config, Qwen2Config

    assert GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=320, block_size=16).eos_token_id is None
    assert GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50304, block_size=16).eos_token_id == 50256
    with pytest.raises(ValueError, match="eos_token_id 400 is outside the vocabulary"):
        GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=320, block_size=16, eos_token_id=400)
    with pytest.raises(ValueError, match="bos_token_id 320 is outside the vocabulary"):
        Qwen2Config(n_layer=1, n_head=2, num_kv_heads=1, n_embd=8, intermediate_size=16, vocab_size=320, block_size=16,
                    bos_token_id=320)
