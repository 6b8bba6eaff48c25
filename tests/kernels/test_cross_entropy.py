"""Cross-entropy against `cross_entropy_ref`: ignore_index, label smoothing, z-loss, vocabularies
not a multiple of the block, the in-place gradient."""

import pytest
import torch

from kernels.cross_entropy import cross_entropy, launch_params
from src.models.components.loss import cross_entropy_ref

from .helpers import DEVICE, DTYPES, assert_close, leaf, needs_triton

pytestmark = needs_triton


def _labels(n, vocab, ignore_index=-100, every=3):
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[::every] = ignore_index
    return labels


def _run(fn, logits, labels, scale=0.37, **kwargs):
    logits = leaf(logits)
    loss = fn(logits, labels, **kwargs)
    (loss * scale).backward()  # a non-unit upstream gradient, as LMLoss's division gives
    return loss, logits.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,vocab", [(1, 1000), (7, 1000), (5, 8193)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference(n, vocab, label_smoothing, dtype):
    logits = torch.randn(n, vocab, device=DEVICE, dtype=dtype) * 3
    labels = _labels(n, vocab)
    labels[-1] = vocab - 1  # the last column (in the masked tail of the last block)
    kw = dict(ignore_index=-100, label_smoothing=label_smoothing)
    (loss, grad), (loss_ref, grad_ref) = _run(cross_entropy, logits, labels, **kw), _run(cross_entropy_ref, logits, labels, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grad.dtype == dtype
    assert_close(loss, loss_ref, torch.float32 if dtype == torch.float32 else dtype, "loss")
    assert_close(grad, grad_ref, dtype, "dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_z_loss(dtype):
    logits, labels = torch.randn(6, 300, device=DEVICE, dtype=dtype) * 4, _labels(6, 300)
    kw = dict(ignore_index=-100, label_smoothing=0.05, z_loss=1e-2)
    (loss, grad), (loss_ref, grad_ref) = _run(cross_entropy, logits, labels, **kw), _run(cross_entropy_ref, logits, labels, **kw)
    assert_close(loss, loss_ref, dtype, "loss")
    assert_close(grad, grad_ref, dtype, "dlogits")


def test_cross_entropy_other_ignore_index_and_all_ignored():
    logits = torch.randn(4, 50, device=DEVICE)
    labels = torch.tensor([3, 7, 7, 49], device=DEVICE)  # 7 is the ignore index here
    (loss, grad), (loss_ref, grad_ref) = (_run(f, logits, labels, ignore_index=7) for f in (cross_entropy, cross_entropy_ref))
    assert_close(loss, loss_ref, torch.float32)
    assert_close(grad, grad_ref, torch.float32)
    assert grad[1].abs().max() == 0
    loss, grad = _run(cross_entropy, logits, torch.full((4,), -100, device=DEVICE))
    assert loss.item() == 0.0 and grad.abs().max() == 0


def test_cross_entropy_writes_gradient_into_logits_and_refuses_second_backward():
    logits = torch.randn(3, 40, device=DEVICE, requires_grad=True)
    scores = logits * 1.0  # the op sees a non-leaf, as in the model
    loss = cross_entropy(scores, torch.tensor([1, 2, 3], device=DEVICE))
    loss.backward(retain_graph=True)
    assert torch.equal(scores.detach(), logits.grad)  # scores now hold d loss / d scores
    with pytest.raises(RuntimeError, match="overwrote the logits|modified by an inplace operation"):
        loss.backward()


def test_cross_entropy_bad_input():
    with pytest.raises(ValueError, match="expected logits"):
        cross_entropy(torch.randn(3, 5, device=DEVICE), torch.zeros(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(torch.randn(3, 5, device=DEVICE), torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(torch.randn(3, 5, device=DEVICE), torch.zeros(3, dtype=torch.long, device=DEVICE), label_smoothing=1.5)


def test_launch_params_cover_small_and_large_vocabularies():
    assert launch_params(1000)["BLOCK_V"] == 1024
    assert launch_params(151936)["BLOCK_V"] == 8192
    assert 1 <= launch_params(3)["num_warps"] <= launch_params(151936)["num_warps"] == 16


@pytest.mark.gpu
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_real_sizes_gpu(label_smoothing):
    logits = torch.randn(4096, 151936, device="cuda", dtype=torch.bfloat16) * 2
    labels = _labels(4096, 151936, every=7)
    kw = dict(ignore_index=-100, label_smoothing=label_smoothing)
    (loss, grad), (loss_ref, grad_ref) = _run(cross_entropy, logits, labels, **kw), _run(cross_entropy_ref, logits, labels, **kw)
    assert_close(loss, loss_ref, torch.float32, "loss")
    assert_close(grad, grad_ref, torch.bfloat16, "dlogits")
