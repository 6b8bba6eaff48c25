"""Per-token log-probabilities (DPO) against `token_logprobs_ref`."""

import pytest
import torch

from kernels.token_logprobs import token_logprobs
from src.models.components.loss import token_logprobs_ref

from .helpers import DEVICE, DTYPES, assert_close, leaf, needs_triton

pytestmark = needs_triton


def _run(fn, h, weight, labels, upstream, **kwargs):
    h, weight = leaf(h), leaf(weight)
    logprobs = fn(h, weight, labels, **kwargs)
    logprobs.backward(upstream)  # a different gradient per token, as DPO's loss gives
    return logprobs, h.grad, weight.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hidden,vocab,chunk", [(1, 16, 300, None), (37, 24, 301, 8), (20, 123, 1000, None)])
def test_token_logprobs_matches_reference(n, hidden, vocab, chunk, dtype):
    h = torch.randn(n, hidden, device=DEVICE, dtype=dtype)
    weight = torch.randn(vocab, hidden, device=DEVICE, dtype=dtype) * hidden**-0.5 * 2
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[1::3] = -100
    upstream = torch.randn(n, device=DEVICE)
    got = _run(token_logprobs, h, weight, labels, upstream, chunk_size=chunk)
    want = _run(token_logprobs_ref, h, weight, labels, upstream)
    assert got[0].dtype == torch.float32 and got[0].shape == (n,)
    assert (got[0][labels == -100] == 0).all()
    for name, g, w in zip(("logprobs", "dhidden", "dweight"), got, want):
        assert_close(g, w, dtype, name)


def test_token_logprobs_no_grad_matches_and_tied_weight():
    vocab, hidden = 64, 12
    embedding = torch.nn.Embedding(vocab, hidden).to(DEVICE)
    ids = torch.randint(0, vocab, (10,), device=DEVICE)
    labels = torch.randint(0, vocab, (10,), device=DEVICE)
    with torch.no_grad():
        h = embedding(ids)
        assert_close(token_logprobs(h, embedding.weight, labels), token_logprobs_ref(h, embedding.weight, labels), torch.float32)
    grads = []
    for fn in (token_logprobs, token_logprobs_ref):
        embedding.weight.grad = None
        fn(torch.sin(embedding(ids)), embedding.weight, labels).sum().backward()
        grads.append(embedding.weight.grad.clone())
    assert_close(grads[0], grads[1], torch.float32, "tied dweight")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_token_logprobs_transposed_views(dtype):
    """Hidden states and weight as transposed views (column-major storage): the gradients come back
    in the inputs' shapes, equal to the reference's (the op's GEMMs write into contiguous buffers of
    its own)."""
    n, hidden, vocab = 29, 24, 301
    h = torch.randn(n, hidden, device=DEVICE, dtype=dtype)
    weight = torch.randn(vocab, hidden, device=DEVICE, dtype=dtype) * hidden**-0.5 * 2
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[::4] = -100
    upstream = torch.randn(n, device=DEVICE)
    h_t, weight_t = h.t().contiguous().t(), weight.t().contiguous().t()
    assert not h_t.is_contiguous() and not weight_t.is_contiguous()
    got = _run(token_logprobs, h_t, weight_t, labels, upstream, chunk_size=8)
    want = _run(token_logprobs_ref, h, weight, labels, upstream)
    for name, g, w in zip(("logprobs", "dhidden", "dweight"), got, want):
        assert g.shape == w.shape, name
        assert_close(g, w, dtype, name)


@pytest.mark.gpu
def test_token_logprobs_real_sizes_gpu():
    h = torch.randn(4096, 896, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(151936, 896, device="cuda", dtype=torch.bfloat16) * 0.05
    labels = torch.randint(0, 151936, (4096,), device="cuda")
    upstream = torch.randn(4096, device="cuda")
    for name, g, w in zip(("logprobs", "dhidden", "dweight"), _run(token_logprobs, h, weight, labels, upstream), _run(token_logprobs_ref, h, weight, labels, upstream)):
        assert_close(g, w, torch.bfloat16, name)
