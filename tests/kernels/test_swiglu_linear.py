"""SwiGLU + down projection (`swiglu_linear`) against `swiglu_linear_ref`.

On the CPU the fused backward GEMM runs through the interpreter in fp16 (the interpreter's bf16
`tl.dot` is wrong); fp32 and bf16 take the unfused backward, which must give the same results.
"""

import pytest
import torch

import kernels.swiglu_linear as swiglu_linear_module
from kernels.swiglu_linear import fused_backward_supported, swiglu_linear, swiglu_linear_recompute
from src.models.components.mlp import swiglu_linear_ref

from .helpers import DEVICE, INTERPRET, TOLERANCE, assert_close, leaf, needs_triton

pytestmark = needs_triton

# Operands of the fused path: fp16 on the CPU interpreter, bf16 on a GPU.
FUSED_DTYPE = torch.float16 if INTERPRET else torch.bfloat16


def _run(fn, gate_up, weight, dy):
    gate_up, weight = leaf(gate_up), leaf(weight)
    y = fn(gate_up, weight)
    y.backward(dy)
    return y, gate_up.grad, weight.grad


def _inputs(tokens, D, H, dtype, weight_dtype=None):
    gate_up = torch.randn(*tokens, 2 * H, device=DEVICE, dtype=dtype) * 2
    weight = (torch.randn(D, H, device=DEVICE) * H**-0.5).to(weight_dtype or dtype)
    dy = torch.randn(*tokens, D, device=DEVICE, dtype=dtype)
    return gate_up, weight, dy


def _compare(gate_up, weight, dy, tol_dtype):
    got = _run(swiglu_linear, gate_up, weight, dy)
    want = _run(swiglu_linear_ref, gate_up, weight, dy)
    for name, g, w in zip(("y", "dgate_up", "dweight"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        assert_close(g, w, tol_dtype, name)


@pytest.mark.parametrize(
    "tokens, D, H",
    [((2, 64), 32, 48), ((1,), 64, 40), ((3, 50), 24, 200), ((4, 96), 136, 128)],
    ids=["batch", "single-row", "H-not-a-tile-multiple", "D-over-one-K-step"],
)
def test_fused_backward_matches_reference(tokens, D, H):
    gate_up, weight, dy = _inputs(tokens, D, H, FUSED_DTYPE)
    assert fused_backward_supported(gate_up, weight)
    _compare(gate_up, weight, dy, FUSED_DTYPE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unfused_backward_matches_reference(dtype):
    gate_up, weight, dy = _inputs((2, 20), 24, 40, dtype)
    if dtype == torch.float32 or INTERPRET:
        assert not fused_backward_supported(gate_up, weight)
    _compare(gate_up, weight, dy, dtype)


def test_widths_that_tma_cannot_take_fall_back():
    gate_up, weight, dy = _inputs((2, 9), 20, 37, FUSED_DTYPE)  # H = 37: rows of 74 bytes
    assert not fused_backward_supported(gate_up, weight)
    _compare(gate_up, weight, dy, FUSED_DTYPE)


def test_misaligned_tensors_are_not_given_to_tma():
    """A view starting off a 16-byte boundary (one element into a buffer) cannot be a TMA base."""
    gate_up, weight, dy = _inputs((2, 16), 16, 24, FUSED_DTYPE)
    shifted = torch.empty(gate_up.numel() + 1, device=DEVICE, dtype=FUSED_DTYPE)[1:].view(gate_up.shape)
    shifted.copy_(gate_up)
    assert fused_backward_supported(gate_up, weight)
    assert not fused_backward_supported(shifted, weight)
    assert not fused_backward_supported(gate_up, weight, dy.reshape(-1)[1:])  # the upstream gradient too


def test_fp32_weight_gradient_in_fp32_from_half_activations():
    """The autocast layout: fp32 master weight, half-precision activations. The weight gradient
    comes back fp32 (unrounded), the forward uses the weight cast to the activations' dtype."""
    gate_up, weight, dy = _inputs((2, 32), 32, 64, FUSED_DTYPE, weight_dtype=torch.float32)
    y, dgate_up, dweight = _run(swiglu_linear, gate_up, weight, dy)
    assert y.dtype == dgate_up.dtype == FUSED_DTYPE and dweight.dtype == torch.float32
    ref = _run(swiglu_linear_ref, gate_up, weight.to(FUSED_DTYPE), dy)
    assert_close(y, ref[0], FUSED_DTYPE, "y")
    assert_close(dgate_up, ref[1], FUSED_DTYPE, "dgate_up")
    h = torch.nn.functional.silu(gate_up[..., :64].float()) * gate_up[..., 64:].float()
    exact = dy.float().reshape(-1, 32).t() @ h.to(FUSED_DTYPE).float().reshape(-1, 64)  # fp32 accumulation
    assert_close(dweight, exact, torch.float32, "dweight")


def test_expanded_gradient_from_sum():
    gate_up, weight, _ = _inputs((3, 16), 16, 24, FUSED_DTYPE)
    a, b = leaf(gate_up), leaf(weight)
    swiglu_linear(a, b).float().sum().backward()  # an expanded, stride-0 gradient reaches backward
    c, d = leaf(gate_up), leaf(weight)
    swiglu_linear_ref(c, d).float().sum().backward()
    assert_close(a.grad, c.grad, FUSED_DTYPE, "dgate_up")
    assert_close(b.grad, d.grad, FUSED_DTYPE, "dweight")


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match=r"gate_up \(\.\.\., 2H\) and weight \(D, H\) disagree"):
        swiglu_linear(torch.randn(2, 10, device=DEVICE), torch.randn(4, 6, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens, D, H", [((2, 20), 24, 40), ((1,), 16, 37), ((3, 50), 24, 200)],
                         ids=["batch", "single-row-odd-H", "H-not-a-block-multiple"])
def test_recompute_variant_matches_reference(tokens, D, H, dtype):
    """`swiglu_linear_recompute`: the reference's results, with h written again in backward."""
    gate_up, weight, dy = _inputs(tokens, D, H, dtype)
    got = _run(swiglu_linear_recompute, gate_up, weight, dy)
    want = _run(swiglu_linear_ref, gate_up, weight, dy)
    for name, g, w in zip(("y", "dgate_up", "dweight"), got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        assert_close(g, w, dtype, name)


def test_recompute_variant_keeps_no_h_and_agrees_with_the_unfused_backward():
    """It keeps gate_up and the weight for backward, not the (tokens, H) product, and gives what
    `swiglu_linear`'s unfused backward gives, bit for bit (fp32 weight, bf16 activations)."""
    gate_up, weight, dy = _inputs((2, 16), 16, 24, torch.bfloat16, weight_dtype=torch.float32)
    kept = {}
    for fn in (swiglu_linear, swiglu_linear_recompute):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            fn(leaf(gate_up), leaf(weight))
        kept[fn.__name__] = saved
    assert (2, 16, 24) in kept["swiglu_linear"] and (2, 16, 24) not in kept["swiglu_linear_recompute"]
    assert sorted(kept["swiglu_linear_recompute"]) == sorted([(2, 16, 48), (16, 24)])
    if not fused_backward_supported(gate_up.reshape(-1, 48), weight.to(gate_up.dtype)):  # both unfused here
        for g, w in zip(_run(swiglu_linear_recompute, gate_up, weight, dy), _run(swiglu_linear, gate_up, weight, dy)):
            assert torch.equal(g, w)


def test_recompute_variant_names_bad_shapes():
    with pytest.raises(ValueError, match=r"gate_up \(\.\.\., 2H\) and weight \(D, H\) disagree"):
        swiglu_linear_recompute(torch.randn(2, 10, device=DEVICE), torch.randn(4, 6, device=DEVICE))


def test_fused_kernel_settings_fit_the_tiles():
    """Blocks the TMA boxes accept (powers of two, at least 16 bytes in the last dimension)."""
    m = swiglu_linear_module
    for block in (m.BLOCK_M, m.BLOCK_N, m.BLOCK_K):
        assert block & (block - 1) == 0 and block * 2 >= 16


@pytest.mark.gpu
@pytest.mark.parametrize("fn", [swiglu_linear, swiglu_linear_recompute], ids=lambda f: f.__name__)
def test_real_size_gpu(fn):
    """Qwen2-0.5B's MLP at 4 x 2048 tokens, bf16 activations and an fp32 weight (autocast)."""
    gate_up, weight, dy = _inputs((4, 2048), 896, 4864, torch.bfloat16, weight_dtype=torch.float32)
    assert fused_backward_supported(gate_up, weight)
    y, dgate_up, dweight = _run(fn, gate_up, weight, dy)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = _run(swiglu_linear_ref, gate_up, weight, dy)
    assert_close(y, ref[0], torch.bfloat16, "y")
    assert_close(dgate_up, ref[1], torch.bfloat16, "dgate_up")
    # autograd's weight gradient is a bf16 matmul cast to fp32; ours is the fp32 accumulator
    atol, rtol = TOLERANCE[torch.bfloat16]
    torch.testing.assert_close(dweight, ref[2], atol=atol * ref[2].abs().max().item(), rtol=rtol)

