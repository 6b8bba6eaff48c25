"""The three loss ops (cross_entropy, fused_linear_cross_entropy, token_logprobs) inside
torch.compile(fullgraph=True): one graph, and the same loss and gradients as eager and as the
PyTorch reference, with several chunks (the case that broke Inductor when it traced into the
chunk loop). They are opaque `custom_op`s, so this runs on the CPU too (the op calls the Triton
interpreter with real tensors); the GPU test repeats it at Qwen2-0.5B's loss-head size."""

import pytest
import torch

from kernels.cross_entropy import cross_entropy
from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from kernels.token_logprobs import token_logprobs
from src.models.components.loss import cross_entropy_ref, fused_linear_cross_entropy_ref, token_logprobs_ref

from .helpers import DEVICE, assert_close, leaf, needs_triton

pytestmark = needs_triton


def _inputs(n, hidden, vocab, dtype, device):
    torch.manual_seed(0)
    h = torch.randn(n, hidden, device=device, dtype=dtype)
    weight = torch.randn(vocab, hidden, device=device, dtype=dtype) * hidden**-0.5 * 2
    labels = torch.randint(0, vocab, (n,), device=device)
    labels[::5] = -100
    upstream = torch.randn(n, device=device)  # per-token weights, as DPO applies to log-probs
    return h, weight, labels, upstream


# Each case: a loss head with some work around the op (tanh before, a scale after) so that the
# compiled graph holds more than the op alone.
def _fused(op, chunk):
    return lambda h, w, labels, upstream: op(torch.tanh(h), w, labels, label_smoothing=0.1, chunk_size=chunk) * 0.37


def _ce(op):
    return lambda h, w, labels, upstream: op(torch.tanh(h) @ w.t(), labels, label_smoothing=0.1) * 0.37


def _logprobs(op, chunk):
    return lambda h, w, labels, upstream: (op(torch.tanh(h), w, labels, chunk_size=chunk) * upstream).sum()


def _fused_ref(h, w, labels, chunk_size=None, **kw):
    return fused_linear_cross_entropy_ref(h, w, labels, **kw)


def _logprobs_ref(h, w, labels, chunk_size=None):
    return token_logprobs_ref(h, w, labels)


def _cases(chunk):
    return {
        "fused_linear_cross_entropy": (_fused(fused_linear_cross_entropy, chunk), _fused(_fused_ref, chunk)),
        "cross_entropy": (_ce(cross_entropy), _ce(cross_entropy_ref)),
        "token_logprobs": (_logprobs(token_logprobs, chunk), _logprobs(_logprobs_ref, chunk)),
    }


def _run(fn, h, w, labels, upstream):
    h, w = leaf(h), leaf(w)
    loss = fn(h, w, labels, upstream)
    loss.backward()
    return loss, h.grad, w.grad


def _check(name, n, hidden, vocab, dtype, device, chunk):
    torch._dynamo.reset()
    op_fn, ref_fn = _cases(chunk)[name]
    h, w, labels, upstream = _inputs(n, hidden, vocab, dtype, device)
    compiled = _run(torch.compile(op_fn, fullgraph=True), h, w, labels, upstream)
    eager = _run(op_fn, h, w, labels, upstream)
    want = _run(ref_fn, h, w, labels, upstream)
    for what, c, e, r in zip(("loss", "dhidden", "dweight"), compiled, eager, want):
        assert_close(c, e, dtype, f"{name} {what}: compiled vs eager")
        assert_close(c, r, dtype, f"{name} {what}: compiled vs reference")


@pytest.mark.parametrize("name", ["fused_linear_cross_entropy", "cross_entropy", "token_logprobs"])
def test_loss_op_compiles_fullgraph_with_several_chunks(name):
    # 70 tokens in chunks of 16: four full chunks and a partial one.
    _check(name, n=70, hidden=24, vocab=301, dtype=torch.float32, device=DEVICE, chunk=16)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["fused_linear_cross_entropy", "cross_entropy", "token_logprobs"])
def test_loss_op_compiles_fullgraph_real_sizes_gpu(name):
    # Qwen2-0.5B's head: 4096 tokens x 896 x 151936 in bf16; the default chunk (1024) gives 4 chunks.
    _check(name, n=4096, hidden=896, vocab=151936, dtype=torch.bfloat16, device="cuda", chunk=None)
