"""The three loss ops (cross_entropy, fused_linear_cross_entropy, token_logprobs) on inputs the
models never pass but the functions accept: labels as a strided view (the kernels read labels[row]
at a unit stride, so a view must be copied, not read as if contiguous), logits rows that share
memory (an expanded row: the in-place gradient would be written over itself), and no tokens at all;
and swiglu_linear's backward on no rows."""

import pytest
import torch

from kernels.cross_entropy import cross_entropy
from kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from kernels.swiglu_linear import swiglu_linear
from kernels.token_logprobs import token_logprobs
from src.models.components.loss import cross_entropy_ref, fused_linear_cross_entropy_ref, token_logprobs_ref
from src.models.components.mlp import swiglu_linear_ref

from .helpers import DEVICE, INTERPRET, assert_close, leaf, needs_triton

pytestmark = needs_triton


def _strided_labels(n, vocab):
    labels = torch.randint(0, vocab, (2 * n,), device=DEVICE)[::2]  # a view with stride 2
    labels[1::3] = -100
    assert labels.stride(0) == 2
    return labels


def _grads(fn, inputs, labels, upstream=None, **kw):
    inputs = [leaf(t) for t in inputs]
    out = fn(*inputs, labels, **kw)
    (out if upstream is None else out * upstream).sum().backward()
    return [out.detach()] + [t.grad for t in inputs]


def test_cross_entropy_with_strided_labels_matches_reference():
    logits = torch.randn(13, 77, device=DEVICE) * 3
    labels = _strided_labels(13, 77)
    got = _grads(cross_entropy, [logits.clone()], labels, label_smoothing=0.1)
    want = _grads(cross_entropy_ref, [logits.clone()], labels.contiguous(), label_smoothing=0.1)
    for name, g, w in zip(("loss", "dlogits"), got, want):
        assert_close(g, w, torch.float32, name)


def test_fused_linear_cross_entropy_with_strided_labels_matches_reference():
    h, weight = torch.randn(21, 16, device=DEVICE), torch.randn(90, 16, device=DEVICE) * 0.3
    labels = _strided_labels(21, 90)
    got = _grads(fused_linear_cross_entropy, [h, weight], labels, chunk_size=8)
    want = _grads(fused_linear_cross_entropy_ref, [h, weight], labels.contiguous())
    for name, g, w in zip(("loss", "dhidden", "dweight"), got, want):
        assert_close(g, w, torch.float32, name)


def test_token_logprobs_with_strided_labels_matches_reference():
    h, weight = torch.randn(21, 16, device=DEVICE), torch.randn(90, 16, device=DEVICE) * 0.3
    labels = _strided_labels(21, 90)
    upstream = torch.randn(21, device=DEVICE)
    got = _grads(token_logprobs, [h, weight], labels, upstream, chunk_size=8)
    want = _grads(token_logprobs_ref, [h, weight], labels.contiguous(), upstream)
    for name, g, w in zip(("logprobs", "dhidden", "dweight"), got, want):
        assert_close(g, w, torch.float32, name)


def test_cross_entropy_of_expanded_rows_leaves_the_source_alone():
    """Five rows that are one row's memory (stride 0): each row's gradient must be its own, summed
    into the source row by autograd, and the source must not be overwritten."""
    row = torch.randn(1, 50, device=DEVICE, requires_grad=True)
    labels = torch.tensor([3, 7, -100, 49, 0], device=DEVICE)
    before = row.detach().clone()
    loss = cross_entropy(row.expand(5, 50), labels)
    loss.backward()
    ref_row = before.clone().requires_grad_()
    want = cross_entropy_ref(ref_row.expand(5, 50), labels)
    want.backward()
    assert_close(loss.detach(), want.detach(), torch.float32, "loss")
    assert_close(row.grad, ref_row.grad, torch.float32, "drow")
    assert torch.equal(row.detach(), before), "the expanded source was overwritten"


@pytest.mark.parametrize("grad", [True, False], ids=["train", "eval"])
def test_fused_linear_cross_entropy_of_no_tokens(grad):
    h = torch.randn(0, 16, device=DEVICE, requires_grad=grad)
    weight = torch.randn(90, 16, device=DEVICE, requires_grad=grad)
    labels = torch.zeros(0, dtype=torch.long, device=DEVICE)
    with torch.set_grad_enabled(grad):
        loss = fused_linear_cross_entropy(h, weight, labels)
    assert loss.item() == 0.0
    if grad:
        loss.backward()
        assert h.grad.shape == (0, 16)
        assert weight.grad.shape == weight.shape and not weight.grad.any()


def test_token_logprobs_of_no_tokens():
    h = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(90, 16, device=DEVICE, requires_grad=True)
    logprobs = token_logprobs(h, weight, torch.zeros(0, dtype=torch.long, device=DEVICE))
    assert logprobs.shape == (0,)
    logprobs.sum().backward()
    assert h.grad.shape == (0, 16)
    assert weight.grad.shape == weight.shape and not weight.grad.any()


def test_swiglu_linear_backward_of_no_rows():
    """The fused backward (fp16 in the interpreter, bf16 on a GPU) needs a TMA descriptor of a
    positive shape; no rows take the unfused path and give empty / zero gradients."""
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    gate_up = torch.randn(0, 2 * 48, device=DEVICE, dtype=dtype, requires_grad=True)
    weight = torch.randn(32, 48, device=DEVICE, dtype=dtype, requires_grad=True)
    y = swiglu_linear(gate_up, weight)
    y.sum().backward()
    ref_weight = weight.detach().clone().requires_grad_()
    swiglu_linear_ref(gate_up.detach().clone().requires_grad_(), ref_weight).sum().backward()
    assert y.shape == (0, 32) and gate_up.grad.shape == gate_up.shape
    assert_close(weight.grad, ref_weight.grad, dtype, "dweight")


@pytest.mark.parametrize("bad", [77, 500, -5], ids=["V", "far past V", "negative"])
def test_a_label_outside_the_vocabulary_gives_nan_not_a_plausible_loss(bad):
    """Each loss kernel read the label's logit at row + label unmasked: a label past the vocabulary
    read (and the fused loss wrote) another row's entries and gave a plausible, wrong loss. Now
    that row's loss is NaN, which the trainer's non-finite check reports; the other rows and the
    memory around are untouched."""
    vocab, hidden = 77, 24
    logits = torch.randn(6, vocab, device=DEVICE)
    labels = torch.randint(0, vocab, (6,), device=DEVICE)
    labels[2] = bad
    assert torch.isnan(cross_entropy(logits.clone(), labels))
    h = torch.randn(6, hidden, device=DEVICE)
    weight = torch.randn(vocab, hidden, device=DEVICE) * hidden**-0.5
    h_leaf, w_leaf = leaf(h.clone()), leaf(weight.clone())
    loss = fused_linear_cross_entropy(h_leaf, w_leaf, labels)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(h_leaf.grad[2]).all()  # the bad row's gradient
    logprobs = token_logprobs(h.clone(), weight.clone(), labels, ignore_index=-100)
    assert torch.isnan(logprobs[2]) and torch.isfinite(logprobs[[0, 1, 3, 4, 5]]).all()
    good = labels.clone()
    good[2] = -100  # ignored: the rows around give the reference's values
    assert_close(token_logprobs(h, weight, good, ignore_index=-100), token_logprobs_ref(h, weight, good), torch.float32,
                 "logprobs")
