"""SwiGLU against `swiglu_ref`, on the `.chunk(2, -1)` views the model passes."""

import pytest
import torch

from kernels.swiglu import swiglu, swiglu_packed
from src.models.components.mlp import swiglu_ref

from .helpers import DEVICE, DTYPES, assert_close, leaf, needs_triton

pytestmark = needs_triton


def _run(fn, gate_up, dy):
    gate_up = leaf(gate_up)
    y = fn(*gate_up.chunk(2, dim=-1))
    y.backward(dy)
    return y, gate_up.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 123), (3, 5, 123), (2, 1000), (4, 2048)])
def test_swiglu_matches_reference(shape, dtype):
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype) * 3
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    for name, g, w in zip(("y", "dgate_up"), _run(swiglu, gate_up, dy), _run(swiglu_ref, gate_up, dy)):
        assert g.dtype == w.dtype, name
        assert_close(g, w, dtype, name)


def test_swiglu_separate_contiguous_inputs_and_expanded_gradient():
    gate, up = leaf(torch.randn(4, 33, device=DEVICE)), leaf(torch.randn(4, 33, device=DEVICE))
    swiglu(gate, up).sum().backward()  # .sum() sends an expanded, stride-0 gradient
    gate_ref, up_ref = leaf(gate), leaf(up)
    swiglu_ref(gate_ref, up_ref).sum().backward()
    assert_close(gate.grad, gate_ref.grad, torch.float32)
    assert_close(up.grad, up_ref.grad, torch.float32)


@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 2000)])
def test_swiglu_contiguous_inputs_flat_path(shape):
    """Contiguous gate, up and gradient take the flat 1-D grid (blocks cross row boundaries)."""
    gate, up = leaf(torch.randn(shape, device=DEVICE)), leaf(torch.randn(shape, device=DEVICE))
    dy = torch.randn(shape, device=DEVICE)
    y = swiglu(gate, up)
    y.backward(dy)
    gate_ref, up_ref = leaf(gate), leaf(up)
    y_ref = swiglu_ref(gate_ref, up_ref)
    y_ref.backward(dy)
    for name, g, w in (("y", y, y_ref), ("dgate", gate.grad, gate_ref.grad), ("dup", up.grad, up_ref.grad)):
        assert_close(g, w, torch.float32, name)


def test_swiglu_shape_mismatch():
    with pytest.raises(ValueError, match="must match"):
        swiglu(torch.randn(2, 4, device=DEVICE), torch.randn(2, 5, device=DEVICE))


@pytest.mark.gpu
def test_swiglu_real_sizes_gpu():
    gate_up = torch.randn(16384, 2 * 4864, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(16384, 4864, device="cuda", dtype=torch.bfloat16)
    for name, g, w in zip(("y", "dgate_up"), _run(swiglu, gate_up, dy), _run(swiglu_ref, gate_up, dy)):
        assert_close(g, w, torch.bfloat16, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 123), (3, 5, 123), (2, 1000), (4, 2048)])
def test_swiglu_packed_matches_reference_and_writes_one_gradient(shape, dtype):
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype) * 3
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    packed = leaf(gate_up)
    y = swiglu_packed(packed)
    y.backward(dy)
    want_y, want_grad = _run(swiglu_ref, gate_up, dy)  # swiglu_packed_ref is this on one tensor
    assert y.shape == want_y.shape and packed.grad.shape == gate_up.shape and packed.grad.is_contiguous()
    assert_close(y, want_y, dtype, "y")
    assert_close(packed.grad, want_grad, dtype, "dgate_up")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 123), (6, 1000)])
def test_swiglu_packed_backward_rewrites_the_forward_bit_for_bit(shape, dtype):
    """The backward's row pass can also write y (for `swiglu_linear_recompute`): the forward's y,
    bit for bit, beside the same d gate_up as without it."""
    from kernels.swiglu import _swiglu_packed_bwd_launch, _swiglu_packed_bwd_rows

    gate_up = torch.randn(shape[0], 2 * shape[1], device=DEVICE, dtype=dtype) * 3
    dy = torch.randn(shape, device=DEVICE, dtype=dtype)
    dgate_up, y = _swiglu_packed_bwd_rows(dy, gate_up, store_y=True)
    assert torch.equal(y, swiglu_packed(gate_up))
    assert torch.equal(dgate_up, _swiglu_packed_bwd_launch(dy, gate_up))


def test_swiglu_packed_refuses_an_odd_width():
    with pytest.raises(ValueError, match="must be even"):
        swiglu_packed(torch.randn(2, 7, device=DEVICE))
