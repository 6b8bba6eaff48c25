"""GELU + projection (`gelu_linear`, GPT-2's MLP after the fc matmul) against `gelu_linear_ref`.

On the CPU the fused backward GEMM runs through the interpreter in fp16 (the interpreter's bf16
`tl.dot` is wrong); fp32 and bf16 take the unfused backward, which must give the same results.
"""

import pytest
import torch

from kernels.gelu_linear import fused_backward_supported, gelu_linear
from src.models.components.mlp import GeluMLP, gelu_linear_ref

from .helpers import DEVICE, INTERPRET, TOLERANCE, assert_close, leaf, needs_triton

pytestmark = needs_triton

FUSED_DTYPE = torch.float16 if INTERPRET else torch.bfloat16
NAMES = ("y", "dpre0", "dfc_bias", "dweight", "dbias")


def _run(fn, pre0, fc_bias, weight, bias, dy):
    pre0, weight = leaf(pre0), leaf(weight)
    fc_bias = leaf(fc_bias) if fc_bias is not None else None
    bias = leaf(bias) if bias is not None else None
    y = fn(pre0, fc_bias, weight, bias)
    y.backward(dy)
    return y, pre0.grad, fc_bias.grad if fc_bias is not None else None, weight.grad, bias.grad if bias is not None else None


def _inputs(tokens, D, H, dtype, param_dtype=None, biases=True):
    param_dtype = param_dtype or dtype
    pre0 = torch.randn(*tokens, H, device=DEVICE, dtype=dtype) * 2
    fc_bias = torch.randn(H, device=DEVICE).to(param_dtype) if biases else None
    weight = (torch.randn(D, H, device=DEVICE) * H**-0.5).to(param_dtype)
    bias = torch.randn(D, device=DEVICE).to(param_dtype) if biases else None
    dy = torch.randn(*tokens, D, device=DEVICE, dtype=dtype)
    return pre0, fc_bias, weight, bias, dy


def _compare(inputs, tol_dtype):
    got = _run(gelu_linear, *inputs)
    want = _run(gelu_linear_ref, *inputs)
    for name, g, w in zip(NAMES, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        assert_close(g, w, tol_dtype, name)


@pytest.mark.parametrize(
    "tokens, D, H",
    [((2, 64), 32, 48), ((1,), 64, 40), ((3, 50), 24, 200), ((4, 96), 136, 128)],
    ids=["batch", "single-row", "H-not-a-tile-multiple", "D-over-one-K-step"],
)
def test_fused_backward_matches_reference(tokens, D, H):
    inputs = _inputs(tokens, D, H, FUSED_DTYPE)
    assert fused_backward_supported(inputs[0], inputs[2])
    _compare(inputs, FUSED_DTYPE)


def test_fused_backward_without_biases():
    _compare(_inputs((2, 40), 32, 64, FUSED_DTYPE, biases=False), FUSED_DTYPE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfused_backward_matches_reference(dtype):
    inputs = _inputs((2, 20), 24, 40, dtype)
    if dtype == torch.float32 or INTERPRET:
        assert not fused_backward_supported(inputs[0], inputs[2])
    _compare(inputs, dtype)


def test_widths_that_tma_cannot_take_fall_back():
    inputs = _inputs((2, 9), 20, 37, FUSED_DTYPE)  # H = 37: rows of 74 bytes
    assert not fused_backward_supported(inputs[0], inputs[2])
    _compare(inputs, FUSED_DTYPE)


def test_fp32_parameters_get_fp32_gradients_from_half_activations():
    """The autocast layout: fp32 weight and biases, half-precision activations. The parameters'
    gradients come back fp32; the matmuls use the parameters cast to the activations' dtype."""
    pre0, fc_bias, weight, bias, dy = _inputs((2, 32), 32, 64, FUSED_DTYPE, param_dtype=torch.float32)
    got = _run(gelu_linear, pre0, fc_bias, weight, bias, dy)
    assert got[0].dtype == got[1].dtype == FUSED_DTYPE
    assert got[2].dtype == got[3].dtype == got[4].dtype == torch.float32
    cast = [t.to(FUSED_DTYPE) for t in (fc_bias, weight, bias)]
    want = _run(gelu_linear_ref, pre0, cast[0], cast[1], cast[2], dy)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, FUSED_DTYPE, name)


def test_expanded_gradient_from_sum():
    pre0, fc_bias, weight, bias, _ = _inputs((3, 16), 16, 24, FUSED_DTYPE)
    leaves = [leaf(t) for t in (pre0, fc_bias, weight, bias)]
    gelu_linear(*leaves).float().sum().backward()  # an expanded, stride-0 gradient reaches backward
    ref = [leaf(t) for t in (pre0, fc_bias, weight, bias)]
    gelu_linear_ref(*ref).float().sum().backward()
    for name, a, b in zip(NAMES[1:], leaves, ref):
        assert_close(a.grad, b.grad, FUSED_DTYPE, name)


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match=r"pre \(\.\.\., H\) and weight \(D, H\) disagree"):
        gelu_linear(torch.randn(2, 10, device=DEVICE), None, torch.randn(4, 6, device=DEVICE), None)
    with pytest.raises(ValueError, match=r"fc_bias must be \(10,\)"):
        gelu_linear(torch.randn(2, 10, device=DEVICE), torch.randn(9, device=DEVICE), torch.randn(4, 10, device=DEVICE), None)


def test_mlp_refuses_an_activation_the_op_does_not_compute():
    with pytest.raises(ValueError, match="tanh-approximated GELU.*set kernels.gelu=torch"):
        GeluMLP(16, 64, activation="relu", impl="fused_linear")
    GeluMLP(16, 64, activation="relu", impl="torch")  # the reference takes any activation


def test_mlp_keeps_its_parameters_and_matches_the_reference_module():
    torch.manual_seed(0)
    ref = GeluMLP(32, 64).to(DEVICE)
    fused = GeluMLP(32, 64, impl="fused_linear").to(DEVICE)
    fused.load_state_dict(ref.state_dict())  # the same parameter names and shapes
    x = torch.randn(2, 8, 32, device=DEVICE)
    for module in (ref, fused):
        module(x).square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, torch.float32, name)


@pytest.mark.gpu
def test_real_size_gpu():
    """gpt_125m's MLP at 16 x 1024 tokens, bf16 activations and fp32 parameters (autocast)."""
    pre0, fc_bias, weight, bias, dy = _inputs((16, 1024), 768, 3072, torch.bfloat16, param_dtype=torch.float32)
    assert fused_backward_supported(pre0, weight.to(torch.bfloat16))
    got = _run(gelu_linear, pre0, fc_bias, weight, bias, dy)
    cast = [t.to(torch.bfloat16) for t in (fc_bias, weight, bias)]
    want = _run(gelu_linear_ref, pre0, cast[0], cast[1], cast[2], dy)
    atol, rtol = TOLERANCE[torch.bfloat16]
    for name, g, w in zip(NAMES, got, want):
        # the parameters' gradients: ours from an fp32 accumulator, the reference's rounded to bf16
        torch.testing.assert_close(g.float(), w.float(), atol=atol * w.float().abs().max().item(), rtol=rtol, msg=name)
