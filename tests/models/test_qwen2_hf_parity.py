"""Our Qwen2 against transformers' Qwen2ForCausalLM from the same weights (fp32, CPU)."""

import pytest
import torch
import transformers

from src.models import AutoModelForCausalLM, KernelConfig, Qwen2Config, Qwen2ForCausalLM, shift_labels
from src.models.components import RotaryEmbedding
from src.models.components.embeddings.rotary import normalize_rope_scaling

from .hf_helpers import tiny_hf_qwen2

ATOL = 1e-4

ROPE_VARIANTS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
}


def _compare(hf, ours, input_ids, atol=ATOL):
    with torch.no_grad():
        theirs = hf(input_ids, labels=input_ids)
        mine = ours(input_ids, labels=shift_labels(input_ids))
    torch.testing.assert_close(mine.logits, theirs.logits, atol=atol, rtol=0)
    torch.testing.assert_close(mine.loss, theirs.loss, atol=atol, rtol=0)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("kv_heads,tied", [(2, False), (4, True), (1, False)])
def test_logits_and_loss_match(tmp_path, attention, kv_heads, tied):
    hf, path = tiny_hf_qwen2(tmp_path, num_key_value_heads=kv_heads, tie_word_embeddings=tied)
    ours = AutoModelForCausalLM.from_pretrained(path, kernels=KernelConfig(attention=attention)).eval()
    assert isinstance(ours, Qwen2ForCausalLM)
    assert ours.config.num_kv_heads == kv_heads
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied
    _compare(hf, ours, torch.randint(0, 101, (2, 37)))


@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_types(tmp_path, variant):
    scaling = ROPE_VARIANTS[variant]
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, **(scaling or {})}
    # max_position 32 with 48 tokens: dynamic NTK rescales beyond the trained length.
    hf, path = tiny_hf_qwen2(tmp_path, rope_parameters=rope_parameters, max_position_embeddings=32)
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    assert (ours.config.rope_scaling or {}).get("rope_type") == (scaling or {}).get("rope_type")
    input_ids = torch.randint(0, 101, (2, 48))
    _compare(hf, ours, input_ids)
    if scaling is not None:  # the scaling must change the result, or this test proves nothing
        default_hf, _ = tiny_hf_qwen2(tmp_path / "default", max_position_embeddings=32)
        with torch.no_grad():
            assert (default_hf(input_ids).logits - hf(input_ids).logits).abs().max() > 100 * ATOL


def test_sliding_window(tmp_path):
    hf, path = tiny_hf_qwen2(
        tmp_path, num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    assert ours.config.layer_windows == [None, 8, 8]
    _compare(hf, ours, torch.randint(0, 101, (2, 30)))


def test_position_ids_match(tmp_path):
    hf, path = tiny_hf_qwen2(tmp_path)
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    input_ids = torch.randint(0, 101, (2, 12))
    position_ids = torch.arange(5, 17).expand(2, 12)
    with torch.no_grad():
        theirs = hf(input_ids, position_ids=position_ids).logits
        mine = ours(input_ids, position_ids=position_ids).logits
    torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_save_pretrained_loads_in_transformers(tmp_path, tied):
    _, path = tiny_hf_qwen2(tmp_path, tie_word_embeddings=tied, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    ours = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = tmp_path / "exported"
    ours.save_pretrained(out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert reloaded.config.tie_word_embeddings == tied
    input_ids = torch.randint(0, 101, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, ours(input_ids).logits, atol=ATOL, rtol=0)


def test_rope_frequencies_stay_fp32_in_bf16(tmp_path):
    """A bf16 model keeps fp32 RoPE buffers, as transformers keeps inv_freq: positions computed on
    the fly (position_ids) then equal the cache and transformers' bf16 model."""
    rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    _, path = tiny_hf_qwen2(tmp_path, max_position_embeddings=4096, rope_parameters=rope_parameters)
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    rotary = ours.rotary
    fresh = RotaryEmbedding(ours.config.head_dim, ours.config.rope_base, ours.config.block_size)
    buffers = ("inv_freq", "original_inv_freq", "cos_cached", "sin_cached")
    for name in buffers:
        assert getattr(rotary, name).dtype == torch.float32, name
        assert torch.equal(getattr(rotary, name), getattr(fresh, name)), name
    assert ours.lm_head.weight.dtype == torch.bfloat16
    assert not any("rotary" in k for k in ours.state_dict())  # non-persistent: checkpoints unchanged

    positions = torch.arange(3000, 3008)[None]  # (1, 8)
    cos, sin = rotary(positions)
    cached_cos, cached_sin = rotary(None, seq_len=8, offset=3000)
    torch.testing.assert_close((cos, sin), (cached_cos, cached_sin), atol=0, rtol=0)
    hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    hf_cos, hf_sin = hf_bf16.model.rotary_emb(torch.zeros(1, 8, 1, dtype=torch.bfloat16), positions)
    torch.testing.assert_close((cos.bfloat16(), sin.bfloat16()), (hf_cos, hf_sin), atol=0, rtol=0)
    input_ids = torch.randint(0, 101, (1, 8))
    with torch.no_grad():  # a bf16 inv_freq put these 0.016 apart (logits of about 1.7)
        mine = ours(input_ids, position_ids=positions).logits.float()
        theirs = hf_bf16(input_ids, position_ids=positions).logits.float()
    torch.testing.assert_close(mine, theirs, atol=4e-3, rtol=0)

    ours.to(torch.float32)  # and back: nothing was rounded on the way
    for name in buffers:
        assert torch.equal(getattr(rotary, name), getattr(fresh, name)), name
    ours.to(torch.bfloat16)
    compiled = torch.compile(rotary, backend="eager", fullgraph=True)  # fullgraph: no graph break
    torch.testing.assert_close(compiled(None, seq_len=8, offset=3000), (cached_cos, cached_sin), atol=0, rtol=0)


def test_yarn_without_factor_exports_for_transformers(tmp_path):
    """A YaRN rope_scaling without `factor` gets the one it implies (block_size / original) written
    in, so the export loads in transformers (which requires the key) and computes the same."""
    config = Qwen2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=101, block_size=64, num_kv_heads=2, intermediate_size=48,
        rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 16},
    )  # fmt: skip
    assert config.rope_scaling["factor"] == 4.0
    assert config.to_hf_config()["rope_parameters"]["factor"] == 4.0
    torch.manual_seed(0)
    ours = AutoModelForCausalLM.from_config(config).eval()
    ours.save_pretrained(tmp_path / "exported")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", attn_implementation="eager")
    input_ids = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids).logits, ours(input_ids).logits, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"type 'yarn' needs a 'factor'"):
        normalize_rope_scaling({"rope_type": "yarn", "original_max_position_embeddings": 16})  # no max_position
