"""Packed documents end to end: a tiny Qwen2 (GQA, one sliding-window layer) and a tiny GPT-2 run on
a packed batch with document_ids give every document the hidden states it gets when run alone."""

import pytest
import torch

from src.models.components import KernelConfig
from src.models.gpt2.config import GPT2Config
from src.models.gpt2.model import GPT2LMHeadModel
from src.models.qwen2.config import Qwen2Config
from src.models.qwen2.model import Qwen2ForCausalLM

DOC_LENGTHS = [(5, 11, 8), (24,), (1, 23)]  # three rows of 24 tokens, a one-token document included


def tiny(family: str, attention: str, n_embd: int = 32):
    """n_embd 32 gives head_dim 8 (CPU tests); GPU tests use 256 (head_dim 64): FlexAttention's GPU
    kernels need head_dim >= 32."""
    kernels = KernelConfig(attention=attention)
    if family == "qwen2":
        config = Qwen2Config(
            n_layer=2,
            n_head=4,
            num_kv_heads=2,
            n_embd=n_embd,
            vocab_size=101,
            block_size=64,
            intermediate_size=64,
            use_sliding_window=True,
            sliding_window=6,
            max_window_layers=1,  # layer 1 uses a 6-token window, layer 0 full attention
        )
        return Qwen2ForCausalLM(config, kernels).eval()
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=n_embd, vocab_size=101, block_size=64), kernels).eval()


def packed_batch():
    ids = torch.randint(0, 101, (len(DOC_LENGTHS), 24))
    document_ids = torch.cat([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r))[None] for r in DOC_LENGTHS])
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in r])[None] for r in DOC_LENGTHS])
    return ids, document_ids, position_ids


@pytest.mark.parametrize("attention", ["auto", "sdpa", "eager", "flex"])
@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_packed_forward_equals_each_document_alone(family, attention):
    model = tiny(family, attention)
    # Documents alone run through SDPA (itself checked against eager), so that compiled
    # FlexAttention compiles for the packed shape only.
    reference = tiny(family, "sdpa")
    reference.load_state_dict(model.state_dict())
    ids, document_ids, position_ids = packed_batch()
    with torch.no_grad():
        packed = model.hidden_states(ids, position_ids=position_ids, document_ids=document_ids)
        for row, lengths in enumerate(DOC_LENGTHS):
            start = 0
            for n in lengths:
                alone = reference.hidden_states(ids[row : row + 1, start : start + n])
                torch.testing.assert_close(packed[row : row + 1, start : start + n], alone, atol=1e-5, rtol=1e-5)
                start += n


def test_without_document_ids_documents_do_see_each_other():
    """The check above can fail: without document_ids the second document attends to the first."""
    model = tiny("qwen2", "sdpa")
    ids, _, position_ids = packed_batch()
    with torch.no_grad():
        packed = model.hidden_states(ids, position_ids=position_ids)
        alone = model.hidden_states(ids[:1, 5:16])
    assert not torch.allclose(packed[:1, 5:16], alone, atol=1e-3)


def test_packed_training_step_backpropagates(family="qwen2"):
    model = tiny(family, "auto").train()
    ids, document_ids, position_ids = packed_batch()
    hidden = model.hidden_states(ids, position_ids=position_ids, document_ids=document_ids)
    hidden.pow(2).mean().backward()
    grad = model.layers[0].self_attn.qkv.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["auto", "sdpa", "flex"])
def test_gpu_packed_forward_equals_each_document_alone(attention):
    model = tiny("qwen2", attention, n_embd=256).cuda()
    ids, document_ids, position_ids = (t.cuda() for t in packed_batch())
    with torch.no_grad():
        packed = model.hidden_states(ids, position_ids=position_ids, document_ids=document_ids)
        start = 0
        for n in DOC_LENGTHS[0]:
            alone = model.hidden_states(ids[:1, start : start + n])
            torch.testing.assert_close(packed[:1, start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["auto", "sdpa", "flex"])
def test_gpu_compiled_blocks_match_eager_blocks(attention):
    """Per-block torch.compile (as training runs) with packed documents: the masks built before the
    layers are read inside the compiled blocks, and the result matches the uncompiled model."""
    torch._dynamo.reset()
    model = tiny("qwen2", attention, n_embd=256).cuda()
    compiled = tiny("qwen2", attention, n_embd=256).cuda()
    compiled.load_state_dict(model.state_dict())
    for block in compiled.layers:
        block.compile(fullgraph=True)
    ids, document_ids, position_ids = (t.cuda() for t in packed_batch())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = model.hidden_states(ids, position_ids=position_ids, document_ids=document_ids)
        got = compiled.hidden_states(ids, position_ids=position_ids, document_ids=document_ids)
        got.float().pow(2).mean().backward()
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
    assert compiled.layers[0].self_attn.qkv.weight.grad is not None
    torch._dynamo.reset()
