"""`kernels.linear`: `fp32_wgrad` gives autocast's forward and input gradient, and the weight and
bias gradients in fp32 from the matmul, against fp32 math of the same bf16 operands."""

import pytest
import torch
import torch.nn.functional as F

from src.models import AutoModelForCausalLM, KernelConfig
from src.models.components.linear import Linear, linear_fp32_wgrad, linear_tuned

TINY = {"gpt2": "configs/model/gpt2_tiny.yaml", "qwen2": "configs/model/qwen2_tiny.yaml"}  # the shipped tiny models


def _grads(impl, x, layer, device, ones_column=False):
    x = x.detach().clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        y = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, impl=impl,
                   ones_column=ones_column).to(device)
        y.load_state_dict(layer.state_dict())
        out = y(x)
    out.float().pow(2).sum().backward()
    return out, x.grad, y.weight.grad, None if y.bias is None else y.bias.grad


def _check_against_fp32_math(device, ones_column=False, impl="fp32_wgrad"):
    torch.manual_seed(0)
    layer = torch.nn.Linear(24, 40, bias=True).to(device)
    x = torch.randn(3, 5, 24, device=device)  # (B, T, in): leading dims are flattened in backward
    out, dx, dw, db = _grads(impl, x, layer, device, ones_column)
    ref_out, ref_dx, ref_dw, ref_db = _grads("torch", x, layer, device)
    # forward and input gradient: autocast's own bf16 math
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.float32
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dx, ref_dx)
    # weight / bias gradients: fp32, equal to fp32 math on the bf16 operands (autograd's path rounds
    # them to bf16 first, so it is only bf16-close)
    assert dw.dtype == torch.float32 and db.dtype == torch.float32
    x_c, w_c = x.to(torch.bfloat16), layer.weight.to(torch.bfloat16)
    dy = (2 * F.linear(x_c, w_c, layer.bias.to(torch.bfloat16)).float()).to(torch.bfloat16).reshape(-1, 40)
    exact_dw = dy.float().t() @ x_c.reshape(-1, 24).float()
    torch.testing.assert_close(dw, exact_dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, dy.float().sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, ref_dw, rtol=1.6e-2, atol=1e-2)
    assert (dw - exact_dw).abs().max() < (ref_dw - exact_dw).abs().max()  # closer than the bf16-rounded one


@pytest.mark.parametrize("impl", ["fp32_wgrad", "tuned"])
@pytest.mark.parametrize("ones_column", [False, True], ids=["sum", "ones-column"])
def test_fp32_wgrad_matches_fp32_math_cpu(ones_column, impl):
    _check_against_fp32_math("cpu", ones_column, impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fp32_wgrad", "tuned"])
@pytest.mark.parametrize("ones_column", [False, True], ids=["sum", "ones-column"])
def test_fp32_wgrad_matches_fp32_math_gpu(ones_column, impl):
    _check_against_fp32_math("cuda", ones_column, impl)


def test_ones_column_only_where_it_applies():
    """The bias gradient from the GEMM's column of ones: only under fp32_wgrad with a bias; a
    frozen weight still gets no gradient, a trainable bias does."""
    assert Linear(8, 6, impl="fp32_wgrad", ones_column=True).ones_column
    assert Linear(8, 6, impl="tuned", ones_column=True).ones_column
    assert not Linear(8, 6, impl="torch", ones_column=True).ones_column
    assert not Linear(8, 6, bias=False, impl="fp32_wgrad", ones_column=True).ones_column
    assert "ones_column=True" in repr(Linear(8, 6, impl="fp32_wgrad", ones_column=True))
    torch.manual_seed(0)
    layer = Linear(8, 6, impl="fp32_wgrad", ones_column=True)
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 3, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == (2, 3, 6)
    y.float().sum().backward()
    assert layer.weight.grad is None and x.grad.shape == x.shape
    torch.testing.assert_close(layer.bias.grad, torch.full((6,), 6.0))  # d(sum)/db: one per token


def test_fp32_wgrad_is_f_linear_without_autocast_or_fp32_weights():
    torch.manual_seed(0)
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    torch.testing.assert_close(linear_fp32_wgrad(x, w, b), F.linear(x, w, b), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 parameters: nothing to cast, autocast's path
        wb, bb = w.detach().bfloat16().requires_grad_(), b.detach().bfloat16().requires_grad_()
        y = linear_fp32_wgrad(x, wb, bb)
    assert y.grad_fn.name() != "_LinearWeightGradInWeightDtypeBackward"
    y.float().sum().backward()
    assert wb.grad.dtype == torch.bfloat16


def test_frozen_weight_and_no_bias():
    torch.manual_seed(0)
    layer = Linear(8, 6, bias=False, impl="fp32_wgrad")
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().sum().backward()
    assert layer.weight.grad is None and x.grad.shape == x.shape and x.grad.dtype == torch.float32


def test_linear_is_nn_linear_with_the_same_state_dict():
    layer = Linear(8, 6, impl="fp32_wgrad")
    assert isinstance(layer, torch.nn.Linear)
    assert set(layer.state_dict()) == {"weight", "bias"}
    assert "impl=fp32_wgrad" in repr(layer)


def test_unknown_linear_choice_names_the_options():
    with pytest.raises(ValueError, match="kernels.linear: 'triton' is not available.*fp32_wgrad"):
        Linear(8, 6, impl="triton")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "bf16-only"])
def test_tuned_takes_bf16_weights_with_autograds_math(device, autocast):
    """`tuned` also runs the GEMMs of weights already in bf16 (bf16 parameters, `optimizer.bf16_grads`'
    copies): its own Function, with autograd's results and bf16 gradients."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 24, device=device, dtype=torch.float32 if autocast else torch.bfloat16)
    w = (torch.randn(40, 24, device=device) * 0.2).bfloat16()
    b = torch.randn(40, device=device).bfloat16()
    dy = torch.randn(3, 5, 40, device=device, dtype=torch.bfloat16)
    results = {}
    for name, fn in (("tuned", linear_tuned), ("autograd", F.linear)):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, w, b))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            y = fn(xi, wi, bi)
        assert (y.grad_fn.name() == "_LinearWeightGradInWeightDtypeBackward") == (name == "tuned")
        y.backward(dy)
        results[name] = (y, xi.grad, wi.grad, bi.grad)
    for got, want, what in zip(results["tuned"], results["autograd"], ("y", "dx", "dw", "db")):
        assert got.dtype == want.dtype, what
        torch.testing.assert_close(got, want, rtol=1.6e-2, atol=2e-2, msg=lambda m: f"{what}: {m}")


def _model_loss_and_grads(family, impl, device, compile=False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY[family], kernels=KernelConfig(attention="sdpa", linear=impl)).to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 320, (2, 12), generator=g).to(device)
    forward = torch.compile(model, fullgraph=True) if compile else model
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = forward(ids, labels=ids, return_logits=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check_models(family, device, compile=False, impl="fp32_wgrad"):
    loss_ref, grads_ref = _model_loss_and_grads(family, "torch", device)
    loss, grads = _model_loss_and_grads(family, impl, device, compile=compile)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-2, atol=1e-2)
    for name, g in grads.items():
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g, grads_ref[name], rtol=5e-2, atol=5e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("impl", ["fp32_wgrad", "tuned"])
@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_models_with_fp32_wgrad_match_autocast_reference(family, impl):
    _check_models(family, "cpu", impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fp32_wgrad", "tuned"])
@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_models_with_fp32_wgrad_compiled_fullgraph_gpu(family, impl):
    torch._dynamo.reset()
    _check_models(family, "cuda", compile=True, impl=impl)


def test_fp32_wgrad_traced_by_torch_compile_on_the_cpu():
    """Dynamo and AOTAutograd trace the custom autograd Function (fullgraph: no graph break)."""
    torch._dynamo.reset()
    _check_models("qwen2", "cpu", compile=True)


# -- bf16 weight copies (optimizer.bf16_weight_copy) ----------------------------------------------

COPY_KERNELS = {
    "reference": KernelConfig.reference(),
    "fp32_wgrad": KernelConfig.reference().replace(linear="fp32_wgrad"),
    "gpt2 ops": KernelConfig.reference().replace(linear="fp32_wgrad", gelu="cublaslt", cross_entropy="triton"),
    "qwen2 ops": KernelConfig.reference().replace(linear="fp32_wgrad", swiglu="fused_linear", cross_entropy="fused_linear"),
    "qwen2 recompute": KernelConfig.reference().replace(swiglu="fused_linear_recompute", cross_entropy="fused_linear"),
    "gpt2 ops tuned": KernelConfig.reference().replace(linear="tuned", gelu="cublaslt", cross_entropy="triton"),
    "qwen2 recompute tuned": KernelConfig.reference().replace(
        linear="tuned", swiglu="fused_linear_recompute", cross_entropy="fused_linear"
    ),
}


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids, return_logits=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("kernels", list(COPY_KERNELS))
def test_every_linear_reads_its_weight_copy(family, kernels):
    """With copies equal to the casts, loss and gradients are bit for bit those without copies (the
    gradients still reach the fp32 weights); a changed copy changes the loss, for every `Linear`
    (the tied head, GPT-2's MLP op and Qwen2's down projection op included): each one reads it."""
    if family == "gpt2" and kernels.startswith("qwen2") or family == "qwen2" and kernels.startswith("gpt2"):
        pytest.skip("the other family's ops")
    from src.models.components import attach_weight_copies

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY[family], kernels=COPY_KERNELS[kernels])
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
    loss, grads = _loss_and_grads(model, ids)
    assert attach_weight_copies(model) > 0
    copied_loss, copied_grads = _loss_and_grads(model, ids)
    assert torch.equal(copied_loss, loss)
    for name, grad in grads.items():
        assert copied_grads[name].dtype == torch.float32 and torch.equal(copied_grads[name], grad), name
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]
    assert linears
    for name, module in linears:
        kept = module.weight_copy.clone()
        module.weight_copy.mul_(0.5)
        changed, _ = _loss_and_grads(model, ids)
        module.weight_copy.copy_(kept)
        assert not torch.equal(changed, loss), f"{name} did not read its weight copy"
    with torch.no_grad():  # without autocast the fp32 weights, as before
        fp32 = model(ids, labels=ids).loss
        model.apply(lambda m: m.weight_copy.zero_() if isinstance(m, Linear) else None)
        assert torch.equal(model(ids, labels=ids).loss, fp32)


def test_a_weight_copy_of_another_shape_is_refused_by_name():
    from kernels.gelu_mlp import gelu_mlp
    from kernels.swiglu_linear import swiglu_linear

    gate_up = torch.randn(3, 16, dtype=torch.bfloat16)
    weight = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="swiglu_linear: weight copy \\(8, 4\\).*is not a copy of the weight \\(4, 8\\)"):
        swiglu_linear(gate_up, weight, weight_copy=torch.zeros(8, 4, dtype=torch.bfloat16))
    x = torch.randn(3, 4, requires_grad=True)
    fc, proj = torch.randn(8, 4, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="gelu_mlp: weight copy"):
        gelu_mlp(x, fc, None, proj, None, fc_weight_copy=torch.zeros(4, 8, dtype=torch.bfloat16))
