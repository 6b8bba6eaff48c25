"""RMSNorm and the fused residual add against `rms_norm_ref` / `add_rms_norm_ref`."""

import pytest
import torch

from kernels.rmsnorm import add_rms_norm, rms_norm
from src.models.components.norms import add_rms_norm_ref, rms_norm_ref

from .helpers import DEVICE, DTYPES, assert_close, leaf, needs_triton

pytestmark = needs_triton
SHAPES = [(1, 123), (3, 5, 123), (4, 1000), (2, 64)]


def _run(fn, x, weight, dy):
    x, weight = leaf(x), leaf(weight)
    y = fn(x, weight, 1e-6)
    y.backward(dy)
    return y, x.grad, weight.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_reference(shape, dtype):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    weight = torch.rand(shape[-1], device=DEVICE, dtype=dtype) + 0.5
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    for name, got, want in zip(("y", "dx", "dw"), _run(rms_norm, x, weight, dy), _run(rms_norm_ref, x, weight, dy)):
        assert got.dtype == want.dtype, name
        assert_close(got, want, dtype, name)


def test_rms_norm_fp32_weight_on_bf16_input_promotes_like_reference():
    x = torch.randn(4, 96, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.rand(96, device=DEVICE) + 0.5
    y, want = rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6)
    assert y.dtype == want.dtype == torch.float32
    assert_close(y, want, torch.bfloat16)


def test_rms_norm_expanded_gradient():
    """A stride-0 upstream gradient (from .sum() or .expand) is read correctly."""
    x, weight = torch.randn(6, 40, device=DEVICE), torch.rand(40, device=DEVICE)
    dy = torch.randn(1, 40, device=DEVICE).expand(6, 40)
    for got, want in zip(_run(rms_norm, x, weight, dy), _run(rms_norm_ref, x, weight, dy)):
        assert_close(got, want, torch.float32)


def test_rms_norm_strided_rows():
    """Rows of a wider tensor (unit stride on H, row stride > H) are read in place."""
    base = torch.randn(5, 2 * 48, device=DEVICE)
    x = base[:, :48]
    weight = torch.rand(48, device=DEVICE)
    assert_close(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_reference(dtype):
    shape = (2, 3, 123)
    x, residual, dy, dsum = (torch.randn(shape, device=DEVICE, dtype=dtype) for _ in range(4))
    weight = torch.rand(shape[-1], device=DEVICE, dtype=dtype) + 0.5

    def run(fn):
        xs, rs, ws = leaf(x), leaf(residual), leaf(weight)
        y, summed = fn(xs, rs, ws, 1e-6)
        torch.autograd.backward([y, summed], [dy, dsum])
        return y, summed, xs.grad, rs.grad, ws.grad

    for name, got, want in zip(("y", "sum", "dx", "dresidual", "dw"), run(add_rms_norm), run(add_rms_norm_ref)):
        assert_close(got, want, dtype, name)


def test_add_rms_norm_only_normalised_output_used():
    """When the sum is not used downstream its gradient is zero, and dx = dresidual = d norm."""
    x, residual = leaf(torch.randn(3, 32, device=DEVICE)), leaf(torch.randn(3, 32, device=DEVICE))
    weight = torch.rand(32, device=DEVICE)
    y, _ = add_rms_norm(x, residual, weight, 1e-6)
    y.square().sum().backward()
    xr = leaf(x)
    rms_norm_ref(xr + residual.detach(), weight, 1e-6).square().sum().backward()
    assert_close(x.grad, xr.grad, torch.float32)
    assert_close(residual.grad, xr.grad, torch.float32)


def test_rms_norm_bad_weight_shape():
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE), 1e-6)


def test_add_rms_norm_bad_residual():
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(torch.randn(2, 8, device=DEVICE), torch.randn(2, 7, device=DEVICE), torch.ones(8, device=DEVICE), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16384, 4096), (16384, 896), (8, 2048, 768)])
def test_rms_norm_real_sizes_gpu(shape):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    weight = torch.rand(shape[-1], device="cuda", dtype=torch.bfloat16) + 0.5
    dy = torch.randn_like(x)
    for name, got, want in zip(("y", "dx", "dw"), _run(rms_norm, x, weight, dy), _run(rms_norm_ref, x, weight, dy)):
        assert_close(got, want, torch.bfloat16, name)
