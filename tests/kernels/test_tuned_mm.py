"""`mm_out(..., tuned=True)` (kernels/tuned_mm.py): the faster of cuBLAS's pick and cuBLASLt's best.

On the CPU the op is torch's matmul (cuBLASLt is CUDA only): these tests check its schema, errors
and fallbacks there, and the picks kept across processes. The GPU tests check the picked kernels
against torch.mm in every layout our linear layers use, the cache of picks, CUDA graph capture,
torch.compile, and picks restored from an earlier process's state.
"""

import pytest
import torch

import kernels
import kernels.cublaslt as cublaslt
import kernels.tuned_mm as tuned_mm
from kernels import mm_out
from kernels.tuned_mm import mm_into, plan_into


def _operands(layout, M, N, K, device, dtype=torch.bfloat16):
    """(a, b, out dtype) as our Linear lays them out (benchmarks/probe_projection_gemms.py)."""
    if layout == "forward":  # x @ W.T, the weight read transposed
        return torch.randn(M, K, device=device, dtype=dtype), torch.randn(N, K, device=device, dtype=dtype).t(), dtype
    if layout == "input grad":  # dy @ W
        return torch.randn(M, K, device=device, dtype=dtype), torch.randn(K, N, device=device, dtype=dtype), dtype
    return torch.randn(K, M, device=device, dtype=dtype).t(), torch.randn(K, N, device=device, dtype=dtype), torch.float32


LAYOUTS = ["forward", "input grad", "weight grad fp32"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tuned_is_torch_matmul_on_the_cpu(layout):
    a, b, out_dtype = _operands(layout, 12, 10, 7, "cpu")
    torch.testing.assert_close(mm_out(a, b, out_dtype, tuned=True), mm_out(a, b, out_dtype), rtol=0, atol=0)
    assert mm_out(a, b, out_dtype, tuned=True).dtype == out_dtype


def test_the_op_schema_and_fake_on_the_cpu():
    """The registered op (what torch.compile sees) passes torch.library's checks: schema, fake
    tensor, no aliasing."""
    a, b = torch.randn(6, 5, dtype=torch.bfloat16), torch.randn(4, 5, dtype=torch.bfloat16).t()
    bias = torch.randn(4, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.kernels.tuned_mm.default, (a, b, torch.bfloat16, bias))
    torch.library.opcheck(torch.ops.kernels.tuned_mm.default, (a, b, torch.float32, None))


def test_bias_is_added_in_the_output_dtype():
    a, b = torch.randn(6, 5), torch.randn(5, 4)
    bias = torch.randn(4)
    torch.testing.assert_close(mm_out(a, b, torch.float32, tuned=True, bias=bias), a @ b + bias)


def test_bad_operands_name_the_problem():
    a, b = torch.randn(6, 5), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"a \(M, K\) @ b \(K, N\) expected, got \(6, 5\) @ \(4, 3\)"):
        mm_out(a, b, torch.float32, tuned=True)
    with pytest.raises(ValueError, match=r"a \(M, K\) @ b \(K, N\) expected"):
        mm_out(torch.randn(2, 6, 5), torch.randn(5, 3), torch.float32)
    with pytest.raises(ValueError, match=r"bias must be \(3,\), got \(4,\)"):
        mm_out(torch.randn(6, 5), torch.randn(5, 3), torch.float32, bias=torch.randn(4))
    with pytest.raises(ValueError, match="bias is torch.bfloat16 but the output torch.float32; cast the bias"):
        mm_out(torch.randn(6, 5), torch.randn(5, 3), torch.float32, bias=torch.randn(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"mm_into: a \(M, K\) @ b \(K, N\) into out \(M, N\) expected, got \(6, 5\) @ \(5, 3\) into \(3, 6\)"):
        mm_into(torch.randn(6, 5), torch.randn(5, 3), torch.empty(3, 6))
    with pytest.raises(ValueError, match="in the operands' dtype torch.float32, got torch.bfloat16; use mm_out"):
        mm_into(torch.randn(6, 5), torch.randn(5, 3), torch.empty(6, 3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="not contiguous"):
        mm_into(torch.randn(6, 5), torch.randn(5, 3), torch.empty(3, 6).t())
    with pytest.raises(ValueError, match="accumulate=True takes the DEFAULT epilogue, got BIAS"):
        cublaslt.gemm(*[torch.empty(4, 4, device="meta")] * 3, cublaslt.EPILOGUE_BIAS, accumulate=True)


# -- GPU ------------------------------------------------------------------------------------------


def _reference(a, b, out_dtype, bias=None):
    out = torch.mm(a.float(), b.float()) + (bias.float() if bias is not None else 0)
    return out.to(out_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", [(4096, 1152, 896), (2048, 4864, 896), (123, 77, 45)], ids=str)
def test_tuned_matches_torch_in_every_layout_gpu(layout, shape):
    """Both candidates compute the same GEMM in fp32: the pick, whichever it is, agrees with the
    fp32 math of the same operands to bf16 (fp32) rounding, and is remembered for the key."""
    M, N, K = shape if layout != "weight grad fp32" else (shape[1], shape[2], shape[0])
    a, b, out_dtype = _operands(layout, M, N, K, "cuda")
    tuned_mm._picks.clear()
    out = mm_out(a, b, out_dtype, tuned=True)
    assert out.shape == (M, N) and out.dtype == out_dtype and out.is_contiguous()
    # fp32 outputs: sums of K products of unit normals, |out| ~ sqrt(K); another summation order
    # (split-K) moves them by ~sqrt(K) * |out| * 2^-24, 2.5e-4 at K = 4096 (seen on an H100)
    tol = dict(rtol=1e-5, atol=K**0.5 * 2.5e-5) if out_dtype == torch.float32 else dict(rtol=1.6e-2, atol=2e-2)
    torch.testing.assert_close(out, _reference(a, b, out_dtype), **tol)
    assert list(tuned_mm._picks.values()) in (["torch"], ["cublaslt"])
    again = mm_out(a, b, out_dtype, tuned=True)  # the cached pick: the same kernel, the same bits
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    assert len(tuned_mm._picks) == 1


@pytest.mark.gpu
def test_tuned_with_bias_gpu():
    a, b, _ = _operands("forward", 1024, 1152, 896, "cuda")
    bias = torch.randn(1152, device="cuda", dtype=torch.bfloat16)
    out = mm_out(a, b, torch.bfloat16, tuned=True, bias=bias)
    torch.testing.assert_close(out, _reference(a, b, torch.bfloat16, bias), rtol=1.6e-2, atol=3e-2)


@pytest.mark.gpu
def test_each_candidate_computes_the_gemm_gpu():
    """The two candidates the op times, each forced: both agree with fp32 math (a pick cannot
    trade correctness for speed)."""
    a, b, out_dtype = _operands("input grad", 2048, 4864, 896, "cuda")
    expected = _reference(a, b, out_dtype)
    for candidate in (tuned_mm._torch_mm, tuned_mm._cublaslt_mm):
        torch.testing.assert_close(candidate(a, b, out_dtype, None), expected, rtol=1.6e-2, atol=2e-2)


@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_into_is_torch_on_the_cpu(accumulate):
    a, b = torch.randn(9, 5, dtype=torch.bfloat16), torch.randn(7, 5, dtype=torch.bfloat16).t()
    start = torch.randn(9, 7, dtype=torch.bfloat16)
    out = start.clone()
    assert mm_into(a, b, out, accumulate=accumulate) is out
    torch.testing.assert_close(out, torch.addmm(start, a, b) if accumulate else torch.mm(a, b), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("accumulate", [False, True])
def test_mm_into_either_pick_computes_the_gemm_gpu(fresh_picks, accumulate):
    """Both candidates of `mm_into`, forced, in the fused loss's layouts (logits: a weight read
    transposed; dW: a transposed view of the gradient chunk), against fp32 math; and the timed pick,
    whose first (timing) call must add the product once."""
    torch.manual_seed(0)
    h, w = torch.randn(256, 96, device="cuda", dtype=torch.bfloat16), torch.randn(1000, 96, device="cuda", dtype=torch.bfloat16)
    grads = torch.randn(256, 1000, device="cuda", dtype=torch.bfloat16)
    for a, b in ((h, w.t()), (grads.t(), h)):
        start = torch.randn(a.shape[0], b.shape[1], device="cuda", dtype=torch.bfloat16)
        expected = (start.float() if accumulate else 0) + a.float() @ b.float()
        for forced in ("torch", "cublaslt", None):
            tuned_mm._picks.clear()
            if forced:
                tuned_mm._picks[tuned_mm._into_key(a, b, start, accumulate)] = forced
            out = mm_into(a, b, start.clone(), accumulate=accumulate)
            torch.testing.assert_close(out.float(), expected, rtol=1.6e-2, atol=0.25, msg=f"pick {forced}")


@pytest.mark.gpu
def test_plan_into_spares_the_accumulating_copy_gpu(fresh_picks, monkeypatch):
    """After `plan_into` on a scratch buffer, an accumulating `mm_into` of that key copies nothing
    (no 272 MB copy of Qwen2's weight gradient at the first step) and adds the product once."""
    torch.manual_seed(0)
    grads, h = torch.randn(512, 3000, device="cuda", dtype=torch.bfloat16), torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    dweight = torch.empty(3000, 64, device="cuda", dtype=torch.bfloat16)
    plan_into(grads.t(), h, dweight, accumulate=True)
    start = torch.randn_like(dweight)
    dweight.copy_(start)
    monkeypatch.setattr(torch.Tensor, "clone", lambda *args, **kwargs: pytest.fail("mm_into copied its output"))
    mm_into(grads.t(), h, dweight, accumulate=True)
    torch.testing.assert_close(dweight.float(), start.float() + grads.t().float() @ h.float(), rtol=1.6e-2, atol=0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cublaslt_accumulate_adds_the_product_once_gpu(out_dtype):
    """`cublaslt.gemm(..., accumulate=True)`: out += a @ b, once, also on the call that plans the key
    (its candidates are timed on a copy of out, not on out), in the fused loss's dW layout (a
    transposed view)."""
    torch.manual_seed(0)
    grads = torch.randn(1024, 300, device="cuda", dtype=torch.bfloat16)
    a, b = grads.t(), torch.randn(1024, 200, device="cuda", dtype=torch.bfloat16)  # (300, 1024) @ (1024, 200)
    start = torch.randn(300, 200, device="cuda", dtype=out_dtype)
    out = start.clone()
    for step in (1, 2):  # the planning call, then the planned one
        cublaslt.gemm(a, b, out, accumulate=True)
        expected = start.float() + step * (a.float() @ b.float())
        torch.testing.assert_close(out.float(), expected, rtol=1.6e-2, atol=0.25 if out_dtype == torch.bfloat16 else 1e-2)


@pytest.mark.gpu
def test_the_library_version_is_read_on_a_gpu():
    version = cublaslt.library_version()
    assert isinstance(version, int) and version >= 110000, version  # e.g. 130100 for cuBLAS 13.1
    assert kernels.gemm_picks_state()["cublaslt_version"] == version


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_gemm_of_another_gpu_runs_on_that_gpu_gpu():
    """Tensors on cuda:1 while cuda:0 is current: computed on cuda:1 (cuBLASLt runs on the current
    device's context, so the call switches to the tensors' device, as torch's matmul does)."""
    a = torch.randn(256, 128, device="cuda:1", dtype=torch.bfloat16)
    b = torch.randn(128, 192, device="cuda:1", dtype=torch.bfloat16)
    out = torch.empty(256, 192, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0):
        cublaslt.gemm(a, b, out)
    torch.testing.assert_close(out.float(), a.float() @ b.float(), rtol=1.6e-2, atol=0.1)
    with pytest.raises(ValueError, match="operands on several devices"):
        cublaslt.gemm(a.to("cuda:0"), b, out)


def _captured(fn):
    """(graph, fn's output) with fn captured in a CUDA graph on a side stream."""
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        out = fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph, out


@pytest.mark.gpu
def test_a_key_first_seen_in_a_cuda_graph_capture_runs_torch_and_is_not_remembered_gpu():
    a, b, out_dtype = _operands("forward", 512, 384, 256, "cuda")
    tuned_mm._picks.clear()
    graph, out = _captured(lambda: mm_out(a, b, out_dtype, tuned=True))
    assert not tuned_mm._picks
    a.copy_(torch.randn_like(a))
    graph.replay()
    torch.testing.assert_close(out, _reference(a, b, out_dtype), rtol=1.6e-2, atol=2e-2)


@pytest.mark.gpu
def test_a_key_timed_before_capture_replays_its_pick_in_a_cuda_graph_gpu():
    a, b, out_dtype = _operands("input grad", 1024, 4864, 896, "cuda")
    tuned_mm._picks.clear()
    mm_out(a, b, out_dtype, tuned=True)  # timed here, as torch.compile's CUDA graphs warm up first
    graph, out = _captured(lambda: mm_out(a, b, out_dtype, tuned=True))
    b.copy_(torch.randn_like(b))
    graph.replay()
    torch.testing.assert_close(out, _reference(a, b, out_dtype), rtol=1.6e-2, atol=2e-2)


@pytest.mark.gpu
def test_compiled_fullgraph_gpu():
    torch._dynamo.reset()
    a, b, _ = _operands("forward", 1024, 768, 512, "cuda")
    bias = torch.randn(768, device="cuda", dtype=torch.bfloat16)
    fn = torch.compile(lambda a, b, bias: torch.relu(mm_out(a, b, torch.bfloat16, tuned=True, bias=bias)), fullgraph=True)
    torch.testing.assert_close(fn(a, b, bias), torch.relu(_reference(a, b, torch.bfloat16, bias)), rtol=1.6e-2, atol=3e-2)


# -- picks kept across processes (a checkpoint's `gemm_picks`) --------------------------------------


@pytest.fixture
def fresh_picks():
    """Empty pick tables, as in a new process; the module's tables are put back afterwards."""
    tables = (tuned_mm._picks, tuned_mm._saved, cublaslt._plans, cublaslt._chosen, cublaslt._saved_algos)
    saved = [dict(table) for table in tables]
    saved_version = cublaslt._saved_version
    for table in tables:
        table.clear()
    cublaslt._saved_version = None
    yield
    for table, before in zip(tables, saved):
        table.clear()
        table.update(before)
    cublaslt._saved_version = saved_version


def test_a_restored_pick_is_taken_for_its_key_untimed(fresh_picks, monkeypatch):
    """A pick from an earlier process's state (by key string) is used for that key without timing,
    and is part of this process's state again (a second checkpoint keeps it)."""
    a, b, out_dtype = _operands("forward", 12, 10, 7, "cpu")
    key = tuned_mm._key(a, b, out_dtype, None)
    name = cublaslt.key_str(key)
    assert name.startswith("(12, 7)|(7, 1)|(7, 10)|(1, 7)|bfloat16|bfloat16|None|") and name.endswith("|cpu")
    assert kernels.restore_gemm_picks({"format": 1, "tuned_mm": {name: "cublaslt"}, "cublaslt": {}}) == 1
    monkeypatch.setattr(cublaslt, "time_ms", lambda fn: pytest.fail("a restored key was timed"))
    never = lambda: pytest.fail("a restored key ran a candidate")  # noqa: E731
    assert tuned_mm._pick(key, never, never) == "cublaslt"
    expected_version = cublaslt.library_version()  # None on the CPU
    assert kernels.gemm_picks_state() == {
        "format": 1, "tuned_mm": {name: "cublaslt"}, "cublaslt": {}, "cublaslt_version": expected_version
    }  # fmt: skip


def test_cublaslt_picks_of_another_library_version_are_timed_again(fresh_picks, monkeypatch):
    """Candidate indices name kernels in one library version's heuristic list: picks saved with
    another version are not taken (a warning says so), while the tuned_mm half still is."""
    monkeypatch.setattr(cublaslt, "library_version", lambda: 130200)
    state = {"format": 1, "tuned_mm": {"k": "cublaslt"}, "cublaslt": {"k": [2, 8]}, "cublaslt_version": 130100}
    with pytest.warns(UserWarning, match="timed with cuBLASLt 130100, this process runs 130200"):
        assert kernels.restore_gemm_picks(state) == 1
    assert tuned_mm._saved == {"k": "cublaslt"} and not cublaslt._saved_algos


def test_cublaslt_picks_of_the_same_or_an_unrecorded_version_are_taken(fresh_picks, monkeypatch):
    monkeypatch.setattr(cublaslt, "library_version", lambda: 130100)
    assert kernels.restore_gemm_picks({"format": 1, "cublaslt": {"k": [2, 8]}, "cublaslt_version": 130100}) == 1
    assert cublaslt._saved_algos == {"k": [2, 8]} and cublaslt._saved_version == 130100
    # Checkpoints written before the version was recorded: taken as before (the count still guards).
    assert kernels.restore_gemm_picks({"format": 1, "cublaslt": {"j": [0, 4]}}) == 1
    assert cublaslt._saved_algos == {"k": [2, 8], "j": [0, 4]}
    # Without CUDA, the picks are saved again under the version they came with.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert kernels.gemm_picks_state()["cublaslt_version"] == 130100


def test_a_gpu_build_without_cublaslt_saves_its_picks_without_a_version(fresh_picks, monkeypatch):
    """A checkpoint on a GPU whose PyTorch has no libcublasLt (ROCm) still saves its picks."""
    def missing():
        raise cublaslt.CublasLtUnsupported("cuBLASLt: libcublasLt is not loaded by PyTorch and not on the library path")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cublaslt, "_library", missing)
    assert cublaslt.library_version() is None
    assert kernels.gemm_picks_state()["cublaslt_version"] is None


def test_a_library_version_of_another_type_is_refused(fresh_picks):
    with pytest.raises(ValueError, match="cublaslt_version must be an int or null, got '13.1'"):
        kernels.restore_gemm_picks({"format": 1, "tuned_mm": {"k": "torch"}, "cublaslt": {}, "cublaslt_version": "13.1"})
    assert not tuned_mm._saved and not cublaslt._saved_algos


def test_picks_of_another_form_are_refused_by_name(fresh_picks):
    with pytest.raises(ValueError, match="GEMM picks of format 7, expected 1"):
        kernels.restore_gemm_picks({"format": 7})
    with pytest.raises(ValueError, match="GEMM picks of format 'list', expected 1"):
        kernels.restore_gemm_picks([])
    with pytest.raises(ValueError, match=r"tuned_mm picks: expected \{key: one of \('torch', 'cublaslt'\)\}"):
        kernels.restore_gemm_picks({"format": 1, "tuned_mm": {"k": "fastest"}})
    with pytest.raises(ValueError, match=r"cuBLASLt picks: expected \{key: \[candidate index, candidate count\]\}"):
        kernels.restore_gemm_picks({"format": 1, "cublaslt": {"k": [8, 8]}})
    assert not tuned_mm._saved and not cublaslt._saved_algos


def test_a_refused_state_restores_neither_half(fresh_picks):
    """A valid tuned_mm half beside an invalid cuBLASLt half: the error, and nothing restored (the
    trainer then says the picks are unusable and times again; half of them in effect would be a
    third state, neither the saved run's kernels nor freshly timed ones)."""
    with pytest.raises(ValueError, match="cuBLASLt picks"):
        kernels.restore_gemm_picks({"format": 1, "tuned_mm": {"k": "cublaslt"}, "cublaslt": {"k": [9, 8]}})
    assert not tuned_mm._saved and not cublaslt._saved_algos


def test_restored_picks_not_used_yet_are_saved_again(fresh_picks):
    """A key restored but not seen before the next checkpoint (a shape of evaluation only) keeps its
    pick in that checkpoint, instead of being timed again after the resume after it."""
    state = {"format": 1, "tuned_mm": {"eval-key": "cublaslt"}, "cublaslt": {"eval-key": [2, 8]},
             "cublaslt_version": cublaslt.library_version()}  # fmt: skip
    kernels.restore_gemm_picks(state)
    assert kernels.gemm_picks_state() == state


def test_an_operand_cublaslt_cannot_take_falls_back_to_torch():
    """An expanded gradient (stride 0, from a .sum()) is no row- or column-major matrix: cuBLASLt
    reports it unsupported, which makes the tuned GEMM pick torch's matmul, not a crash."""
    expanded = torch.ones(1, 1).expand(6, 8)
    with pytest.raises(cublaslt.CublasLtUnsupported, match="neither row- nor column-major"):
        cublaslt._operand(expanded)


@pytest.mark.gpu
def test_restored_picks_run_the_same_kernels_untimed_gpu(fresh_picks, monkeypatch):
    """Picks timed in one 'process', saved, and restored into empty tables: every GEMM (each layout,
    a bias epilogue, and a GELU epilogue planned by cuBLASLt alone) runs untimed and gives the same
    bits, so it ran the same kernel."""
    cases = [_operands(layout, 2048, 4864, 896, "cuda") + (None,) for layout in LAYOUTS]
    a, b, _ = _operands("forward", 1024, 1152, 896, "cuda")
    cases.append((a, b, torch.bfloat16, torch.randn(1152, device="cuda", dtype=torch.bfloat16)))
    first = [mm_out(a, b, out_dtype, tuned=True, bias=bias) for a, b, out_dtype, bias in cases]
    aux = torch.empty(1024, 1152, device="cuda", dtype=torch.bfloat16)
    gelu = cublaslt.gemm(a, b, torch.empty_like(aux), cublaslt.EPILOGUE_GELU_AUX, aux=aux)
    state = kernels.gemm_picks_state()
    assert len(state["tuned_mm"]) == 4 and len(state["cublaslt"]) >= 1

    for table in (tuned_mm._picks, cublaslt._plans, cublaslt._chosen):  # a new process
        table.clear()
    assert kernels.restore_gemm_picks(state) == len(state["tuned_mm"]) + len(state["cublaslt"])
    monkeypatch.setattr(cublaslt, "time_ms", lambda fn: pytest.fail("a restored key was timed"))
    again = [mm_out(a, b, out_dtype, tuned=True, bias=bias) for a, b, out_dtype, bias in cases]
    for out, out_again in zip(first, again):
        torch.testing.assert_close(out_again, out, rtol=0, atol=0)
    aux_again = torch.empty_like(aux)
    gelu_again = cublaslt.gemm(a, b, torch.empty_like(aux), cublaslt.EPILOGUE_GELU_AUX, aux=aux_again)
    torch.testing.assert_close(gelu_again, gelu, rtol=0, atol=0)
    after = kernels.gemm_picks_state()  # cuBLASLt planned only the keys it ran: the saved picks again
    assert after["tuned_mm"] == state["tuned_mm"]
    assert after["cublaslt"] and all(state["cublaslt"][k] == v for k, v in after["cublaslt"].items())


@pytest.mark.gpu
def test_a_restored_accumulating_pick_copies_nothing_gpu(fresh_picks, monkeypatch):
    """An accumulating key restored from a checkpoint runs its saved kernel untimed, so it needs no
    copy of its output (the fused loss's weight gradient) to time on, and adds the product once."""
    torch.manual_seed(0)
    grads, h = torch.randn(512, 3000, device="cuda", dtype=torch.bfloat16), torch.randn(512, 64, device="cuda", dtype=torch.bfloat16)
    dweight = torch.randn(3000, 64, device="cuda", dtype=torch.bfloat16)
    mm_into(grads.t(), h, dweight, accumulate=True)  # timed, on a copy
    state = kernels.gemm_picks_state()
    for table in (tuned_mm._picks, cublaslt._plans, cublaslt._chosen):  # a new process
        table.clear()
    kernels.restore_gemm_picks(state)
    start = dweight.clone()
    monkeypatch.setattr(torch.Tensor, "clone", lambda *args, **kwargs: pytest.fail("mm_into copied its output"))
    monkeypatch.setattr(cublaslt, "time_ms", lambda fn: pytest.fail("a restored key was timed"))
    mm_into(grads.t(), h, dweight, accumulate=True)
    torch.testing.assert_close(dweight.float(), start.float() + grads.t().float() @ h.float(), rtol=1.6e-2, atol=0.25)
