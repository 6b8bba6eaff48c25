"""generate(): greedy parity with transformers, KV-cache decoding, batches of prompts, sampling, EOS."""

import pytest
import torch

from src.models import AutoModelForCausalLM, KernelConfig

from .hf_helpers import tiny_hf_gpt2, tiny_hf_qwen2

FAMILIES = {"gpt2": tiny_hf_gpt2, "qwen2": tiny_hf_qwen2}


def _load(tmp_path, family, **overrides):
    hf, path = FAMILIES[family](tmp_path, **overrides)
    return hf, AutoModelForCausalLM.from_pretrained(path, kernels=KernelConfig(attention="sdpa")).eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_matches_transformers(tmp_path, family):
    hf, ours = _load(tmp_path, family)
    vocab = ours.config.vocab_size
    prompt = torch.randint(0, vocab, (2, 7))
    theirs = hf.generate(
        prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(prompt)
    )
    mine = ours.generate(prompt, max_new_tokens=32)
    assert mine.shape == (2, 7 + 32)
    assert torch.equal(mine, theirs)


def test_greedy_matches_transformers_sliding_window(tmp_path):
    hf, ours = _load(tmp_path, "qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=1)
    prompt = torch.randint(0, 101, (1, 5))
    theirs = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(prompt, max_new_tokens=32), theirs)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_decoding_equals_full_forward(tmp_path, family):
    _, ours = _load(tmp_path, family)
    tokens = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = ours(tokens).logits
        cache = ours.new_kv_cache(batch_size=2, max_len=20)
        steps = [ours(tokens[:, :12], kv_cache=cache).logits]  # prefill 12, then one token at a time
        for t in range(12, 20):
            steps.append(ours(tokens[:, t : t + 1], kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kv_cache_under_autocast_holds_the_autocast_dtype(tmp_path, family):
    """fp32 weights under bf16 autocast compute bf16 keys and values: the cache holds them as such
    (half the memory of an fp32 cache), and cached decoding still equals the full forward."""
    _, ours = _load(tmp_path, family)
    tokens = torch.randint(0, ours.config.vocab_size, (2, 12))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = ours.new_kv_cache(batch_size=2, max_len=12)
        assert cache.keys[0].dtype == torch.bfloat16 and cache.values[-1].dtype == torch.bfloat16
        full = ours(tokens).logits.float()
        steps = [ours(tokens[:, :8], kv_cache=cache).logits.float()]
        for t in range(8, 12):
            steps.append(ours(tokens[:, t : t + 1], kv_cache=cache).logits.float())
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=0.05, rtol=0.05)
    assert ours.new_kv_cache(batch_size=1, max_len=4).keys[0].dtype == torch.float32  # no autocast: the weights'


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_left_padded_batch_equals_single_prompts(tmp_path, family):
    _, ours = _load(tmp_path, family)
    vocab = ours.config.vocab_size
    short, long = torch.randint(1, vocab, (1, 4)), torch.randint(1, vocab, (1, 9))
    batch = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    batch[0, 5:], mask[0, 5:] = short, 1  # left padding
    batch[1], mask[1] = long, 1
    out = ours.generate(batch, max_new_tokens=10, attention_mask=mask)
    assert torch.equal(out[0, 9:], ours.generate(short, max_new_tokens=10)[0, 4:])
    assert torch.equal(out[1, 9:], ours.generate(long, max_new_tokens=10)[0, 9:])


def test_eos_stops_and_pads(tmp_path):
    _, ours = _load(tmp_path, "qwen2")
    prompt = torch.randint(0, 101, (2, 5))
    free = ours.generate(prompt, max_new_tokens=12)
    eos = int(free[0, 5 + 3])  # the 4th token row 0 generates becomes "EOS"
    out = ours.generate(prompt, max_new_tokens=12, eos_token_id=eos, pad_token_id=100)
    row0 = out[0, 5:].tolist()
    first = row0.index(eos)
    assert first <= 3
    assert all(t == 100 for t in row0[first + 1 :])
    if eos not in free[1, 5:].tolist():
        # Row 1 never produces EOS, so generation ran to the end for it, unchanged.
        assert torch.equal(out[1], free[1, : out.shape[1]])


def test_sampling_top_k_one_is_greedy_and_seeded_sampling_is_reproducible(tmp_path):
    _, ours = _load(tmp_path, "gpt2")
    prompt = torch.randint(0, 97, (3, 4))
    greedy = ours.generate(prompt, max_new_tokens=8)
    assert torch.equal(ours.generate(prompt, max_new_tokens=8, do_sample=True, top_k=1), greedy)
    assert torch.equal(ours.generate(prompt, max_new_tokens=8, do_sample=True, top_p=1e-9), greedy)
    a = ours.generate(prompt, 8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    b = ours.generate(prompt, 8, do_sample=True, temperature=1.5, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert ((a[:, 4:] >= 0) & (a[:, 4:] < 97)).all()


def test_bad_generation_arguments(tmp_path):
    _, ours = _load(tmp_path, "gpt2")
    prompt = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(prompt, 4, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="block_size"):
        ours.generate(prompt, 100)  # 4 + 100 > 64 learned positions
    with pytest.raises(ValueError, match="batch, seq_len"):
        ours.generate(prompt[0], 4)
