"""Benchmark the attention backends side by side on one GPU: forward and forward+backward TFLOP/s
and memory per backend, per shape, and how close `attention: auto` comes to the fastest.

Shapes: sequence lengths 512 to 16k at a fixed number of tokens per batch (batch = tokens / T),
head dims 64 and 128 at a fixed model width (heads = width / head_dim), MHA and GQA (key/value
heads = heads / --gqa-ratio), causal and document-masked (packed documents of random lengths,
about --doc-len tokens on average, at least two per row). Backends: flash_attn (when installed),
sdpa (our kernel priority for this GPU), each SDPA kernel forced alone (sdpa_cudnn, sdpa_flash,
sdpa_efficient: the measurement behind the priority), flex (compiled FlexAttention) and eager
(up to --eager-max-len).

Before timing, every backend's output and q/k/v gradients are checked against an fp32 reference
(eager attention, or the same computed in query chunks at lengths eager cannot hold) by relative
L2 error. Timing is the median of `triton.testing.do_bench`, forward with inputs requiring grad
(as in training). FLOPs count only the kept (query, key) pairs: forward 4 * pairs * heads * D,
backward 2.5 times that. The mask a backend reads (dense keep-mask, BlockMask, cu_seqlens) is
built once per forward and shared by every layer, so it is timed separately (mask_ms), not in
the attention time. `auto` is not timed on its own: it resolves to one of the backends above,
whose time it is compared with; the gap to the fastest row is reported per shape.

    python benchmarks/attention.py                 # the full grid (about 5 minutes on one H100)
    python benchmarks/attention.py --quick         # 1k and 8k tokens, head dim 128 only
    python benchmarks/attention.py --seq-lens 4096 --head-dims 128 --heads gqa --masks documents --backends sdpa flex
    python benchmarks/attention.py --help

Writes benchmarks/results/attention_<device>.json and a PNG beside it; prints a table last.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root on the path

from torch.nn.attention import SDPBackend  # noqa: E402

from src.models.components.attention import flash  # noqa: E402
from src.models.components.attention.backends import (  # noqa: E402
    attend,
    describe_call,
    eager_attention,
    resolve_backend,
    sdpa_attention,
    sdpa_priority,
)
from src.models.components.attention.documents import PackedDocuments  # noqa: E402
from src.models.components.attention.flex import causal_block_mask  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
GiB = 2**30
ALL_BACKENDS = ["flash_attn", "sdpa", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex", "eager"]
FORCED_SDPA = {
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
}
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}  # relative L2 error


@dataclass
class Shape:
    mask: str  # causal | documents | window
    seq_len: int
    head_dim: int
    heads: str  # mha | gqa
    batch: int
    n_heads: int
    n_kv_heads: int
    window: int | None = None

    @property
    def label(self) -> str:
        kv = f"/{self.n_kv_heads}" if self.n_kv_heads != self.n_heads else ""
        return f"{self.mask:<9} {self.batch}x{self.n_heads}{kv}x{self.seq_len}x{self.head_dim}"


def build_shapes(args) -> list[Shape]:
    shapes = []
    for mask in args.masks:
        for head_dim in args.head_dims:
            for heads in args.heads:
                for seq_len in args.seq_lens:
                    n_heads = args.model_dim // head_dim
                    n_kv = n_heads // args.gqa_ratio if heads == "gqa" else n_heads
                    batch = max(1, args.tokens // seq_len)
                    window = args.window if mask == "window" else None
                    shapes.append(Shape(mask, seq_len, head_dim, heads, batch, n_heads, n_kv, window))
    return shapes


def make_documents(shape: Shape, mean_doc_len: int, device: str) -> PackedDocuments:
    """Random document boundaries per row, the same for every backend (fixed seed per shape)."""
    gen = torch.Generator().manual_seed(shape.seq_len)
    T = shape.seq_len
    n_docs = max(2, round(T / mean_doc_len))
    rows = []
    for _ in range(shape.batch):
        cuts = (torch.randperm(T - 1, generator=gen)[: n_docs - 1] + 1).sort().values
        starts = torch.zeros(T, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return PackedDocuments(torch.stack(rows).to(device))


def kept_pairs(shape: Shape, documents: PackedDocuments | None) -> int:
    """(query, key) pairs attention keeps: the work a mask-aware kernel cannot skip."""
    T = shape.seq_len
    if documents is not None:
        lengths = torch.diff(documents.varlen()[0].long()).double()
        return int((lengths * (lengths + 1) / 2).sum().item())
    if shape.window is not None:
        w = min(shape.window, T)
        return shape.batch * (w * (w + 1) // 2 + (T - w) * w)
    return shape.batch * T * (T + 1) // 2


def providers(names: list[str], shape: Shape, documents, eager_max_len: int) -> dict[str, Callable]:
    """name -> fn(q, k, v) -> out, for the backends that exist here and fit this shape."""
    kwargs = dict(sliding_window=shape.window, documents=documents)
    found = {}
    for name in names:
        if name == "flash_attn" and not (flash.fa2_installed() or flash.fa3_installed()):
            continue
        if name == "eager" and shape.seq_len > eager_max_len:
            continue
        if name in FORCED_SDPA:
            kernel = FORCED_SDPA[name]
            found[name] = lambda q, k, v, kernel=kernel: sdpa_attention(q, k, v, priority=[kernel], **kwargs)
        else:
            found[name] = lambda q, k, v, name=name: attend(q, k, v, backend=name, **kwargs)
    return found


def chunked_reference(q, k, v, grad_out, shape: Shape, documents, chunk: int = 1024):
    """fp32 attention and its q/k/v gradients, one block of queries at a time (memory ~ chunk x T).

    Mathematically the eager reference: the same masks, softmax in fp32; each chunk's graph is
    freed after its backward pass."""
    q, k, v = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    group = shape.n_heads // shape.n_kv_heads
    scale = 1.0 / math.sqrt(shape.head_dim)
    out = torch.empty_like(q)
    pos = torch.arange(shape.seq_len, device=q.device)
    for b in range(shape.batch):
        for start in range(0, shape.seq_len, chunk):
            end = min(start + chunk, shape.seq_len)  # causal: keys up to `end` suffice
            qc = q[b, start:end].transpose(0, 1)  # (H, C, D)
            kc = k[b, :end].transpose(0, 1).repeat_interleave(group, dim=0)  # (H, end, D)
            vc = v[b, :end].transpose(0, 1).repeat_interleave(group, dim=0)
            keep = pos[None, :end] <= pos[start:end, None]  # (C, end)
            if shape.window is not None:
                keep = keep & (pos[None, :end] > pos[start:end, None] - shape.window)
            if documents is not None:
                seg = documents.segments[b]
                keep = keep & (seg[start:end, None] == seg[None, :end])
            scores = (qc @ kc.transpose(1, 2)) * scale  # (H, C, end)
            probs = scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)
            oc = (probs @ vc).transpose(0, 1)  # (C, H, D)
            out[b, start:end] = oc.detach()
            torch.autograd.backward(oc, grad_out[b, start:end].float())
    return out, (q.grad, k.grad, v.grad)


def reference(q, k, v, grad_out, shape: Shape, documents, eager_max_len: int):
    if shape.seq_len <= eager_max_len:
        q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        out = eager_attention(q32, k32, v32, sliding_window=shape.window, documents=documents)
        out.backward(grad_out.float())
        return out.detach(), (q32.grad, k32.grad, v32.grad)
    return chunked_reference(q, k, v, grad_out, shape, documents)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-12)).item()


def check(fn, q, k, v, grad_out, ref) -> tuple[float, str]:
    """Worst relative L2 error over output and gradients, and '' or what went wrong."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out)
    ref_out, ref_grads = ref
    errors = [rel_err(out, ref_out)] + [rel_err(leaf.grad, g) for leaf, g in zip(leaves, ref_grads)]
    return max(errors), ""


def mask_build_ms(name: str, shape: Shape, documents_ids: torch.Tensor | None) -> float | None:
    """Time to build the mask form `name` reads, once per forward (shared by all layers)."""
    import triton.testing

    if documents_ids is None and name != "flex":
        return None

    def build():
        if documents_ids is None:
            causal_block_mask.cache_clear()
            causal_block_mask(shape.seq_len, shape.window, "cuda")
            return
        docs = PackedDocuments(documents_ids)
        if name == "flex":
            docs.block_mask(shape.window)
        elif name == "flash_attn":
            docs.varlen()
        else:
            docs.keep_mask(shape.window)

    ms = triton.testing.do_bench(build, warmup=5, rep=20, return_mode="median")
    causal_block_mask.cache_clear()
    return ms


def measure(name: str, fn: Callable, shape: Shape, q, k, v, grad_out, ref, pairs: int, dtype, timing) -> dict:
    import triton.testing

    row = {"shape": shape.label.strip(), **asdict(shape), "backend": name}
    try:
        row["max_rel_err"], row["error"] = check(fn, q, k, v, grad_out, ref)
        if row["max_rel_err"] > TOLERANCE[dtype]:
            row["error"] = f"mismatch: relative error {row['max_rel_err']:.2e} > {TOLERANCE[dtype]:.0e}"
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as exc:  # a backend or forced kernel that cannot serve this shape is reported, not fatal
        message = str(exc)
        unsupported = "No available kernel" in message
        row["error"] = "no SDPA kernel serves this call" if unsupported else f"{type(exc).__name__}: {message}"[:160]
    if row["error"]:
        torch.cuda.empty_cache()
        return row
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def fwd():
        return fn(*leaves)

    def fwd_bwd():
        fn(*leaves).backward(grad_out)

    warmup, rep = timing
    row["fwd_ms"] = triton.testing.do_bench(fwd, warmup=warmup, rep=rep, grad_to_none=leaves, return_mode="median")
    row["fwd_bwd_ms"] = triton.testing.do_bench(fwd_bwd, warmup=warmup, rep=rep, grad_to_none=leaves, return_mode="median")
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    row["extra_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GiB
    fwd_flops = 4 * pairs * shape.n_heads * shape.head_dim
    row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = 3.5 * fwd_flops / row["fwd_bwd_ms"] / 1e9
    return row


def auto_summary(shape: Shape, rows: list[dict], q, k, documents) -> dict:
    """What `auto` picks for this shape, and how far its time is from the fastest backend measured."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k)]
    request = describe_call(*leaves, sliding_window=shape.window, documents=documents)
    picked = resolve_backend("auto", request)
    ok = [r for r in rows if not r.get("error")]
    summary = {"shape": shape.label.strip(), **asdict(shape), "auto": picked}
    if not ok:
        return summary
    for mode in ("fwd_bwd", "fwd"):
        fastest = min(ok, key=lambda r: r[f"{mode}_ms"])
        mine = next((r for r in ok if r["backend"] == picked), None)
        summary[f"{mode}_fastest"] = fastest["backend"]
        summary[f"{mode}_gap_pct"] = 100 * (mine[f"{mode}_ms"] / fastest[f"{mode}_ms"] - 1) if mine else None
    return summary


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'shape':<30} {'backend':<15} {'fwd ms':>8} {'fwd TF/s':>8} {'f+b ms':>8} {'f+b TF/s':>8} "
        f"{'extra GiB':>9} {'mask ms':>8} {'rel err':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['shape']:<30} {r['backend']:<15} failed: {r['error']}")
            continue
        mask = f"{r['mask_ms']:.3f}" if r.get("mask_ms") is not None else "-"
        lines.append(
            f"{r['shape']:<30} {r['backend']:<15} {r['fwd_ms']:>8.3f} {r['fwd_tflops']:>8.0f} {r['fwd_bwd_ms']:>8.3f} "
            f"{r['fwd_bwd_tflops']:>8.0f} {r['extra_peak_gib']:>9.2f} {mask:>8} {r['max_rel_err']:>8.1e}"
        )
    return "\n".join(lines)


def format_summary(rows: list[dict], summaries: list[dict], names: list[str]) -> str:
    """One line per shape: fwd+bwd TFLOP/s of each backend, auto's pick and its gap to the fastest."""
    header = f"{'shape':<30} " + " ".join(f"{n:>14}" for n in names) + f" {'auto':>10} {'gap %':>6}"
    lines = [f"fwd+bwd TFLOP/s (- = failed or not run); auto's gap to the fastest, fwd+bwd", header, "-" * len(header)]
    for s in summaries:
        by_name = {r["backend"]: r for r in rows if r["shape"] == s["shape"] and not r.get("error")}
        cells = " ".join(f"{by_name[n]['fwd_bwd_tflops']:>14.0f}" if n in by_name else f"{'-':>14}" for n in names)
        gap = s.get("fwd_bwd_gap_pct")
        lines.append(f"{s['shape']:<30} {cells} {s['auto']:>10} {gap if gap is None else round(gap, 1)!s:>6}")
    gaps = [s["fwd_bwd_gap_pct"] for s in summaries if s.get("fwd_bwd_gap_pct") is not None]
    if gaps:
        within = sum(g <= 5.0 for g in gaps)
        lines.append(f"auto within 5% of the fastest on {within}/{len(gaps)} shapes (worst gap {max(gaps):.1f}%)")
    return "\n".join(lines)


def plot(rows: list[dict], summaries: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["mask"], r["head_dim"], r["heads"]) for r in rows))
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False, sharey=True)
    names = list(dict.fromkeys(r["backend"] for r in rows))
    for ax, (mask, head_dim, heads) in zip(axes.flat, panels):
        for name in names:
            pts = sorted(
                (r["seq_len"], r["fwd_bwd_tflops"])
                for r in rows
                if (r["mask"], r["head_dim"], r["heads"], r["backend"]) == (mask, head_dim, heads, name) and not r.get("error")
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        picks = [(s["seq_len"], s["auto"]) for s in summaries if (s["mask"], s["head_dim"], s["heads"]) == (mask, head_dim, heads)]
        for seq_len, picked in picks:
            same = [r for r in rows if (r["mask"], r["head_dim"], r["heads"], r["seq_len"]) == (mask, head_dim, heads, seq_len)]
            r = next((r for r in same if r["backend"] == picked and not r.get("error")), None)
            if r:
                ax.scatter([seq_len], [r["fwd_bwd_tflops"]], s=60, facecolors="none", edgecolors="black", zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mask}, head_dim {head_dim}, {heads}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("fwd+bwd TFLOP/s")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, title="circle = auto's pick", title_fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128], help="head dimensions")
    parser.add_argument("--heads", nargs="+", choices=["mha", "gqa"], default=["mha", "gqa"], help="MHA and/or GQA")
    parser.add_argument(
        "--masks",
        nargs="+",
        choices=["causal", "documents", "window"],
        default=["causal", "documents"],
        help="causal, packed documents (block-causal), sliding window (--window)",
    )
    parser.add_argument(
        "--backends", nargs="+", choices=ALL_BACKENDS, default=ALL_BACKENDS, help="backends to time (missing ones are skipped)"
    )
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch: batch = tokens // seq_len (at least 1)")
    parser.add_argument("--model-dim", type=int, default=2048, help="query heads x head_dim")
    parser.add_argument("--gqa-ratio", type=int, default=4, help="query heads per key/value head for --heads gqa")
    parser.add_argument("--doc-len", type=int, default=1024, help="mean packed-document length (at least 2 documents per row)")
    parser.add_argument("--window", type=int, default=1024, help="sliding window for --masks window")
    parser.add_argument(
        "--eager-max-len", type=int, default=4096, help="longest sequence for the eager backend and the unchunked reference"
    )
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="seq lens 1024 and 8192, head dim 128: every backend, fast")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/attention_<device>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens, args.head_dims = [1024, 8192], [128]
    for flag, values in (("--seq-lens", args.seq_lens), ("--head-dims", args.head_dims), ("--tokens", [args.tokens]),
                         ("--model-dim", [args.model_dim]), ("--gqa-ratio", [args.gqa_ratio]),
                         ("--doc-len", [args.doc_len]), ("--window", [args.window])):
        if min(values) < 1:
            parser.error(f"{flag} must be positive, got {' '.join(map(str, values))}")
    if not torch.cuda.is_available():
        parser.error("benchmarks/attention.py needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the benchmark times compiled kernels")
    for head_dim in args.head_dims:
        if args.model_dim % head_dim or ("gqa" in args.heads and (args.model_dim // head_dim) % args.gqa_ratio):
            parser.error(f"--model-dim {args.model_dim} must split into heads of {head_dim}, and those by --gqa-ratio {args.gqa_ratio}")
    import triton

    # Every shape compiles FlexAttention anew; the default limit (8) would drop it to eager mid-run.
    for limit in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 256)

    dtype = getattr(torch, args.dtype)
    device_name = torch.cuda.get_device_name()
    timing = (10, 40) if not args.quick else (10, 25)  # do_bench warmup / repetition, ms
    started = time.perf_counter()
    rows, summaries = [], []
    for shape in build_shapes(args):
        torch.manual_seed(0)
        q = torch.randn(shape.batch, shape.seq_len, shape.n_heads, shape.head_dim, device="cuda", dtype=dtype)
        k = torch.randn(shape.batch, shape.seq_len, shape.n_kv_heads, shape.head_dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        grad_out = torch.randn_like(q)
        documents = make_documents(shape, args.doc_len, "cuda") if shape.mask == "documents" else None
        pairs = kept_pairs(shape, documents)
        ref = reference(q, k, v, grad_out, shape, documents, args.eager_max_len)
        shape_rows = []
        for name, fn in providers(args.backends, shape, documents, args.eager_max_len).items():
            row = measure(name, fn, shape, q, k, v, grad_out, ref, pairs, dtype, timing)
            if not row.get("error"):
                doc_ids = documents.segments if documents is not None else None
                row["mask_ms"] = mask_build_ms(name, shape, doc_ids)
            result = row["error"] or f"{row['fwd_bwd_ms']:.3f} ms, {row['fwd_bwd_tflops']:.0f} TFLOP/s"
            print(f"  {shape.label} {name}: {result}", flush=True)
            shape_rows.append(row)
        summaries.append(auto_summary(shape, shape_rows, q, k, documents))
        rows.extend(shape_rows)
        del q, k, v, grad_out, ref, documents
        torch.cuda.empty_cache()
    elapsed = time.perf_counter() - started

    meta = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "flash_attn": "fa3" if flash.fa3_installed() else "fa2" if flash.fa2_installed() else None,
        "sdpa_priority": [b.name for b in sdpa_priority(torch.device("cuda"))],
        "dtype": args.dtype,
        "tokens_per_batch": args.tokens,
        "model_dim": args.model_dim,
        "mean_doc_len": args.doc_len,
        "elapsed_s": round(elapsed, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    out = args.out or RESULTS_DIR / f"attention_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows, "auto": summaries}, indent=2))
    title = f"{device_name}, torch {meta['torch']}, {args.dtype}, {args.tokens} tokens/batch, "
    title += f"width {args.model_dim}, {meta['date']}"
    plot(rows, summaries, out.with_suffix(".png"), title)
    names = [n for n in args.backends if any(r["backend"] == n for r in rows)]
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {elapsed:.0f} s")
    print(title)
    print(format_table(rows))
    print()
    print(format_summary(rows, summaries, names))


if __name__ == "__main__":
    main()
