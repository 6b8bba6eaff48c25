"""tuned_mm: a GEMM that runs, for its shape, the faster of cuBLAS's own pick and cuBLASLt's best.

    out (M, N) = a (M, K) @ b (K, N) [+ bias (N,)]      fp32 accumulation, out in `out_dtype`

`torch.mm` runs the kernel cuBLAS's heuristic picks for a shape, untimed. For our projection GEMMs
that pick is often not the fastest kernel the library has: timed one by one on an H200
(benchmarks/probe_projection_gemms.py), the fastest of cuBLASLt's heuristic candidates ran
Qwen2-0.5B's down projection's input gradient 17.8% faster than `torch.mm`, its gate_up forward
6.8%, GPT-2's qkv forward 6.7%, and lost by 2-3% on a few others. PyTorch's TunableOp would time
alternatives, but on CUDA builds it offers only cuBLAS's default. So the first call for a key
(shapes, strides, dtypes, bias, alignment, device) plans cuBLASLt's fastest candidate
(kernels/cublaslt.py times them), then times it against torch's call, three rounds of queued runs
each, interleaved (`cublaslt.time_ms`), and every later call for the key runs the winner.

`mm_into(a, b, out, accumulate)` makes the same choice for a GEMM that writes into a given buffer
or adds to it (`out += a @ b`: torch's `addmm_` against cuBLASLt with beta = 1), for the fused
linear + cross-entropy's chunk loop. Timing runs a key many times, so an accumulating key is timed on
a copy of `out` unless `plan_into` timed it on a scratch buffer first (the fused loss plans on its
fresh weight gradient before writing it).

Where it runs: CUDA, fp16 / bf16 operands of one dtype (what `kernels.linear: tuned` hands it).
Elsewhere (the CPU, fp32) `mm_out` is torch's matmul, so CPU tests check the wiring and the GPU
tests the picks.

Picks and resume: the pick is made by timing, so two processes can pick different kernels for a
shape whose two candidates are within noise of each other, and cuBLAS's kernels differ in
summation order (split-K), so results would then differ in the last bits. `picks_state()` holds
this process's picks by key; a checkpoint stores them (with cuBLASLt's algorithms,
`cublaslt.picks_state`), and `restore_picks` makes a resumed process take the same kernels for
those keys without timing them: a resumed run computes with the kernels, so in the summation order,
of the run it continues, as with `fp32_wgrad`. (With several ranks each rank times, saves and
restores its own picks. GPU training is not bitwise for other reasons: cuDNN's attention backward
and the embedding's gradient add with atomics.)

Limits:
- Nothing can be timed during a CUDA graph capture: a key first seen there runs torch's call
  (not remembered), unless a checkpoint's pick is known for it. torch.compile's CUDA graphs run
  each graph once before capturing it, which times the step's keys.
- Each key is timed once: up to 8 cuBLASLt candidates x 3 rounds x 6 runs, then 3 rounds x 6
  runs of each of the two finalists, about 180 GEMMs (tens of ms for a model's dozen shapes).
"""

from __future__ import annotations

import threading

import torch

from kernels import cublaslt

_ROUNDS = 3  # interleaved timing rounds per candidate; the best round counts
_lock = threading.Lock()
_picks: dict[tuple, str] = {}  # key -> "torch" | "cublaslt"
_saved: dict[str, str] = {}  # cublaslt.key_str(key) -> pick, from a checkpoint (`restore_picks`)
_PICKS = ("torch", "cublaslt")


# -- host launchers -------------------------------------------------------------------------------


def _torch_mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's matmul: cuBLAS writes `out_dtype` from the fp32 accumulator (an fp32 weight gradient
    from bf16 operands needs no cast kernel); on the CPU the same math on operands upcast to fp32."""
    if out_dtype == a.dtype:
        return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)
    if a.is_cuda and out_dtype == torch.float32:
        out = torch.mm(a, b, out_dtype=torch.float32)
    else:
        out = torch.mm(a.float(), b.float()).to(out_dtype)
    return out if bias is None else out.add_(bias)


def _cublaslt_mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
    out = torch.empty(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    epilogue = cublaslt.EPILOGUE_BIAS if bias is not None else cublaslt.EPILOGUE_DEFAULT
    return cublaslt.gemm(a, b, out, epilogue, bias=bias)


def _key(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None) -> tuple:
    return (a.shape, a.stride(), b.shape, b.stride(), a.dtype, out_dtype, None if bias is None else bias.dtype,
            cublaslt.alignment(a, b, bias), a.device)  # fmt: skip


def _pick(key: tuple, torch_call, cublaslt_call) -> str:
    """"torch" or "cublaslt" for `key`: timed on its first call (see the module docstring), by
    running the two zero-argument calls."""
    pick = _picks.get(key)
    if pick is not None:
        return pick
    pick = _saved.get(cublaslt.key_str(key)) if _saved else None
    if pick is not None:  # a checkpoint's pick: the same kernel as before the restart, untimed
        _picks[key] = pick
        return pick
    if torch.cuda.is_current_stream_capturing():
        return "torch"
    try:
        cublaslt_call()  # plans the key: times cuBLASLt's candidates, keeps the fastest
    except cublaslt.CublasLtUnsupported:
        _picks[key] = "torch"
        return "torch"
    torch_ms = lt_ms = float("inf")
    for _ in range(_ROUNDS):
        torch_ms = min(torch_ms, cublaslt.time_ms(torch_call))
        lt_ms = min(lt_ms, cublaslt.time_ms(cublaslt_call))
    _picks[key] = "cublaslt" if lt_ms < torch_ms else "torch"
    return _picks[key]


def _tuned_mm_launch(
    a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, bias: torch.Tensor | None
) -> torch.Tensor:
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype:
        with _lock:
            pick = _pick(
                _key(a, b, out_dtype, bias),
                lambda: _torch_mm(a, b, out_dtype, bias),
                lambda: _cublaslt_mm(a, b, out_dtype, bias),
            )
        if pick == "cublaslt":
            try:
                return _cublaslt_mm(a, b, out_dtype, bias)
            except cublaslt.CublasLtUnsupported:  # a restored pick this library cannot run
                with _lock:
                    _picks[_key(a, b, out_dtype, bias)] = "torch"
    return _torch_mm(a, b, out_dtype, bias)


def _torch_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> torch.Tensor:
    return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)


def _into_key(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool) -> tuple:
    return _key(a, b, out.dtype, None) + ("into", cublaslt.alignment(out), accumulate)


def _tunable_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> bool:
    return a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype == out.dtype


def _decided(key: tuple) -> bool:
    """Whether `_pick` would answer for `key` without timing."""
    saved = bool(_saved) and cublaslt.key_str(key) in _saved
    return key in _picks or saved or torch.cuda.is_current_stream_capturing()


def _pick_into(a: torch.Tensor, b: torch.Tensor, target: torch.Tensor, key: tuple, accumulate: bool) -> str:
    """The pick for `key`, timed (on its first call) by writing into `target`, which it overwrites."""
    return _pick(
        key,
        lambda: _torch_into(a, b, target, accumulate),
        lambda: cublaslt.gemm(a, b, target, accumulate=accumulate, scratch_out=True),
    )


def mm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, accumulate: bool = False) -> torch.Tensor:
    """out (M, N) = a (M, K) @ b (K, N), or out += a @ b with `accumulate`, in out's buffer (out
    contiguous, in a's dtype): the faster of torch's call (`mm(out=)` / `addmm_`) and cuBLASLt's
    best candidate for the key, as `mm_out(tuned=True)` picks (fp16 / bf16 on CUDA; torch's call
    elsewhere). An accumulating key is timed on a copy of `out` the first time, unless `plan_into`
    timed it on a scratch buffer before. Without autograd (the fused loss calls it in its op)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or out.shape != (a.shape[0], b.shape[1]):
        raise ValueError(
            f"mm_into: a (M, K) @ b (K, N) into out (M, N) expected, got {tuple(a.shape)} @ {tuple(b.shape)} "
            f"into {tuple(out.shape)}"
        )
    if out.dtype != a.dtype or not out.is_contiguous():
        raise ValueError(f"mm_into: out must be contiguous and in the operands' dtype {a.dtype}, got {out.dtype}"
                         f"{'' if out.is_contiguous() else ', not contiguous'}; use mm_out for another output dtype")
    if _tunable_into(a, b, out):
        key = _into_key(a, b, out, accumulate)
        with _lock:
            timed = accumulate and not _decided(key)
            pick = _pick_into(a, b, out.clone() if timed else out, key, accumulate)
        if pick == "cublaslt":
            try:
                return cublaslt.gemm(a, b, out, accumulate=accumulate)
            except cublaslt.CublasLtUnsupported:  # a restored pick this library cannot run
                with _lock:
                    _picks[key] = "torch"
    return _torch_into(a, b, out, accumulate)


def plan_into(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor, accumulate: bool = False) -> None:
    """Make `mm_into`'s pick for (a, b, an output laid out as `scratch`, accumulate) now, timing on
    `scratch`, which is overwritten: a buffer about to be written anyway (the fused loss's weight
    gradient before its first chunk) spares the copy an accumulating key is otherwise timed on."""
    if _tunable_into(a, b, scratch):
        with _lock:
            _pick_into(a, b, scratch, _into_key(a, b, scratch, accumulate), accumulate)


def picks_state() -> dict[str, str]:
    """{cublaslt.key_str(key): "torch" | "cublaslt"} of every key timed (or restored) in this process,
    and the restored picks of keys not seen yet (kept through the next checkpoint)."""
    with _lock:  # a consistent view while another thread may be timing a key
        return {**_saved, **{cublaslt.key_str(key): pick for key, pick in _picks.items()}}


def restore_picks(state: dict[str, str]) -> int:
    """Take `picks_state()` of an earlier process: a key first seen from now on runs the saved pick,
    untimed. Returns how many picks were given."""
    check_picks(state)
    _saved.update(state)
    return len(state)


def check_picks(state: dict[str, str]) -> None:
    """A ValueError unless `state` has the form `picks_state()` returns (nothing is restored)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and v in _PICKS for k, v in state.items()):
        raise ValueError(f"tuned_mm picks: expected {{key: one of {_PICKS}}}, as picks_state() returns")


# -- registration ---------------------------------------------------------------------------------

# `custom_op` (opaque to torch.compile): the body calls cuBLASLt through ctypes, which Dynamo cannot
# trace; Inductor schedules it as one extern call, as it schedules aten.mm.
_tuned_mm = torch.library.custom_op("kernels::tuned_mm", _tuned_mm_launch, mutates_args=())


@_tuned_mm.register_fake
def _(a, b, out_dtype, bias):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


# -- functional -----------------------------------------------------------------------------------


def mm_out(
    a: torch.Tensor,
    b: torch.Tensor,
    dtype: torch.dtype,
    tuned: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """a (M, K) @ b (K, N) [+ bias (N,)] returned in `dtype` from an fp32 accumulator (M, N).

    `tuned`: the faster of cuBLAS's pick and cuBLASLt's candidates for this shape (the module's
    docstring); torch's matmul where that cannot run (the CPU, fp32). Operands may be transposed
    views (`w.t()`); without autograd (callers are ops with their own backward)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"mm_out: a (M, K) @ b (K, N) expected, got {tuple(a.shape)} @ {tuple(b.shape)}")
    if bias is not None and bias.shape != (b.shape[1],):
        raise ValueError(f"mm_out: bias must be ({b.shape[1]},), got {tuple(bias.shape)}")
    if bias is not None and bias.dtype != dtype:
        raise ValueError(f"mm_out: bias is {bias.dtype} but the output {dtype}; cast the bias first")
    if tuned and a.is_cuda and a.dtype in (torch.float16, torch.bfloat16) and b.dtype == a.dtype:
        return _tuned_mm(a, b, dtype, bias)
    return _torch_mm(a, b, dtype, bias)
