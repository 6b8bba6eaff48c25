"""benchmarks/probe_ce_resident.py's loss + gradient row kernel (each row read once and held in
registers) against PyTorch: rows of one, two and three pieces, a vocabulary wider than 32K,
fewer programs than rows, ignored rows, label smoothing, z-loss; and the piece widths."""

import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.helpers import DEVICE, DTYPES, assert_rows_match_ref, needs_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from probe_ce_resident import RESIDENT_MAX_VOCAB, ce_forward_backward_rows_resident, resident_blocks  # noqa: E402

pytestmark = needs_triton


def _resident(logits, labels, label_smoothing, z_loss, ignore_index=-100, programs=2):
    grads = logits.clone()
    loss = torch.full((logits.shape[0],), float("nan"), device=logits.device)
    ce_forward_backward_rows_resident(grads, labels, loss, ignore_index, label_smoothing, z_loss, programs, num_warps=4)
    return loss, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,vocab", [(1, 7), (9, 123), (6, 3000), (3, 40000)])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_resident_rows_match_pytorch(n, vocab, label_smoothing, z_loss, dtype):
    logits = (torch.randn(n, vocab, device=DEVICE) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[1::4] = -100
    labels[0] = vocab - 1  # the last column, in the masked tail of the last piece
    loss, grads = _resident(logits, labels, label_smoothing, z_loss)
    assert_rows_match_ref(loss, grads, logits, labels, label_smoothing, z_loss)


def test_resident_rows_other_ignore_index_and_all_ignored():
    logits = torch.randn(4, 700, device=DEVICE)
    labels = torch.tensor([3, 7, 699, 7], device=DEVICE)  # 7 is the ignore index here
    loss, grads = _resident(logits, labels, 0.0, 0.0, ignore_index=7, programs=1)
    assert_rows_match_ref(loss, grads, logits, labels, 0.0, 0.0, ignore_index=7)
    loss, grads = _resident(logits, torch.full((4,), -100, device=DEVICE), 0.0, 0.0)
    assert (loss == 0).all() and (grads == 0).all()


def test_resident_blocks_and_bad_input():
    assert resident_blocks(50304) == (32768, 16384, 2048)  # 51200 columns held: 2% masked
    assert resident_blocks(32000) == (16384, 8192, 8192)
    assert resident_blocks(4096) == (4096, 0, 0)
    assert resident_blocks(5) == (4, 1, 0)
    for vocab in (1, 2, 3, 123, 1000, 50257, RESIDENT_MAX_VOCAB):
        a, b, c = resident_blocks(vocab)
        assert a + b <= vocab <= a + b + c
        assert a + b + c < 2 * vocab or vocab == 1
    with pytest.raises(ValueError, match="rows of 1..65536 columns"):
        resident_blocks(RESIDENT_MAX_VOCAB + 1)
    logits = torch.zeros(3, 10, device=DEVICE)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        ce_forward_backward_rows_resident(logits, torch.zeros(3, device=DEVICE), torch.empty(3, device=DEVICE), -100, 0.0, 0.0, 1)
    with pytest.raises(ValueError, match="unit stride"):
        ce_forward_backward_rows_resident(logits.t(), torch.zeros(10, dtype=torch.long, device=DEVICE), torch.empty(10, device=DEVICE), -100, 0.0, 0.0, 1)
