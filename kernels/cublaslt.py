"""cuBLASLt matmuls with a fused epilogue, called through ctypes (no compiled extension).

cuBLAS fuses a few activations into its GEMMs' epilogues: the epilogue runs on the fp32
accumulator while the tile is still in registers, inside cuBLAS's warp-specialized Hopper
kernels, so it overlaps the next tile's matmul instead of costing a pass over memory. PyTorch
exposes the forward GELU only (`torch._addmm_activation`, without the pre-activation a backward
needs) and none of the backward epilogues, so this module calls the library itself:

    GELU_AUX_BIAS   D = gelu_tanh(A @ B + bias), and the pre-activation A @ B + bias to `aux`
    GELU_AUX        the same without a bias
    DGELU_BGRAD     D = (A @ B) * gelu_tanh'(aux), and the bias gradient sum over rows of D
    DGELU           the same without the bias gradient
    BGRAD_OF_A      D = A @ B, and the sum of A over its K columns (M,): a weight-gradient GEMM
                    dW = dY.T @ X that also writes the bias gradient, the sum of dY over tokens

and `accumulate=True`: D = A @ B + D (beta = 1: D read once in the epilogue; an activation
epilogue would apply to that sum, so only DEFAULT accumulates here: the fused loss's weight gradient).

(GELU here is the tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GPT-2's
`gelu_new`.) `gemm` takes row-major PyTorch tensors, `out = a @ b` with a (M, K), b (K, N) and
out (M, N); an operand may be a transposed view (`w.t()`), which becomes cuBLAS's transpose flag.
Column-major cuBLAS computes out^T = b^T a^T, so its m is our N: the bias and the bias gradient
run along N (the features), as a linear layer's do.

The library is the one PyTorch itself loaded (found in the process's memory map after the first
CUDA matmul), so versions cannot mix. Descriptors and the algorithm are cached per shape, layout,
dtype, epilogue and alignment; the first call of each times the heuristic's candidates and keeps
the fastest (as PyTorch's TunableOp does for plain GEMMs). The candidates differ in summation
order, so a restarted process could keep another one and round differently: `picks_state` gives
the candidate chosen for each key (its place in the heuristic's list, which is the same for the same
problem, library and GPU), a checkpoint stores them with the library's version (`picks_version`),
and `restore_picks` makes a resumed process take the same ones without timing where that version
is its own (the Trainer does both). A call sets the pointers and launches
on PyTorch's current stream with a workspace from PyTorch's allocator, so it can be captured in a
CUDA graph. Every status is checked; a configuration the library has no kernel for raises
`CublasLtUnsupported`, which callers catch to fall back to the unfused PyTorch path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import warnings

import torch

# cublasLtEpilogue_t
EPILOGUE_DEFAULT = 1
EPILOGUE_BIAS = 4
EPILOGUE_GELU_AUX = 160
EPILOGUE_GELU_AUX_BIAS = 164
EPILOGUE_DGELU = 192
EPILOGUE_DGELU_BGRAD = 208
EPILOGUE_BGRAD_OF_A = 512  # cuBLAS's BGRADB: its B is our a (see `gemm`)
_NAMES = {
    1: "DEFAULT", 4: "BIAS", 160: "GELU_AUX", 164: "GELU_AUX_BIAS", 192: "DGELU", 208: "DGELU_BGRAD", 512: "BGRAD_OF_A",
}  # fmt: skip
_WITH_AUX = (EPILOGUE_GELU_AUX, EPILOGUE_GELU_AUX_BIAS, EPILOGUE_DGELU, EPILOGUE_DGELU_BGRAD)
_WITH_BIAS = (EPILOGUE_BIAS, EPILOGUE_GELU_AUX_BIAS, EPILOGUE_DGELU_BGRAD, EPILOGUE_BGRAD_OF_A)

# cublasLtMatmulDescAttributes_t, cublasLtMatmulPreferenceAttributes_t
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_DESC_AUX_POINTER, _DESC_AUX_LD, _DESC_BIAS_DATA_TYPE = 11, 12, 26
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_MIN_ALIGNMENT = (5, 6, 7, 8)  # A, B, C, D
_COMPUTE_32F = 68  # cublasComputeType_t
_CUDA_TYPES = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 14}  # cudaDataType_t
_OP_N, _OP_T = 0, 1
_WORKSPACE_BYTES = 32 * 1024 * 1024  # what cuBLAS asks for on Hopper
_HEURISTIC_BYTES = 96  # sizeof(cublasLtMatmulHeuristicResult_t): algo (64), workspaceSize, state, wavesCount, reserved[4]
_CANDIDATES = 8  # algorithms asked of the heuristic and timed once per plan


class CublasLtUnsupported(RuntimeError):
    """cuBLASLt has no kernel for this configuration (the caller falls back to unfused PyTorch)."""


_lock = threading.Lock()
_lib = None
_handles: dict[int, ctypes.c_void_p] = {}
_plans: dict[tuple, tuple | str] = {}  # a str: why cuBLASLt has no kernel for that key
_chosen: dict[tuple, list[int]] = {}  # key -> [the plan's index among the heuristic's candidates, how many]
_saved_algos: dict[str, list[int]] = {}  # key_str -> [index, count] from a checkpoint (`restore_picks`)
_saved_version: int | None = None  # the library version those were timed with, where the checkpoint said


def _find_library() -> str:
    """Path of the libcublasLt PyTorch loaded, from /proc/self/maps (after a CUDA matmul)."""
    torch.mm(torch.ones(8, 8, device="cuda", dtype=torch.bfloat16), torch.ones(8, 8, device="cuda", dtype=torch.bfloat16))
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "libcublasLt.so" in path:
                    return path
    except OSError:
        pass
    found = ctypes.util.find_library("cublasLt")
    if found is None:
        raise CublasLtUnsupported("cuBLASLt: libcublasLt is not loaded by PyTorch and not on the library path")
    return found


def _library() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(_find_library())
        p, i64, u64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int
        for name, args in {
            "cublasLtCreate": [ctypes.POINTER(p)],
            "cublasLtMatmulDescCreate": [ctypes.POINTER(p), i32, i32],
            "cublasLtMatmulDescSetAttribute": [p, i32, p, ctypes.c_size_t],
            "cublasLtMatrixLayoutCreate": [ctypes.POINTER(p), i32, u64, u64, i64],
            "cublasLtMatmulPreferenceCreate": [ctypes.POINTER(p)],
            "cublasLtMatmulPreferenceSetAttribute": [p, i32, p, ctypes.c_size_t],
            "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i32, p, ctypes.POINTER(i32)],
            "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, p, p, ctypes.c_size_t, p],
        }.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, i32
        lib.cublasLtGetVersion.argtypes, lib.cublasLtGetVersion.restype = [], ctypes.c_size_t
        _lib = lib
    return _lib


_STATUS_NAMES = {1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH",
                 11: "MAPPING_ERROR", 13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED"}
_UNSUPPORTED_STATUSES = (8, 15)  # the library or this GPU cannot run it: the callers use torch's matmul


def _check(status: int, what: str) -> None:
    if status == 0:
        return
    message = f"cuBLASLt: {what} failed with cublasStatus_t {status} ({_STATUS_NAMES.get(status, 'unknown')})"
    if status in _UNSUPPORTED_STATUSES:
        raise CublasLtUnsupported(message)
    raise RuntimeError(message)


def _set(setter, obj, attr: int, value) -> None:
    _check(setter(obj, attr, ctypes.byref(value), ctypes.sizeof(value)), f"setting attribute {attr}")


def _handle(device: torch.device) -> ctypes.c_void_p:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _handles:
        handle = ctypes.c_void_p()
        with torch.cuda.device(index):
            _check(_library().cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
        _handles[index] = handle
    return _handles[index]


def _operand(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(op, rows, cols, ld) of the cuBLAS operand that is t^T, for a 2-D t (R, C) stored row-major
    (stride (ld, 1): op N on C x R column-major storage) or as a transposed view (stride (1, ld):
    op T on R x C storage)."""
    R, C = t.shape
    if t.stride(1) == 1 and t.stride(0) >= max(C, 1):
        return _OP_N, C, R, t.stride(0)
    if t.stride(0) == 1 and t.stride(1) >= max(R, 1):
        return _OP_T, R, C, t.stride(1)
    # Unsupported, not an error: the callers then run torch's matmul (an expanded stride-0 gradient
    # reaching `linear: tuned` from a .sum() is one such operand).
    raise CublasLtUnsupported(
        f"cuBLASLt: operand of shape {tuple(t.shape)} and strides {t.stride()} is neither row- nor column-major"
    )


def alignment(*tensors: torch.Tensor | None) -> int:
    """The largest power of two up to 256 bytes that divides every base address."""
    align = 256
    for t in tensors:
        if t is not None:
            while t.data_ptr() % align:
                align //= 2
    return align


def key_str(key: tuple) -> str:
    """A cache key (shapes, strides, dtypes, flags, device) as a string that means the same in another
    process: the device by its model name (a pick is valid on the same kind of GPU, not on another)."""
    parts = []
    for item in key:
        if isinstance(item, torch.device):
            parts.append(torch.cuda.get_device_name(item) if item.type == "cuda" else item.type)
        elif isinstance(item, torch.dtype):
            parts.append(str(item).removeprefix("torch."))
        elif isinstance(item, tuple):  # torch.Size too
            parts.append(str(tuple(item)))
        else:
            parts.append(str(item))
    return "|".join(parts)


def picks_state() -> dict[str, list[int]]:
    """{key_str: [index of the chosen candidate in the heuristic's list, the list's length]} of every
    plan made in this process, and the restored picks of keys not planned yet (a shape seen only at
    evaluation keeps its pick through a resume that saves before it comes up)."""
    return {**_saved_algos, **{key_str(key): list(chosen) for key, chosen in _chosen.items()}}


def library_version() -> int | None:
    """`cublasLtGetVersion()` of the library PyTorch loaded (e.g. 130100); None without CUDA or
    without that library (a ROCm build), where no cuBLASLt pick is ever made."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return None
    try:
        return int(_library().cublasLtGetVersion())
    except (CublasLtUnsupported, OSError, AttributeError):
        return None


def picks_version() -> int | None:
    """The library version that `picks_state()`'s candidate indices refer to: this process's where
    it has CUDA, else the one its restored picks came with."""
    return library_version() if torch.cuda.is_available() else _saved_version


def restore_picks(state: dict[str, list[int]], version: int | None = None) -> int:
    """Take `picks_state()` of an earlier process, timed with library `version` (`picks_version()`;
    None: not recorded): a key planned from now on takes the saved candidate, untimed, where the
    heuristic offers as many as it did then (else it times them again, with a warning). Picks of
    another library version are not taken (warned): the heuristic of another version may list other
    kernels in the same places. Returns how many picks were given."""
    global _saved_version
    check_picks(state, version)
    current = library_version() if state and version is not None else None  # (loads the library only to compare)
    if current is not None and version != current:
        warnings.warn(f"cuBLASLt picks of {len(state)} GEMM shapes were timed with cuBLASLt {version}, this process "
                      f"runs {current}: their candidate indices may name other kernels there, so the shapes are "
                      "timed again (results may differ from the saved run's in the last bits)")
        return 0
    _saved_algos.update(state)
    _saved_version = version if version is not None else _saved_version
    return len(state)


def check_picks(state: dict[str, list[int]], version: int | None = None) -> None:
    """A ValueError unless `state` has the form `picks_state()` returns and `version` that of
    `picks_version()` (nothing is restored)."""
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise ValueError(f"GEMM picks: cublaslt_version must be an int or null, got {version!r}")
    def valid(v):
        return isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) for i in v) and 0 <= v[0] < v[1]

    if not isinstance(state, dict) or not all(isinstance(k, str) and valid(v) for k, v in state.items()):
        raise ValueError("cuBLASLt picks: expected {key: [candidate index, candidate count]}, as picks_state() returns")


def _launch(plan, a, b, out, bias, aux, accumulate=False) -> None:
    lib = _library()
    desc, layout_b, layout_a, layout_d, heuristic, workspace_bytes = plan
    if bias is not None:
        _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_BIAS_POINTER, ctypes.c_void_p(bias.data_ptr()))
    if aux is not None:
        _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_AUX_POINTER, ctypes.c_void_p(aux.data_ptr()))
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(1.0 if accumulate else 0.0)
    # A workspace from PyTorch's allocator for this call: inside a CUDA graph it is a temporary of
    # the graph's pool like any other (one kept across calls would be an untracked live tensor there).
    workspace = torch.empty(max(workspace_bytes, 16), dtype=torch.uint8, device=out.device)
    _check(
        lib.cublasLtMatmul(
            _handle(out.device), desc, ctypes.byref(alpha),
            ctypes.c_void_p(b.data_ptr()), layout_b, ctypes.c_void_p(a.data_ptr()), layout_a,
            ctypes.byref(beta), ctypes.c_void_p(out.data_ptr()), layout_d, ctypes.c_void_p(out.data_ptr()), layout_d,
            heuristic, ctypes.c_void_p(workspace.data_ptr()), workspace_bytes,
            ctypes.c_void_p(torch.cuda.current_stream(out.device).cuda_stream),
        ),
        "cublasLtMatmul",
    )  # fmt: skip


def time_ms(fn, runs: int = 5) -> float:
    """Mean GPU time of one call of `fn` over `runs` calls queued back to back. The GPU is first held
    busy (`torch.cuda._sleep`) while the host queues the calls, so the host's launch cost (a few
    ctypes calls here, a dispatcher call for torch) is not counted: inside a training step the host
    runs ahead of the GPU, or a CUDA graph launches the kernels."""
    fn()  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(2_000_000)  # about 1 ms: enough for the host to queue `runs` launches
    start.record()
    for _ in range(runs):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / runs


def _fastest(candidates: list[tuple], tensors: tuple, accumulate: bool = False) -> int:
    """The index of the candidate algorithm that runs fastest on these tensors (`time_ms`, the best
    of three rounds), once per plan: the heuristic's first choice is not always the fastest with an
    epilogue. (During a CUDA graph capture nothing can be timed: `_plan` then takes the first
    choice without remembering it.)"""
    if len(candidates) == 1 or torch.cuda.is_current_stream_capturing():
        return 0
    best, best_ms = 0, float("inf")
    for i, plan in enumerate(candidates):
        ms = min(time_ms(lambda: _launch(plan, *tensors, accumulate)) for _ in range(3))
        if ms < best_ms:
            best, best_ms = i, ms
    return best


def _plan(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, epilogue: int, bias, aux, align: int,
    accumulate: bool = False, scratch_out: bool = False,
):  # fmt: skip
    """Descriptors, layouts and algorithm for out (+)= a @ b with `epilogue` (cached; the first call
    for a key times the heuristic's candidates on its tensors, overwriting `out`, or for an
    accumulating key whose `out` holds a sum to keep, a copy of it)."""
    tensors = (a, b, out, bias, aux)
    bias_dtype = bias.dtype if bias is not None else None
    key = (a.shape, a.stride(), b.shape, b.stride(), out.shape, a.dtype, out.dtype, epilogue, bias_dtype, align, out.device)
    key += ("accumulate",) if accumulate else ()  # (so that keys saved before the flag existed still match)
    plan = _plans.get(key)
    if isinstance(plan, str):
        raise CublasLtUnsupported(plan)
    if plan is not None:
        return plan
    lib = _library()
    M, N = out.shape
    op_b, b_rows, b_cols, ldb = _operand(b)  # cuBLAS A = b^T (N x K)
    op_a, a_rows, a_cols, lda = _operand(a)  # cuBLAS B = a^T (K x M)
    in_type, out_type = _CUDA_TYPES[a.dtype], _CUDA_TYPES[out.dtype]
    desc = ctypes.c_void_p()
    _check(lib.cublasLtMatmulDescCreate(ctypes.byref(desc), _COMPUTE_32F, _CUDA_TYPES[torch.float32]), "MatmulDescCreate")
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_TRANSA, ctypes.c_int32(op_b))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_TRANSB, ctypes.c_int32(op_a))
    _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_EPILOGUE, ctypes.c_uint32(epilogue))
    if epilogue in _WITH_AUX:
        _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_AUX_LD, ctypes.c_int64(N))
    if epilogue in _WITH_BIAS:
        _set(lib.cublasLtMatmulDescSetAttribute, desc, _DESC_BIAS_DATA_TYPE, ctypes.c_int32(_CUDA_TYPES[bias_dtype]))
    layouts = []
    for dtype, rows, cols, ld in ((in_type, b_rows, b_cols, ldb), (in_type, a_rows, a_cols, lda), (out_type, N, M, N)):
        layout = ctypes.c_void_p()
        _check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), dtype, rows, cols, ld), "MatrixLayoutCreate")
        layouts.append(layout)
    layout_b, layout_a, layout_d = layouts
    pref = ctypes.c_void_p()
    _check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "MatmulPreferenceCreate")
    _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.c_uint64(_WORKSPACE_BYTES))
    for attr in _PREF_MIN_ALIGNMENT:
        _set(lib.cublasLtMatmulPreferenceSetAttribute, pref, attr, ctypes.c_uint32(align))
    results = (ctypes.c_ubyte * (_HEURISTIC_BYTES * _CANDIDATES))()
    found = ctypes.c_int(0)
    status = lib.cublasLtMatmulAlgoGetHeuristic(
        _handle(out.device), desc, layout_b, layout_a, layout_d, layout_d, pref, _CANDIDATES, results, ctypes.byref(found)
    )
    if status != 0 or found.value == 0:
        _plans[key] = (
            f"cuBLASLt has no kernel for epilogue {_NAMES.get(epilogue, epilogue)} with out {tuple(out.shape)} "
            f"{out.dtype}, a {tuple(a.shape)} strides {a.stride()}, b {tuple(b.shape)} strides {b.stride()}, "
            f"bias {bias_dtype}, alignment {align} (status {status})"
        )
        raise CublasLtUnsupported(_plans[key])
    candidates = []
    for i in range(found.value):
        heuristic = (ctypes.c_ubyte * _HEURISTIC_BYTES).from_buffer_copy(results, i * _HEURISTIC_BYTES)
        workspace_bytes = ctypes.c_size_t.from_buffer(heuristic, 64).value  # the algorithm's own need
        state = ctypes.c_int.from_buffer(heuristic, 72).value
        if state == 0:
            candidates.append((desc, layout_b, layout_a, layout_d, heuristic, workspace_bytes))
    if not candidates:  # remembered like an empty heuristic: not asked again on every call
        _plans[key] = f"cuBLASLt's heuristic for epilogue {_NAMES.get(epilogue, epilogue)} returned no usable algorithm"
        raise CublasLtUnsupported(_plans[key])
    saved = _saved_algos.get(key_str(key)) if _saved_algos else None
    if saved is not None and saved[1] != len(candidates):
        warnings.warn(f"cuBLASLt's heuristic offers {len(candidates)} algorithms for {key_str(key)}, {saved[1]} when "
                      "the checkpoint picked one (another library version?): timing them again; results may differ "
                      "in the last bits")
        saved = None
    if saved is None and len(candidates) > 1 and torch.cuda.is_current_stream_capturing():
        # Nothing can be timed during a capture: the heuristic's first choice, not remembered (as
        # tuned_mm does), so that the key is timed, and saved, when it is next seen outside one.
        return candidates[0]
    timed = saved is None and len(candidates) > 1
    if timed and accumulate and not scratch_out:
        tensors = (a, b, out.clone(), bias, aux)  # timing adds into it many times
    index = saved[0] if saved is not None else _fastest(candidates, tensors, accumulate)
    _chosen[key] = [index, len(candidates)]
    _plans[key] = candidates[index]
    return _plans[key]


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    epilogue: int = EPILOGUE_DEFAULT,
    bias: torch.Tensor | None = None,
    aux: torch.Tensor | None = None,
    accumulate: bool = False,
    scratch_out: bool = False,
) -> torch.Tensor:
    """out (M, N) = epilogue(a (M, K) @ b (K, N)), fp32 accumulation, on the current stream;
    `accumulate`: out += a @ b instead (cuBLAS's beta = 1: out is read in the epilogue, once).
    The first call of an accumulating key times the candidates on a copy of `out`, whose sum must
    be kept; `scratch_out` says out holds nothing to keep (a buffer about to be written anyway), so
    they are timed on it instead.

    `bias` (N,): the bias added (BIAS, GELU_AUX_BIAS) or the bias gradient written (DGELU_BGRAD,
    the sum of the output over its M rows; in out's dtype: cuBLAS 13 has no fp32 bias gradient
    for bf16 outputs, seen on an H200); (M,) for BGRAD_OF_A, the sum of `a` over K. `aux` (M, N),
    contiguous: the pre-activation written (GELU_AUX*) or read (DGELU*). a and b share a dtype
    (fp16 or bf16); out is contiguous."""
    if accumulate and epilogue != EPILOGUE_DEFAULT:
        raise ValueError(f"cuBLASLt: accumulate=True takes the DEFAULT epilogue, got {_NAMES.get(epilogue, epilogue)}")
    if not (a.is_cuda and b.is_cuda and out.is_cuda):
        raise CublasLtUnsupported("cuBLASLt runs on CUDA tensors only")
    if a.dtype != b.dtype or a.dtype not in (torch.float16, torch.bfloat16):
        raise CublasLtUnsupported(f"cuBLASLt epilogues here take fp16/bf16 operands of one dtype, got {a.dtype}, {b.dtype}")
    M, K = a.shape
    if b.shape[0] != K or out.shape != (M, b.shape[1]) or not out.is_contiguous():
        raise ValueError(f"cuBLASLt: shapes disagree: a {tuple(a.shape)} @ b {tuple(b.shape)} -> out {tuple(out.shape)}")
    if (epilogue in _WITH_AUX) != (aux is not None) or (epilogue in _WITH_BIAS) != (bias is not None):
        name = _NAMES.get(epilogue, epilogue)
        raise ValueError(f"cuBLASLt: epilogue {name} got aux={aux is not None}, bias={bias is not None}")
    if aux is not None and (aux.shape != out.shape or not aux.is_contiguous() or aux.dtype != out.dtype):
        raise ValueError(f"cuBLASLt: aux must be a contiguous {tuple(out.shape)} {out.dtype} tensor")
    bias_len = out.shape[0] if epilogue == EPILOGUE_BGRAD_OF_A else out.shape[1]
    if bias is not None and (bias.shape != (bias_len,) or not bias.is_contiguous()):
        raise ValueError(f"cuBLASLt: bias must be a contiguous ({bias_len},) vector, got {tuple(bias.shape)}")
    for t in (a, b, bias, aux):
        if t is not None and t.device != out.device:
            raise ValueError(f"cuBLASLt: operands on several devices: {t.device} beside out on {out.device}")
    if out.device.index != torch.cuda.current_device():
        # cuBLASLt runs on the current device's context: tensors of another GPU (cuda:1 while
        # cuda:0 is current) are computed there, as PyTorch's own matmul does.
        with torch.cuda.device(out.device):
            return gemm(a, b, out, epilogue, bias, aux, accumulate, scratch_out)
    with _lock:
        # The bias's address counts too: a plan chosen for an aligned bias may load it in 16-byte
        # vectors, which a bias view at an odd offset would fault on.
        chosen = _plan(a, b, out, epilogue, bias, aux, alignment(a, b, out, aux, bias), accumulate, scratch_out)
        _launch(chosen, a, b, out, bias, aux, accumulate)
    return out

