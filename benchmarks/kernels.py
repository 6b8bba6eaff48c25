"""Benchmark the Triton kernels against PyTorch eager, torch.compile of the same reference, and
Liger-Kernel (when installed), side by side in one run on one GPU.

For each op and shape: a correctness check against the eager reference, then forward and
forward+backward GPU time (one call captured in a CUDA graph, median over replays with L2 flushed
before each, see `graph_ms`), achieved bandwidth (GB/s, from the bytes the op must move at least)
or TFLOP/s (the linear + cross-entropy ops), the extra peak memory of one forward+backward beyond
the inputs, and, as "host ms", forward+backward timed with eager launches by
`triton.testing.do_bench` (what a step without CUDA graphs pays, Python overheads included).
Forward is timed as in training (inputs require grad), so it includes what each implementation
saves or precomputes for backward. Every provider is timed the same way.

    python benchmarks/kernels.py                       # every op, bf16, writes benchmarks/results/
    python benchmarks/kernels.py --ops rmsnorm swiglu --no-compile
    python benchmarks/kernels.py --ops fused_linear_cross_entropy --clocks   # + SM clock and power
    python benchmarks/kernels.py --help

`--clocks` also runs each graph-timed forward+backward back to back for a second while
`nvidia-smi` reads the SM clock and power draw (`gpu_clocks.py`): a GEMM-bound op can hold the GPU
at its power cap, below its top clock, which profiles of separately launched kernels do not show.

Writes benchmarks/results/kernels_<device>.json and a PNG beside it; prints a table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# Run from anywhere: the repo root goes first on the path, ahead of this script's directory, so
# that `kernels` names the repository's kernel package and not this file.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_clocks import ClockSampler, limits  # noqa: E402
from src.models.components.dispatch import get_kernel  # noqa: E402
from src.models.components.embeddings.rotary import RotaryEmbedding  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GiB = 2**30


@dataclass
class Case:
    """One op at one shape: how to build inputs and run it, and how much work it is."""

    op: str  # registry name in src/models/components/dispatch.py
    shape: str  # for the table
    make: Callable[[torch.dtype], tuple[list, list]]  # dtype -> (args, upstream grads or [] for a scalar loss)
    fwd_bytes: float = 0.0  # least bytes moved (GB/s); 0 when flops are given instead
    fwd_bwd_bytes: float = 0.0
    fwd_flops: float = 0.0
    fwd_bwd_flops: float = 0.0


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_(True)


def build_cases(device: str) -> list[Case]:
    """The shapes of the issue's targets: Qwen2-0.5B (hidden 896, FFN 4864, 14/2 heads of 64,
    vocab 151936), GPT-2 (768, vocab 50304), a 7B-class hidden 4096; 8 x 2048 tokens or 8192."""
    e = 2  # bytes per bf16 element; the cases are sized for bf16

    def norm_case(op, M, H):
        def make(dtype):
            x = _leaf(torch.randn(M, H, device=device, dtype=dtype))
            w = _leaf(torch.rand(H, device=device, dtype=dtype) + 0.5)
            if op == "layernorm":
                b = _leaf(torch.randn(H, device=device, dtype=dtype))
                return [x, w, b, 1e-5], [torch.randn_like(x)]
            return [x, w, 1e-6], [torch.randn_like(x)]

        return Case(op, f"{M}x{H}", make, fwd_bytes=2 * M * H * e, fwd_bwd_bytes=5 * M * H * e)

    def swiglu_case(M, H):
        def make(dtype):
            gate_up = torch.randn(M, 2 * H, device=device, dtype=dtype)
            gate, up = (_leaf(t.contiguous()) for t in gate_up.chunk(2, dim=-1))
            return [gate, up], [torch.randn(M, H, device=device, dtype=dtype)]

        return Case("swiglu", f"{M}x{H}", make, fwd_bytes=3 * M * H * e, fwd_bwd_bytes=8 * M * H * e)

    def rope_case(B, T, Hq, Hkv, D):
        def make(dtype):
            q = _leaf(torch.randn(B, T, Hq, D, device=device, dtype=dtype))
            k = _leaf(torch.randn(B, T, Hkv, D, device=device, dtype=dtype))
            cos, sin = RotaryEmbedding(D, 1e6, T).to(device)(seq_len=T)
            return [q, k, cos, sin], [torch.randn_like(q), torch.randn_like(k)]

        n = B * T * (Hq + Hkv) * D
        return Case("rope", f"q {B}x{Hq}x{T}x{D} + k {Hkv} heads", make, fwd_bytes=2 * n * e, fwd_bwd_bytes=4 * n * e)

    def ce_case(N, V):
        def make(dtype):
            logits = _leaf(torch.randn(N, V, device=device, dtype=dtype))
            labels = torch.randint(0, V, (N,), device=device)
            return [logits, labels, -100, 0.0], []

        return Case("cross_entropy", f"{N}x{V}", make, fwd_bytes=N * V * e, fwd_bwd_bytes=3 * N * V * e)

    def linear_case(op, N, H, V):
        def make(dtype):
            hidden = _leaf(torch.randn(N, H, device=device, dtype=dtype))
            weight = _leaf(torch.randn(V, H, device=device, dtype=dtype) * H**-0.5)
            labels = torch.randint(0, V, (N,), device=device)
            if op == "token_logprobs":
                return [hidden, weight, labels, -100], [torch.randn(N, device=device)]
            return [hidden, weight, labels, -100, 0.0], []

        flops = 2 * N * H * V  # one (N, H) x (H, V) matmul
        return Case(op, f"{N}x{H}x{V}", make, fwd_flops=flops, fwd_bwd_flops=3 * flops)

    def swiglu_linear_case(op, M, D, H):
        """SwiGLU and the down projection after it (`swiglu_linear_recompute`: without the product
        kept for backward): M tokens, model width D, MLP width H; the work counted is the
        projection's matmuls."""

        def make(dtype):
            gate_up = _leaf(torch.randn(M, 2 * H, device=device, dtype=dtype))
            weight = _leaf(torch.randn(D, H, device=device, dtype=dtype) * H**-0.5)
            return [gate_up, weight], [torch.randn(M, D, device=device, dtype=dtype)]

        flops = 2 * M * D * H  # one (M, H) x (H, D) matmul
        return Case(op, f"{M}x{D}x{H}", make, fwd_flops=flops, fwd_bwd_flops=3 * flops)

    def gelu_mlp_case(M, D, H):
        """GPT-2's MLP: M tokens, model width D, MLP width H; the work counted is its two matmuls
        forward and four backward."""

        def make(dtype):
            x = _leaf(torch.randn(M, D, device=device, dtype=dtype))
            fc_w = _leaf(torch.randn(H, D, device=device, dtype=dtype) * D**-0.5)
            fc_b = _leaf(torch.randn(H, device=device, dtype=dtype) * 0.1)
            proj_w = _leaf(torch.randn(D, H, device=device, dtype=dtype) * H**-0.5)
            proj_b = _leaf(torch.randn(D, device=device, dtype=dtype) * 0.1)
            return [x, fc_w, fc_b, proj_w, proj_b], [torch.randn(M, D, device=device, dtype=dtype)]

        flops = 2 * 2 * M * D * H  # two (M, D) x (D, H)-sized matmuls
        return Case("gelu_mlp", f"{M}x{D}x{H}", make, fwd_flops=flops, fwd_bwd_flops=3 * flops)

    return [
        norm_case("rmsnorm", 16384, 4096),
        norm_case("rmsnorm", 16384, 896),
        norm_case("layernorm", 16384, 768),
        swiglu_case(16384, 4864),
        rope_case(8, 2048, 14, 2, 64),
        ce_case(8192, 151936),
        ce_case(8192, 50304),
        linear_case("fused_linear_cross_entropy", 8192, 896, 151936),
        linear_case("fused_linear_cross_entropy", 8192, 768, 50304),
        linear_case("token_logprobs", 8192, 896, 151936),
        swiglu_linear_case("swiglu_linear", 8192, 896, 4864),
        swiglu_linear_case("swiglu_linear_recompute", 8192, 896, 4864),
        gelu_mlp_case(16384, 768, 3072),
    ]


# Our implementation of each op is its `triton` choice, except where it is a cuBLASLt epilogue.
OUR_CHOICE = {"gelu_mlp": "cublaslt"}


def providers(op: str, use_compile: bool) -> dict[str, Callable]:
    """name -> callable with the reference's signature. Liger only where it is installed and has the op."""
    reference = get_kernel(op, "torch")
    ours = OUR_CHOICE.get(op, "triton")
    found = {ours: get_kernel(op, ours), "torch": reference}
    if use_compile:
        found["compile"] = torch.compile(reference, fullgraph=True)
    try:
        found["liger"] = get_kernel(op, "liger")
    except (ValueError, RuntimeError):
        pass  # not installed, or no Liger version of this op
    return found


def run_once(fn: Callable, args: list, upstream: list, backward: bool):
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    if backward:
        torch.autograd.backward(outs, upstream or None)
    return outs


def clone_args(args: list) -> list:
    return [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]


def check(fn: Callable, reference: Callable, args: list, upstream: list) -> str:
    """'' when fn agrees with the eager reference (bf16 tolerance), else what differs."""
    results = []
    for f in (fn, reference):
        local = clone_args(args)  # some implementations write gradients into their inputs
        outs = run_once(f, local, upstream, backward=True)
        grads = [a.grad for a in local if isinstance(a, torch.Tensor) and a.requires_grad]
        results.append([o.detach().float() for o in outs] + [g.float() for g in grads])
    for i, (got, want) in enumerate(zip(*results)):
        scale = max(1.0, want.abs().max().item())
        if not torch.allclose(got, want, atol=3e-2 * scale, rtol=3e-2):
            return f"output {i}: max abs diff {(got - want).abs().max().item():.3g} (scale {scale:.3g})"
    return ""


def graph_ms(
    fn: Callable, leaves: list[torch.Tensor], budget_ms: float = 150.0, clock_seconds: float = 0.0
) -> tuple[float, dict | None]:
    """Median GPU time of one call of `fn`, captured in a CUDA graph and replayed.

    Eager launching costs every provider tens to hundreds of microseconds of Python per call
    (autograd, torch.library dispatch, Triton's launcher, Dynamo guards), which at these sizes is
    more than the GPU work, so host-timed numbers measure the host. Here one call (forward, or
    forward + backward with the gradients reset first, so that they are written, not accumulated)
    is captured once and replayed; before each replay a 256 MB buffer is zeroed, as
    `triton.testing.do_bench` does, so no input is served from L2, and CUDA events bracket each
    replay alone.

    Returns (the median ms, the clock reading): with `clock_seconds`, the graph then replays back to
    back, with the same flushes, for that long while `ClockSampler` reads the SM clock and power
    (None without nvidia-smi or without a sample)."""

    def call():
        for leaf in leaves:
            leaf.grad = None
        fn()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile, autotune, allocate) off the capture stream
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    home = torch.cuda.current_stream()
    pool = torch.cuda.graph_pool_handle()  # named, so that a failed capture's pool can be given back
    try:
        with torch.cuda.graph(graph, pool=pool):
            call()
    except Exception:
        _recover_from_failed_capture(home, pool)
        raise
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    graph.replay()
    torch.cuda.synchronize()
    probe_start, probe_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_start.record()
    graph.replay()
    probe_end.record()
    torch.cuda.synchronize()
    reps = int(min(1000, max(10, budget_ms / max(probe_start.elapsed_time(probe_end), 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    median = times[len(times) // 2]
    reading = None
    if clock_seconds > 0:
        sampler = ClockSampler(torch.cuda.current_device())
        if sampler.start():
            begin = datetime.datetime.now()
            deadline = time.monotonic() + clock_seconds
            per_sync = max(1, int(50.0 / max(median, 1e-3)))  # about 50 ms of replays between host checks
            while time.monotonic() < deadline:
                for _ in range(per_sync):
                    flush.zero_()
                    graph.replay()
                torch.cuda.synchronize()
            reading = sampler.stop(begin, datetime.datetime.now())
    del graph
    for leaf in leaves:
        leaf.grad = None
    return median, reading


def _recover_from_failed_capture(home: torch.cuda.Stream, pool) -> None:
    """Undo what a capture that failed inside the captured call leaves behind. When the call does
    what a graph cannot hold (a host sync such as Liger-Kernel's `.item()`), `capture_end` raises
    before the graph context restores the stream and before the CUDA generator leaves capture mode:
    every later kernel would be queued on the dead capture stream, and every later `torch.randn`
    on the device would raise "Offset increment outside graph capture". So: back to the stream of
    before, and the generator on a copy of its state (same seed and offset, not capturing).

    It also raises before telling the caching allocator that the capture is over, and the graph
    object then never releases its memory pool. With a capture still on its books the allocator
    defers the reuse of every block freed after use on a second stream, for good, so the rows after
    a failed capture kept their memory: on an 80 GB H100 the rows after Liger-Kernel's ran out of
    it and were timed by their launches instead. So the capture is ended and its pool released
    here, unless `capture_end` got that far itself (the call raised, the capture did not fail)."""
    torch.cuda.set_stream(home)
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    generator.graphsafe_set_state(generator.clone_state())
    device = torch.cuda.current_device()
    end_capture = getattr(torch._C, "_cuda_endAllocateToPool", None)  # (private: absent, nothing to undo)
    if end_capture is not None:
        try:
            end_capture(device, pool)
        except RuntimeError:  # "not currently recording to mempool_id": the graph releases its pool itself
            pass
        else:
            torch._C._cuda_releasePool(device, pool)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(case: Case, name: str, fn: Callable, reference: Callable, dtype: torch.dtype, clock_seconds: float = 0.0) -> dict:
    import triton.testing

    args, upstream = case.make(dtype)
    row = {"op": case.op, "shape": case.shape, "provider": name, "dtype": str(dtype).replace("torch.", "")}
    # Free device memory before the row: a provider that kept memory shows in the rows after it.
    row["device_free_gib"] = torch.cuda.mem_get_info()[0] / GiB
    try:
        row["error"] = check(fn, reference, args, upstream)
    except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
        row["error"] = f"{type(exc).__name__}: {exc}"[:200]
    if row["error"]:
        return row
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    # Host-inclusive: eager launches timed by do_bench, as a training step without CUDA graphs sees them.
    row["fwd_bwd_host_ms"] = triton.testing.do_bench(
        lambda: run_once(fn, args, upstream, True), grad_to_none=leaves, return_mode="median"
    )
    try:
        ms_fwd, _ = graph_ms(lambda: run_once(fn, args, upstream, False), leaves)
        ms_all, reading = graph_ms(lambda: run_once(fn, args, upstream, True), leaves, clock_seconds=clock_seconds)
        row["timing"] = "cuda_graph"
        if reading is not None:  # the clock and power that the fwd+bwd replays ran at
            row.update(fwd_bwd_sm_mhz=reading["sm_mhz"], fwd_bwd_power_w=reading["power_w"])
    except Exception as exc:  # a provider that cannot be captured is timed with its launches
        torch.cuda.synchronize()
        row["timing"] = f"host (graph capture failed: {type(exc).__name__}: {exc})"[:200]
        ms_fwd = triton.testing.do_bench(lambda: run_once(fn, args, upstream, False), grad_to_none=leaves, return_mode="median")
        ms_all = row["fwd_bwd_host_ms"]
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run_once(fn, args, upstream, True)
    torch.cuda.synchronize()
    row.update(fwd_ms=ms_fwd, fwd_bwd_ms=ms_all, extra_peak_gib=(torch.cuda.max_memory_allocated() - base) / GiB)
    if case.fwd_flops:
        row.update(fwd_tflops=case.fwd_flops / ms_fwd / 1e9, fwd_bwd_tflops=case.fwd_bwd_flops / ms_all / 1e9)
    else:
        row.update(fwd_gbps=case.fwd_bytes / ms_fwd / 1e6, fwd_bwd_gbps=case.fwd_bwd_bytes / ms_all / 1e6)
    del args, upstream, leaves
    torch.cuda.empty_cache()
    return row


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'op':<27} {'shape':<26} {'provider':<8} {'fwd ms':>8} {'fwd+bwd ms':>10} {'fwd+bwd rate':>15} "
        f"{'extra GiB':>9} {'host ms':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['op']:<27} {r['shape']:<26} {r['provider']:<8} failed: {r['error']}")
            continue
        rate = f"{r['fwd_bwd_tflops']:.0f} TFLOP/s" if "fwd_bwd_tflops" in r else f"{r['fwd_bwd_gbps']:.0f} GB/s"
        lines.append(
            f"{r['op']:<27} {r['shape']:<26} {r['provider']:<8} {r['fwd_ms']:>8.3f} {r['fwd_bwd_ms']:>10.3f} {rate:>15} "
            f"{r['extra_peak_gib']:>9.2f} {r['fwd_bwd_host_ms']:>8.3f}" + ("" if r["timing"] == "cuda_graph" else "  (host-timed)")
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r["op"], r["shape"]) for r in rows))
    names = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(15, 0.55 * len(cases) + 2), sharey=True)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        by_case = {(r["op"], r["shape"]): r for r in rows if r["provider"] == name and not r.get("error")}
        ys = [j + i * width for j in range(len(cases))]
        speed = [_eager_ms(rows, c) / by_case[c]["fwd_bwd_ms"] if c in by_case else 0 for c in cases]
        memory = [by_case[c]["extra_peak_gib"] if c in by_case else 0 for c in cases]
        axes[0].barh(ys, speed, height=width, label=name)
        axes[1].barh(ys, memory, height=width, label=name)
    axes[0].set_yticks([j + 0.4 - width / 2 for j in range(len(cases))], [f"{op}\n{shape}" for op, shape in cases], fontsize=7)
    axes[0].invert_yaxis()
    axes[0].axvline(1.0, color="grey", lw=0.8)
    axes[0].set_xlabel("fwd+bwd speed-up over torch eager (higher is better)")
    axes[1].set_xlabel("extra peak memory, GiB (lower is better)")
    axes[0].legend(loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _eager_ms(rows: list[dict], case: tuple[str, str]) -> float:
    for r in rows:
        if (r["op"], r["shape"]) == case and r["provider"] == "torch" and not r.get("error"):
            return r["fwd_bwd_ms"]
    return math.nan


def main(argv: list[str] | None = None) -> None:
    all_ops = [
        "rmsnorm", "layernorm", "swiglu", "rope", "cross_entropy", "fused_linear_cross_entropy", "token_logprobs",
        "swiglu_linear", "swiglu_linear_recompute", "gelu_mlp",
    ]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", nargs="+", choices=all_ops, default=all_ops, help="ops to benchmark (default: all)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer (saves compile time)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/kernels_<device>.json)")
    parser.add_argument("--clocks", action="store_true",
                        help="also read the SM clock and power draw (nvidia-smi) over a second of each graph-timed "
                             "fwd+bwd run back to back")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("benchmarks/kernels.py needs a CUDA GPU; the CPU interpreter is for tests only")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the benchmark times compiled kernels")
    import triton

    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name()
    rows = []
    for case in build_cases("cuda"):
        if case.op not in args.ops:
            continue
        found = providers(case.op, use_compile=not args.no_compile)
        for name, fn in found.items():
            row = measure(case, name, fn, found["torch"], dtype, clock_seconds=1.0 if args.clocks else 0.0)
            clock = f" at {row['fwd_bwd_sm_mhz']:.0f} MHz, {row['fwd_bwd_power_w']:.0f} W" if "fwd_bwd_sm_mhz" in row else ""
            print(f"  {case.op} {case.shape} {name}: " + (row["error"] or f"{row['fwd_bwd_ms']:.3f} ms{clock}"), flush=True)
            rows.append(row)
    try:
        from importlib.metadata import version

        liger_version = version("liger-kernel")
    except Exception:
        liger_version = None
    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "liger_kernel": liger_version,
        "dtype": args.dtype,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if args.clocks:
        meta["gpu_limits"] = limits(torch.cuda.current_device())  # max SM clock and power limit
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    out = args.out or RESULTS_DIR / f"kernels_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    title = f"{device_name}, torch {meta['torch']}, triton {meta['triton']}, {args.dtype}, {meta['date']}"
    plot(rows, out.with_suffix(".png"), title)
    print(f"\nwrote {out} and {out.with_suffix('.png')}")
    print(title)
    print(format_table(rows))


if __name__ == "__main__":
    main()
