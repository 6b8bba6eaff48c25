"""The model API on bad input: a clear error naming the argument, never a silently wrong result;
and save_pretrained over an earlier save in the same directory."""

import numpy as np
import pytest
import torch

from src.models import AutoModelForCausalLM, shift_labels

CONFIGS = {"gpt2": "configs/model/gpt2_tiny.yaml", "qwen2": "configs/model/qwen2_tiny.yaml"}


def tiny(family, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[family]).eval()


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_forward_names_the_argument_of_a_wrong_shape(family):
    model = tiny(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    cases = [
        (dict(labels=ids.t().contiguous().view(8, 2)), r"labels must have shape \(2, 8\).*got \(8, 2\).*shift_labels"),
        (dict(labels=ids.reshape(-1)), r"labels must have shape \(2, 8\)"),
        (dict(attention_mask=torch.ones(2, 7, dtype=torch.long)), r"attention_mask must have shape \(2, 8\)"),
        (dict(position_ids=torch.arange(7)[None]), r"position_ids must have shape \(2, 8\)"),
        (dict(document_ids=torch.zeros(3, 8, dtype=torch.long)), r"document_ids must have shape \(2, 8\)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(ids, **kwargs)
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids of shape \(batch, seq_len\)"):
        model(ids[0])
    with pytest.raises(ValueError, match="input_ids must be integer token ids"):
        model(ids.float())
    model(ids, position_ids=torch.arange(8)[None])  # one row of positions shared by the batch


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_ids_and_labels_outside_the_vocabulary_are_named(family):
    """On the CPU; a label past the vocabulary gave a plausible loss through the Triton loss kernels."""
    model = tiny(family)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 8))
    for bad in (vocab, -1):
        with pytest.raises(ValueError, match=rf"input_ids must be in \[0, vocab_size={vocab}\)"):
            model(ids.clone().index_fill_(1, torch.tensor([3]), bad))
        labels = shift_labels(ids)
        labels[0, 2] = bad
        with pytest.raises(ValueError, match=rf"labels must be in \[0, vocab_size={vocab}\) or -100"):
            model(ids, labels=labels)
    labels = torch.full_like(ids, -100)
    assert model(ids, labels=labels).loss.item() == 0.0  # all ignored: no error, no NaN


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_generate_refuses_what_it_cannot_honour(family):
    model = tiny(family)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    right_padded = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left-padded prompts.*padding_side = 'left'"):
        model.generate(ids, 3, attention_mask=right_padded)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(ids[:, :0], 2)
    for bad in (-3, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
            model.generate(ids, bad)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            model.generate(ids, 2, do_sample=True, top_p=bad)
    assert torch.equal(model.generate(ids, 0), ids)
    assert model.generate(ids, np.int64(2)).shape == (2, 8) and model.generate(ids, torch.tensor(2)).shape == (2, 8)
    # integer-like EOS ids: numpy and 0-d tensors, as a tokenizer may give them
    eos = int(model.generate(ids, 1)[0, -1])
    for given in (np.int64(eos), torch.tensor(eos), torch.tensor([eos]), {eos}, (eos,)):
        out = model.generate(ids, 4, eos_token_id=given, pad_token_id=0)
        assert out[0, 6] == eos and bool((out[0, 7:] == 0).all())


def test_a_sharded_save_over_a_single_file_save_loads_the_new_weights(tmp_path):
    """An earlier model.safetensors left beside new shards was what loaded (ours and transformers'
    loaders prefer the single file); other files in the directory stay."""
    first, second = tiny("qwen2", seed=0), tiny("qwen2", seed=1)
    first.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    second.save_pretrained(tmp_path, max_shard_bytes=50_000)
    assert not (tmp_path / "model.safetensors").exists() and (tmp_path / "tokenizer.json").exists()
    ids = torch.randint(0, second.config.vocab_size, (1, 8))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(ids).logits, second(ids).logits)
    first.save_pretrained(tmp_path)  # and back: no shards of the sharded save left
    assert not list(tmp_path.glob("model-*-of-*.safetensors")) and not (tmp_path / "model.safetensors.index.json").exists()
    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path).eval()(ids).logits, first(ids).logits)


def test_a_damaged_config_or_index_names_the_file(tmp_path):
    model = tiny("gpt2")
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}\n}')  # extra data: a damaged file
    with pytest.raises(ValueError, match=r"config.json' is not valid JSON"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path, max_shard_bytes=20_000)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}')
    with pytest.raises(ValueError, match=r"model.safetensors.index.json' is not valid JSON"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2, "n_head": 2, "vocab_size": 320}')
    with pytest.raises(ValueError, match=r"n_embd.*config.json"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
