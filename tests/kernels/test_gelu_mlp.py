"""GPT-2's MLP through cuBLASLt's GELU epilogues (`gelu_mlp`) against `gelu_mlp_ref`.

On the CPU the op computes its math unfused in PyTorch (cuBLASLt is CUDA only): these tests check
the op's autograd wiring, dtypes and errors there. The GPU tests check the epilogue GEMMs
themselves against the reference, and that they ran rather than the fallback.
"""

import pytest
import torch

import kernels
import kernels.cublaslt as cublaslt
from kernels.gelu_mlp import gelu_mlp
from src.models.components.mlp import GeluMLP, gelu_mlp_ref

from .helpers import DEVICE, assert_close, leaf


def _inputs(tokens, D, H, dtype, bias=True, weight_dtype=None):
    wdt = weight_dtype or dtype
    x = torch.randn(*tokens, D, device=DEVICE, dtype=dtype)
    fc_w = (torch.randn(H, D, device=DEVICE) * D**-0.5).to(wdt)
    fc_b = (torch.randn(H, device=DEVICE) * 0.5).to(wdt) if bias else None
    proj_w = (torch.randn(D, H, device=DEVICE) * H**-0.5).to(wdt)
    proj_b = (torch.randn(D, device=DEVICE) * 0.5).to(wdt) if bias else None
    dy = torch.randn(*tokens, D, device=DEVICE, dtype=dtype)
    return [x, fc_w, fc_b, proj_w, proj_b], dy


def _run(fn, args, dy, autocast_dtype=None):
    args = [leaf(a) if a is not None else None for a in args]
    with torch.autocast(DEVICE, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        y = fn(*args)
    y.backward(dy)
    return [y] + [a.grad for a in args if a is not None]


NAMES = ("y", "dx", "dfc_weight", "dfc_bias", "dproj_weight", "dproj_bias")


def _compare(args, dy, tol_dtype, autocast_dtype=None):
    got = _run(gelu_mlp, args, dy, autocast_dtype)
    want = _run(gelu_mlp_ref, args, dy, autocast_dtype)
    names = NAMES if args[2] is not None else ("y", "dx", "dfc_weight", "dproj_weight")
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        assert_close(g, w, tol_dtype, name)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(
    "tokens, D, H", [((2, 16), 24, 96), ((1,), 8, 40), ((3, 7), 123, 50)], ids=["batch", "single-row", "odd-widths"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(tokens, D, H, bias, dtype):
    args, dy = _inputs(tokens, D, H, dtype, bias=bias)
    _compare(args, dy, dtype)


@pytest.mark.parametrize(
    "tokens, D, H", [((2, 16), 24, 96), ((1,), 8, 40), ((3, 7), 123, 50)], ids=["batch", "single-row", "odd-widths"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_gradient_from_a_column_of_ones_matches_reference(tokens, D, H, dtype):
    """The fc bias gradient from the weight-gradient GEMM's column of ones (the GPU default),
    forced on here: the same gradients, x's included (it reaches x through x_ext's first D
    columns)."""
    args, dy = _inputs(tokens, D, H, dtype)
    got = _run(lambda *a: gelu_mlp(*a, ones_column=True), args, dy)
    want = _run(gelu_mlp_ref, args, dy)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype, w.dtype)
        assert_close(g, w, dtype, name)


def test_column_of_ones_with_fp32_master_weights_and_compiled():
    args, dy = _inputs((4, 8), 32, 64, torch.float32)
    mlp = torch.compile(lambda *a: gelu_mlp(*a, ones_column=True), fullgraph=True)
    got = _run(mlp, args, dy.to(torch.bfloat16), torch.bfloat16)
    want = _run(gelu_mlp_ref, args, dy.to(torch.bfloat16), torch.bfloat16)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert_close(g, w, torch.bfloat16, name)


def test_column_of_ones_needs_a_bias_and_is_off_on_the_cpu(monkeypatch):
    import kernels.gelu_mlp as gelu_mlp_module

    seen = []  # the x_ext each forward was given
    fwd = gelu_mlp_module._gelu_mlp_fwd
    monkeypatch.setattr(gelu_mlp_module, "_gelu_mlp_fwd", lambda x, x_ext, *a: seen.append(x_ext) or fwd(x, x_ext, *a))
    args, _ = _inputs((2, 5), 16, 32, torch.float32)
    gelu_mlp(*[leaf(a) for a in args])  # auto: the fused GEMMs do not run here, so neither does this
    no_bias, _ = _inputs((2, 5), 16, 32, torch.float32, bias=False)
    gelu_mlp(*[leaf(a) if a is not None else None for a in no_bias], ones_column=True)  # nothing to sum
    gelu_mlp(*[leaf(a) for a in args], ones_column=True)
    assert seen[0] is None and seen[1] is None
    assert seen[2].shape == (10, 16 + kernels.ONES_COLUMN_PAD)
    assert torch.equal(seen[2][:, 16].cpu(), torch.ones(10)) and not seen[2][:, 17:].any()


def test_rows_keep_a_row_stride_and_copy_only_layouts_without_one():
    from kernels.gelu_mlp import _rows

    x_ext = torch.randn(6, 16 + 8)
    view = _rows(x_ext[:, :16], 16)
    assert view.data_ptr() == x_ext.data_ptr() and view.stride() == (24, 1)  # no copy
    expanded = torch.randn(1, 16).expand(6, 16)  # every row the same memory
    rows = _rows(expanded, 16)
    assert rows.is_contiguous() and torch.equal(rows, expanded)


def _run_expanded(fn, args, dy, rows):
    """fn on args whose x, one token (1, D), is broadcast to `rows` rows that share its memory."""
    leaves = [leaf(a) if a is not None else None for a in args]
    y = fn(leaves[0].expand(rows, leaves[0].shape[-1]), *leaves[1:])
    y.backward(dy)
    return [y] + [t.grad for t in leaves if t is not None]


def _compare_expanded(rows, D, H, dtype):
    args, dy = _inputs((rows,), D, H, dtype)
    args[0] = args[0][:1]
    got = _run_expanded(lambda *a: gelu_mlp(*a, ones_column=False), args, dy, rows)
    got_ones = _run_expanded(lambda *a: gelu_mlp(*a, ones_column=True), args, dy, rows)
    want = _run_expanded(gelu_mlp_ref, args, dy, rows)
    for name, g, o, w in zip(NAMES, got, got_ones, want):
        assert_close(g, w, dtype, name)
        assert_close(o, w, dtype, name)


def test_expanded_input_matches_reference():
    _compare_expanded(5, 16, 32, torch.float32)


def test_fp32_master_weights_under_autocast_get_fp32_gradients():
    args, dy = _inputs((4, 8), 32, 64, torch.float32)
    got = _run(gelu_mlp, args, dy.to(torch.bfloat16), torch.bfloat16)
    want = _run(gelu_mlp_ref, args, dy.to(torch.bfloat16), torch.bfloat16)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert_close(g, w, torch.bfloat16, name)


def test_expanded_gradient_from_sum():
    args, _ = _inputs((3, 5), 16, 32, torch.float32)
    got = [leaf(a) for a in args]
    want = [leaf(a) for a in args]
    gelu_mlp(*got).sum().backward()  # dy arrives as an expanded, stride-0 tensor
    gelu_mlp_ref(*want).sum().backward()
    for name, g, w in zip(NAMES[1:], got, want):
        assert_close(g.grad, w.grad, torch.float32, name)


def test_compiles_fullgraph():
    args, dy = _inputs((2, 6), 16, 32, torch.float32)
    compiled = torch.compile(gelu_mlp, fullgraph=True)
    got = _run(compiled, args, dy)
    want = _run(gelu_mlp_ref, args, dy)
    for name, g, w in zip(NAMES, got, want):
        assert_close(g, w, torch.float32, name)


def test_without_gradients_the_op_is_not_called(monkeypatch):
    """Evaluation and generation take the unfused math: no pre-activation written for a backward
    that never comes."""
    import kernels.gelu_mlp as gelu_mlp_module

    def fail(*args):
        raise AssertionError("the fused op ran without a gradient to compute")

    monkeypatch.setattr(gelu_mlp_module, "_gelu_mlp_fwd", fail)
    args, _ = _inputs((2, 5), 16, 32, torch.float32)
    with torch.no_grad():
        assert_close(gelu_mlp(*args), gelu_mlp_ref(*args), torch.float32, "no_grad")
    assert_close(gelu_mlp(*args), gelu_mlp_ref(*args), torch.float32, "no input requires grad")


def test_bad_shapes_name_the_problem():
    args, _ = _inputs((2,), 16, 32, torch.float32)
    args[3] = args[3][:, :31]  # proj_weight (D, H - 1)
    with pytest.raises(ValueError, match="gelu_mlp: x .* disagree"):
        gelu_mlp(*args)


def test_module_refuses_an_activation_it_does_not_compute():
    with pytest.raises(ValueError, match="tanh-approximated GELU.*kernels.gelu=torch"):
        GeluMLP(16, 64, activation="gelu", impl="cublaslt")
    with pytest.raises(ValueError, match="kernels.gelu: 'triton' is not available"):
        GeluMLP(16, 64, impl="triton")


def test_module_matches_the_unfused_module():
    torch.manual_seed(0)
    ref = GeluMLP(24, 96).to(DEVICE)
    fused = GeluMLP(24, 96, impl="cublaslt").to(DEVICE)
    fused.load_state_dict(ref.state_dict())  # same parameters and names: checkpoints are unchanged
    x = torch.randn(3, 10, 24, device=DEVICE)
    ref(x).square().sum().backward()
    fused(x).square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert_close(q.grad, p.grad, torch.float32, name)


@pytest.mark.gpu
def test_gemm_rejects_cpu_tensors_and_mismatched_epilogue_arguments():
    a = torch.randn(4, 8, dtype=torch.bfloat16)
    with pytest.raises(cublaslt.CublasLtUnsupported, match="CUDA tensors only"):
        cublaslt.gemm(a, a.t(), torch.empty(4, 4, dtype=torch.bfloat16))
    a = a.cuda()
    with pytest.raises(ValueError, match="GELU_AUX_BIAS got aux=False"):
        cublaslt.gemm(a, a.t(), torch.empty(4, 4, dtype=torch.bfloat16, device="cuda"), cublaslt.EPILOGUE_GELU_AUX_BIAS)


@pytest.mark.gpu
@pytest.mark.parametrize("ones_column", [None, False], ids=["ones-column", "bgradb"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("M, D, H", [(16384, 768, 3072), (1000, 120, 344), (1, 8, 16)], ids=["gpt2", "odd", "one-row"])
def test_epilogues_run_and_match_reference_gpu(M, D, H, bias, ones_column, monkeypatch):
    fused_calls = []
    gemm = cublaslt.gemm

    def counting_gemm(*a, **k):
        out = gemm(*a, **k)  # raises CublasLtUnsupported when the fallback would run
        fused_calls.append(a[3] if len(a) > 3 else k.get("epilogue"))
        return out

    monkeypatch.setattr(cublaslt, "gemm", counting_gemm)
    args, dy = _inputs((M,), D, H, torch.bfloat16, bias=bias)
    got = _run(lambda *a: gelu_mlp(*a, ones_column=ones_column), args, dy)
    want = _run(gelu_mlp_ref, args, dy)
    for name, g, w in zip(NAMES if bias else ("y", "dx", "dfc_weight", "dproj_weight"), got, want):
        assert_close(g, w, torch.bfloat16, name)
    if bias and ones_column is None:  # the default on a GPU: the bias gradient from the column of ones
        want = [cublaslt.EPILOGUE_GELU_AUX_BIAS, cublaslt.EPILOGUE_DGELU]
    elif bias:
        want = [cublaslt.EPILOGUE_GELU_AUX_BIAS, cublaslt.EPILOGUE_DGELU, cublaslt.EPILOGUE_BGRAD_OF_A]
    else:
        want = [cublaslt.EPILOGUE_GELU_AUX, cublaslt.EPILOGUE_DGELU]
    assert fused_calls == want, fused_calls


@pytest.mark.gpu
def test_expanded_input_gpu():
    """An input whose rows share memory reaches the GEMMs as a copy, not as a layout they reject."""
    _compare_expanded(64, 32, 128, torch.bfloat16)


@pytest.mark.gpu
def test_fp32_master_weights_real_size_gpu():
    args, dy = _inputs((8, 2048), 768, 3072, torch.float32)
    got = _run(gelu_mlp, args, dy.to(torch.bfloat16), torch.bfloat16)
    want = _run(gelu_mlp_ref, args, dy.to(torch.bfloat16), torch.bfloat16)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert_close(g, w, torch.bfloat16, name)


@pytest.mark.gpu
def test_compiled_and_cuda_graphed_gpu():
    """Inside a compiled graph replayed as a CUDA graph (the optimized configuration)."""
    args, dy = _inputs((4, 512), 128, 512, torch.bfloat16)
    leaves = [leaf(a) for a in args]
    step = torch.compile(lambda *a: gelu_mlp(*a), fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # warm-up, record, replay
        for t in leaves:
            t.grad = None
        y = step(*leaves)
        y.backward(dy)
    want = _run(gelu_mlp_ref, args, dy)
    for name, g, w in zip(NAMES, [y] + [t.grad for t in leaves], want):
        assert_close(g, w, torch.bfloat16, name)

