"""benchmarks/probe_ce_split.py's one-read loss + gradient row kernel (each row split over programs) against PyTorch: several
segments per row, a vocabulary not a multiple of the segment, ignored rows, label smoothing,
z-loss, a segment of -inf logits. On the CPU the interpreter runs it as two launches (publish,
then combine and write); on a GPU the one-launch form, where segments wait for each other, is
checked against the two-launch form and the two-read kernel at real sizes."""

import sys
from pathlib import Path

import pytest
import torch

from kernels.cross_entropy import ce_forward_backward_rows
from kernels.fused_linear_cross_entropy import ce_programs
from tests.kernels.helpers import DEVICE, DTYPES, assert_close, assert_rows_match_ref, needs_triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from probe_ce_split import ce_forward_backward_rows_split, programs_for, split_launch_params  # noqa: E402

pytestmark = needs_triton


def _split(logits, labels, label_smoothing, z_loss, ignore_index=-100, **launch):
    grads = logits.clone()
    loss = torch.full((logits.shape[0],), float("nan"), device=logits.device)
    ce_forward_backward_rows_split(grads, labels, loss, ignore_index, label_smoothing, z_loss, **launch)
    return loss, grads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,vocab,block", [(1, 300, 64), (13, 1000, 256), (20, 123, 128), (9, 4100, 1024)])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_split_rows_match_pytorch(n, vocab, block, label_smoothing, z_loss, dtype):
    logits = (torch.randn(n, vocab, device=DEVICE) * 3).to(dtype)
    labels = torch.randint(0, vocab, (n,), device=DEVICE)
    labels[1::4] = -100
    labels[0] = vocab - 1  # the last column, in the masked tail of the last segment
    loss, grads = _split(logits, labels, label_smoothing, z_loss, BLOCK=block, num_warps=1, ctas_per_sm=2)
    assert_rows_match_ref(loss, grads, logits, labels, label_smoothing, z_loss)


def test_split_rows_other_ignore_index_all_ignored_and_minus_inf_segment():
    logits = torch.randn(5, 700, device=DEVICE)
    logits[2, :256] = float("-inf")  # a whole segment that adds nothing to the row's sum
    labels = torch.tensor([3, 7, 600, 7, 699], device=DEVICE)  # 7 is the ignore index here
    loss, grads = _split(logits, labels, 0.0, 0.0, ignore_index=7, BLOCK=256, num_warps=1, ctas_per_sm=1)
    assert torch.isfinite(loss).all() and torch.isfinite(grads).all()
    assert_rows_match_ref(loss, grads, logits, labels, 0.0, 0.0, ignore_index=7)
    loss, grads = _split(logits, torch.full((5,), -100, device=DEVICE), 0.0, 0.0, BLOCK=256, num_warps=1, ctas_per_sm=1)
    assert (loss == 0).all() and (grads == 0).all()


def test_split_launch_plan():
    # whole rows' worth of programs (at least one row's), never more rows in flight than rows
    assert programs_for(1000, 38, torch.device("cpu"), 4) == 38  # the interpreter counts 4 SMs
    assert programs_for(1000, 3, torch.device("cpu"), 4) == 5 * 3
    assert programs_for(3, 2, torch.device("cpu"), 4) == 3 * 2
    logits = torch.zeros(3, 10, device=DEVICE)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        ce_forward_backward_rows_split(logits, torch.zeros(3, device=DEVICE), torch.empty(3, device=DEVICE), -100, 0.0, 0.0)
    with pytest.raises(ValueError, match="unit stride"):
        ce_forward_backward_rows_split(logits.t(), torch.zeros(10, dtype=torch.long, device=DEVICE), torch.empty(10, device=DEVICE), -100, 0.0, 0.0)
    params = split_launch_params(151936)
    assert params["BLOCK"] * params["num_warps"] > 0 and split_launch_params(100)["BLOCK"] == 128


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("vocab", [151936, 50304])
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-4)])
def test_split_rows_one_launch_real_sizes_gpu(vocab, label_smoothing, z_loss):
    logits = (torch.randn(2048, vocab, device="cuda") * 4).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (2048,), device="cuda")
    labels[::5] = -100
    one = _split(logits, labels, label_smoothing, z_loss, two_launches=False)
    two = _split(logits, labels, label_smoothing, z_loss, two_launches=True)
    torch.testing.assert_close(one[0], two[0], atol=0, rtol=0)  # same math, only the wait differs
    assert torch.equal(one[1], two[1])
    committed = logits.clone()
    loss = torch.empty(2048, device="cuda")
    ce_forward_backward_rows(committed, labels, loss, -100, label_smoothing, z_loss, ce_programs(committed.device))
    torch.testing.assert_close(one[0], loss, atol=1e-4, rtol=1e-5)
    assert_close(one[1], committed, torch.bfloat16, "dlogits")
