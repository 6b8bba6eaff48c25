"""Fused linear + cross-entropy against `fused_linear_cross_entropy_ref`: chunking, ignore_index,
label smoothing, z-loss, tied embeddings, the no-grad path."""

import pytest
import torch

from kernels.fused_linear_cross_entropy import chunk_tokens, fused_linear_cross_entropy, loss_and_numerators_rows
from src.models.components.loss import fused_linear_cross_entropy_ref

from .helpers import DEVICE, DTYPES, assert_close, assert_rows_match_ref, leaf, needs_triton

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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_transposed_hidden_and_weight_views(dtype):
    """Hidden states and weight given as transposed views (column-major storage): the gradients come
    back in the inputs' shapes, equal to the reference's, whatever the strides (the op's GEMMs
    write into contiguous buffers of its own)."""
    h, weight, labels = _inputs(37, 24, 301, dtype)
    h_t, weight_t = h.t().contiguous().t(), weight.t().contiguous().t()
    assert not h_t.is_contiguous() and not weight_t.is_contiguous()
    got = _run(fused_linear_cross_entropy, h_t, weight_t, labels, chunk_size=16)
    want = _run(fused_linear_cross_entropy_ref, h, weight, labels)
    for name, g, w in zip(("loss", "dhidden", "dweight"), got, want):
        assert g.shape == w.shape, name
        assert_close(g, w, dtype, name)


def _numerators(logits, labels, label_smoothing, z_loss, block_v, programs=3):
    """The one-pass row kernel on a copy of `logits`: per-row loss, the gradient rebuilt from its
    numerators (a * G' - eps / V), and hs = a * hidden for a random hidden."""
    n, vocab = logits.shape
    grads = logits.clone()
    loss = torch.full((n,), float("nan"), device=logits.device)
    scale = torch.full((n,), float("nan"), device=logits.device)
    hidden = torch.randn(n, 5, device=logits.device, dtype=logits.dtype)
    hs = torch.full_like(hidden, float("nan"))
    loss_and_numerators_rows(grads, labels, loss, scale, hidden, hs, -100, label_smoothing, z_loss, programs,
                             launch=dict(BLOCK_V=block_v, num_warps=1))  # fmt: skip
    rebuilt = (scale[:, None] * grads.float() - label_smoothing / vocab * (labels != -100)[:, None]).to(logits.dtype)
    assert_close(hs, scale[:, None] * hidden.float(), logits.dtype, "hs")
    return loss, rebuilt, scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,vocab,block", [(1, 300, 64), (13, 1000, 256), (20, 123, 128), (9, 4100, 1024)])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3), (0.0, 1e-2)])
def test_loss_and_numerators_rows_match_pytorch(n, vocab, block, label_smoothing, z_loss, dtype):
    logits = (torch.randn(n, vocab, device=DEVICE) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[1::4] = -100
    labels[0] = vocab - 1  # the last column, in the masked tail of the last block
    loss, rebuilt, scale = _numerators(logits, labels, label_smoothing, z_loss, block)
    assert_rows_match_ref(loss, rebuilt, logits, labels, label_smoothing, z_loss)
    assert (scale[labels == -100] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_loss_and_numerators_rescale_when_a_logit_far_exceeds_the_label(dtype):
    """Rows whose loss is far above RESCALE_NATS (30): the shift starts at the label's logit and
    must move up, once in the first block, once after blocks are written, twice in one row."""
    vocab, block = 1000, 128
    logits = torch.randn(4, vocab, device=DEVICE)
    labels = torch.tensor([5, 700, 3, 999], device=DEVICE)
    logits[0, 5], logits[0, 17] = -40.0, 10.0  # beyond the shift in the first block
    logits[1, 700], logits[1, 600] = 0.0, 40.0  # after four blocks were written with the old shift
    logits[2, 3], logits[2, 300], logits[2, 900] = -20.0, 15.0, 80.0  # two moves; loss 100 nats
    logits[3, 999] = 50.0  # the label is the maximum: no move
    logits = logits.to(dtype)
    for label_smoothing, z_loss in ((0.0, 0.0), (0.1, 1e-4)):
        loss, rebuilt, _ = _numerators(logits, labels, label_smoothing, z_loss, block, programs=2)
        assert_rows_match_ref(loss, rebuilt, logits, labels, label_smoothing, z_loss)
        assert torch.isfinite(rebuilt).all() and loss[1] > 35 and loss[2] > 90


def test_fused_linear_cross_entropy_fp16_writes_the_gradient_itself():
    """fp16 has no room for the numerators (their sum reaches V): its path writes the gradient.
    Rows whose loss exceeds ln(65504) = 11 nats are included."""
    h, weight, labels = _inputs(24, 16, 3000, torch.float32)
    weight[7] *= 6.0  # a vocabulary row that dominates: losses of 20+ nats for other labels
    h, weight = h.half(), weight.half()
    kw = dict(ignore_index=-100, label_smoothing=0.1, chunk_size=8)
    got = _run(fused_linear_cross_entropy, h, weight, labels, **kw)
    want = _run(fused_linear_cross_entropy_ref, h.float(), weight.float(), labels, label_smoothing=0.1)
    assert got[0].item() / 18 > 11  # mean loss over the 18 kept rows
    for name, g, w in zip(("loss", "dhidden", "dweight"), got, want):
        assert g.dtype == (torch.float32 if name == "loss" else torch.float16), name
        assert torch.isfinite(g).all(), name
        assert_close(g, w, torch.float16, name)


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


def test_fused_linear_cross_entropy_frozen_hidden_trains_the_weight():
    """Only the weight needs a gradient (a frozen trunk): no dh matmul, dW as the reference's."""
    h, weight, labels = _inputs(21, 8, 60, torch.float32)
    for label_smoothing in (0.0, 0.2):
        ws, wr = leaf(weight), leaf(weight)
        fused_linear_cross_entropy(h, ws, labels, label_smoothing=label_smoothing, chunk_size=8).backward()
        fused_linear_cross_entropy_ref(h, wr, labels, label_smoothing=label_smoothing).backward()
        assert h.grad is None
        assert_close(ws.grad, wr.grad, torch.float32, f"dweight eps={label_smoothing}")


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
