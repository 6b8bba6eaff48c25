"""LayerNorm against `layer_norm_ref`, with and without bias."""

import pytest
import torch

from kernels.layernorm import layer_norm
from src.models.components.norms import layer_norm_ref

from .helpers import DEVICE, DTYPES, assert_close, leaf, needs_triton

pytestmark = needs_triton


def _run(fn, x, weight, bias, dy):
    x, weight = leaf(x), leaf(weight)
    bias = leaf(bias) if bias is not None else None
    y = fn(x, weight, bias, 1e-5)
    y.backward(dy)
    return [y, x.grad, weight.grad] + ([bias.grad] if bias is not None else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 123), (3, 5, 123), (4, 1000)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_reference(shape, dtype, with_bias):
    x = torch.randn(shape, device=DEVICE, dtype=dtype) * 2 + 0.5
    weight = torch.randn(shape[-1], device=DEVICE, dtype=dtype)
    bias = torch.randn(shape[-1], device=DEVICE, dtype=dtype) if with_bias else None
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    got, want = _run(layer_norm, x, weight, bias, dy), _run(layer_norm_ref, x, weight, bias, dy)
    for name, g, w in zip(("y", "dx", "dw", "db"), got, want):
        assert g.dtype == w.dtype, name
        assert_close(g, w, dtype, name)


def test_layer_norm_expanded_gradient():
    x, weight, bias = torch.randn(6, 40, device=DEVICE), torch.randn(40, device=DEVICE), torch.randn(40, device=DEVICE)
    dy = torch.randn(40, device=DEVICE).expand(6, 40)
    for got, want in zip(_run(layer_norm, x, weight, bias, dy), _run(layer_norm_ref, x, weight, bias, dy)):
        assert_close(got, want, torch.float32)


def test_layer_norm_bad_bias_shape():
    with pytest.raises(ValueError, match="bias must be"):
        layer_norm(torch.randn(2, 8, device=DEVICE), torch.ones(8, device=DEVICE), torch.zeros(9, device=DEVICE), 1e-5)


def test_layer_norm_without_weight_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a weight"):
        layer_norm(torch.randn(2, 8, device=DEVICE), None, None, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(8, 2048, 768), (16384, 4096)])
def test_layer_norm_real_sizes_gpu(shape):
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    weight, bias = (torch.randn(shape[-1], device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dy = torch.randn_like(x)
    for name, g, w in zip(("y", "dx", "dw", "db"), _run(layer_norm, x, weight, bias, dy), _run(layer_norm_ref, x, weight, bias, dy)):
        assert_close(g, w, torch.bfloat16, name)
