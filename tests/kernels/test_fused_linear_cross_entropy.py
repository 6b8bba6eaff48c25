"""Fused linear + cross-entropy against `fused_linear_cross_entropy_ref`: chunking, ignore_index,
label smoothing, z-loss, tied embeddings, the no-grad path."""

import pytest
import torch

from kernels.fused_linear_cross_entropy import chunk_tokens, fused_linear_cross_entropy
from src.models.components.loss import fused_linear_cross_entropy_ref

from .helpers import DEVICE, DTYPES, assert_close, leaf, needs_triton

pytestmark = needs_triton


def _inputs(n, hidden, vocab, dtype, device=DEVICE):
    h = torch.randn(n, hidden, device=device, dtype=dtype)
    weight = torch.randn(vocab, hidden, device=device, dtype=dtype) * hidden**-0.5 * 2
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[::4] = -100
    return h, weight, labels


def _run(fn, h, weight, labels, scale=0.29, **kwargs):
    h, weight = leaf(h), leaf(weight)
    loss = fn(h, weight, labels, **kwargs)
    (loss * scale).backward()
    return loss, h.grad, weight.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hidden,vocab,chunk", [(1, 16, 300, None), (37, 24, 301, 8), (20, 123, 1000, None)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_linear_cross_entropy_matches_reference(n, hidden, vocab, chunk, label_smoothing, dtype):
    h, weight, labels = _inputs(n, hidden, vocab, dtype)
    kw = dict(ignore_index=-100, label_smoothing=label_smoothing)
    got = _run(fused_linear_cross_entropy, h, weight, labels, chunk_size=chunk, **kw)
    want = _run(fused_linear_cross_entropy_ref, h, weight, labels, **kw)
    for name, g, w in zip(("loss", "dhidden", "dweight"), got, want):
        assert g.dtype == w.dtype, name
        assert_close(g, w, dtype, name)


def test_fused_linear_cross_entropy_z_loss_and_chunks_agree():
    h, weight, labels = _inputs(33, 16, 200, torch.float32)
    kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3)
    want = _run(fused_linear_cross_entropy_ref, h, weight, labels, **kw)
    for chunk in (1, 7, 33, 64):
        for name, g, w in zip(("loss", "dhidden", "dweight"), _run(fused_linear_cross_entropy, h, weight, labels, chunk_size=chunk, **kw), want):
            assert_close(g, w, torch.float32, f"{name} chunk={chunk}")


def test_fused_linear_cross_entropy_tied_embeddings():
    """The LM head weight is the embedding table: both gradient paths add into one .grad."""
    vocab, hidden = 97, 16
    ids = torch.randint(0, vocab, (2, 9), device=DEVICE)
    labels = torch.randint(0, vocab, (18,), device=DEVICE)
    labels[3] = -100

    def run(fn):
        torch.manual_seed(1)
        embedding = torch.nn.Embedding(vocab, hidden).to(DEVICE)
        h = torch.tanh(embedding(ids)).reshape(-1, hidden)  # (B*T, H)
        fn(h, embedding.weight, labels, -100, 0.0).backward()
        return embedding.weight.grad

    assert_close(run(fused_linear_cross_entropy), run(fused_linear_cross_entropy_ref), torch.float32, "tied dweight")


def test_fused_linear_cross_entropy_without_grad_and_frozen_weight():
    h, weight, labels = _inputs(12, 8, 50, torch.float32)
    with torch.no_grad():
        assert_close(fused_linear_cross_entropy(h, weight, labels), fused_linear_cross_entropy_ref(h, weight, labels), torch.float32)
    hs, hr = leaf(h), leaf(h)
    fused_linear_cross_entropy(hs, weight, labels).backward()  # weight does not require grad
    fused_linear_cross_entropy_ref(hr, weight, labels).backward()
    assert weight.grad is None
    assert_close(hs.grad, hr.grad, torch.float32)


def test_fused_linear_cross_entropy_bad_input():
    h, weight, labels = _inputs(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="expected hidden"):
        fused_linear_cross_entropy(h, weight[:, :7], labels)
    with pytest.raises(ValueError, match="cast them to one dtype"):
        fused_linear_cross_entropy(h, weight.double(), labels)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(h, weight, labels, chunk_size=0)


def test_chunk_tokens_heuristic():
    assert chunk_tokens(8192, 151936, 2) == 1024
    assert chunk_tokens(8192, 50304, 2) == 2048
    assert chunk_tokens(10, 151936, 2) == 10
    assert chunk_tokens(10**6, 10**9, 4) == 16


@pytest.mark.gpu
def test_fused_linear_cross_entropy_real_sizes_gpu():
    h, weight, labels = _inputs(8192, 896, 151936, torch.bfloat16, device="cuda")
    kw = dict(ignore_index=-100, label_smoothing=0.0)
    got, want = _run(fused_linear_cross_entropy, h, weight, labels, **kw), _run(fused_linear_cross_entropy_ref, h, weight, labels, **kw)
    for name, g, w in zip(("loss", "dhidden", "dweight"), got, want):
        assert_close(g, w, torch.bfloat16, name)
