"""Our GPT-2 against transformers' GPT2LMHeadModel from the same weights (fp32, CPU)."""

import pytest
import torch
import transformers

from src.models import AutoModelForCausalLM, GPT2LMHeadModel, KernelConfig, shift_labels

from .hf_helpers import tiny_hf_gpt2

ATOL = 1e-4


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("tied", [True, False])
def test_logits_and_loss_match(tmp_path, attention, tied):
    hf, path = tiny_hf_gpt2(tmp_path, tie_word_embeddings=tied)
    ours = AutoModelForCausalLM.from_pretrained(path, kernels=KernelConfig(attention=attention)).eval()
    assert isinstance(ours, GPT2LMHeadModel)
    assert (ours.lm_head.weight is ours.wte.weight) == tied
    input_ids = torch.randint(0, 97, (3, 40))
    with torch.no_grad():
        theirs = hf(input_ids, labels=input_ids)
        mine = ours(input_ids, labels=shift_labels(input_ids))
    torch.testing.assert_close(mine.logits, theirs.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(mine.loss, theirs.loss, atol=ATOL, rtol=0)


def test_gelu_variant_and_inner_width(tmp_path):
    hf, path = tiny_hf_gpt2(tmp_path, activation_function="gelu", n_inner=80)
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    assert ours.config.ffn_dim == 80
    input_ids = torch.randint(0, 97, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, hf(input_ids).logits, atol=ATOL, rtol=0)


def test_save_pretrained_loads_in_transformers(tmp_path):
    _, path = tiny_hf_gpt2(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():  # change the weights so a stale copy cannot pass
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = tmp_path / "exported"
    ours.save_pretrained(out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    input_ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, ours(input_ids).logits, atol=ATOL, rtol=0)


def test_sharded_checkpoint_round_trip(tmp_path):
    _, path = tiny_hf_gpt2(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    out = tmp_path / "sharded"
    ours.save_pretrained(out, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    input_ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, ours(input_ids).logits, atol=0, rtol=0)
        torch.testing.assert_close(reloaded(input_ids).logits, ours(input_ids).logits, atol=ATOL, rtol=0)


def test_hub_layout_without_prefix_and_with_mask_buffers(tmp_path):
    """The hub's GPT-2 file (openai-community/gpt2): GPT2Model keys (`h.0.attn.c_attn.weight`,
    `wte.weight`, ... without `transformer.`), no lm_head, and the old causal-mask buffers."""
    from safetensors.torch import save_file

    hf, _ = tiny_hf_gpt2(tmp_path)
    n_pos = hf.config.n_positions
    tensors = {
        k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"
    }
    assert "h.0.attn.c_attn.weight" in tensors and "wte.weight" in tensors
    for i in range(hf.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.uint8)).view(1, 1, n_pos, n_pos)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    hub = tmp_path / "hub_layout"
    hub.mkdir()
    save_file(tensors, str(hub / "model.safetensors"), metadata={"format": "pt"})
    hf.config.save_pretrained(hub)
    ours = AutoModelForCausalLM.from_pretrained(hub).eval()
    input_ids = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, hf(input_ids).logits, atol=ATOL, rtol=0)


def test_three_dropout_rates_load_apply_and_export(tmp_path):
    """embd_pdrop, attn_pdrop and resid_pdrop stay separate: each where transformers applies it."""
    _, path = tiny_hf_gpt2(tmp_path, embd_pdrop=0.1, attn_pdrop=0.2, resid_pdrop=0.3)
    ours = AutoModelForCausalLM.from_pretrained(path)
    assert (ours.config.embd_pdrop, ours.config.attn_pdrop, ours.config.resid_pdrop) == (0.1, 0.2, 0.3)
    assert ours.drop.p == 0.1  # after the token + position embeddings
    block = ours.layers[0]
    assert block.attn.dropout == 0.2  # on the attention probabilities
    assert block.attn.resid_dropout.p == 0.3 and block.mlp.dropout.p == 0.3  # before each residual add
    out = tmp_path / "exported"
    ours.save_pretrained(out)
    exported = transformers.AutoConfig.from_pretrained(out)
    assert (exported.embd_pdrop, exported.attn_pdrop, exported.resid_pdrop) == (0.1, 0.2, 0.3)
    again = AutoModelForCausalLM.from_pretrained(out)
    assert (again.config.embd_pdrop, again.config.attn_pdrop, again.config.resid_pdrop) == (0.1, 0.2, 0.3)
