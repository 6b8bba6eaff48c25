"""Probe: Triton's automatic warp specialization on Hopper for the GEMMs with fused epilogues.

kernels/README.md traces the remaining gaps of the fused linear + cross-entropy and of the fused
SwiGLU backward to Triton GEMMs whose epilogues do not overlap the next tile's matmul. Triton 3.6
and 3.7 have a Hopper pass for that: `tl.range(..., warp_specialize=True)` on the persistent tile
loop, with TMA descriptors built on the device (`tl.make_tensor_descriptor`) and 4 warps per
group. It then emits one loading warp group and two computing ones (384 threads, registers moved
between them with `setmaxnreg`). With host-built descriptors the pass fails, and with 8 warps it
leaves the loop alone. This probe measures such kernels against cuBLAS and the committed ones:

- the SwiGLU backward in the down projection's `dh` GEMM (Qwen2-0.5B, 8192 tokens), with and
  without h written again from the epilogue (what `swiglu: fused_linear_recompute` needs);
- the logits GEMM of one 1024-token chunk at Qwen2-0.5B's head, with and without per-(row, tile)
  max and sum-of-exp in its epilogue (what a one-read loss kernel needs);
- the weight-gradient accumulation `dW += G.T @ h` of that chunk.

Each kernel's output is checked against the unfused path before it is timed (do_bench medians).

    python benchmarks/probe_warp_specialize.py --compile-only  # no GPU: compile for sm_90, report
    python benchmarks/probe_warp_specialize.py                 # GPU: table, JSON + PNG

Writes benchmarks/results/probe_<device>_warp_specialize.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere

from kernels.swiglu_linear import _tile_ids  # noqa: E402  (the committed kernels' tile order)


@triton.jit
def ws_dgate_up_kernel(
    dy_ptr, w_ptr, gu_ptr, dgu_ptr, h_ptr, M, H, D,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, WS: tl.constexpr, STORE_H: tl.constexpr,
):
    """kernels/swiglu_linear.py's `_dgate_up_kernel` with device-built descriptors: dh = dy @ w
    tile by tile, then [dgate | dup] of the SwiGLU into dgu (M, 2H), and with STORE_H h too."""
    dy_desc = tl.make_tensor_descriptor(dy_ptr, shape=[M, D], strides=[D, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[D, H], strides=[H, 1], block_shape=[BK, BN])
    gate_desc = tl.make_tensor_descriptor(gu_ptr, shape=[M, H], strides=[2 * H, 1], block_shape=[BM, BN])
    up_desc = tl.make_tensor_descriptor(gu_ptr + H, shape=[M, H], strides=[2 * H, 1], block_shape=[BM, BN])
    dgate_desc = tl.make_tensor_descriptor(dgu_ptr, shape=[M, H], strides=[2 * H, 1], block_shape=[BM, BN])
    dup_desc = tl.make_tensor_descriptor(dgu_ptr + H, shape=[M, H], strides=[2 * H, 1], block_shape=[BM, BN])
    h_desc = tl.make_tensor_descriptor(h_ptr, shape=[M, H], strides=[H, 1], block_shape=[BM, BN])
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(H, BN)
    k_tiles = tl.cdiv(D, BK)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=not WS, warp_specialize=WS):
        pid_m, pid_n = _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(k_tiles):
            a = dy_desc.load([off_m, k * BK])
            b = w_desc.load([k * BK, off_n])
            acc = tl.dot(a, b, acc)
        dh = acc.to(dgate_desc.dtype).to(tl.float32)
        g = gate_desc.load([off_m, off_n]).to(tl.float32)
        u = up_desc.load([off_m, off_n]).to(tl.float32)
        sig = tl.sigmoid(g)
        dgate_desc.store([off_m, off_n], (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dgate_desc.dtype))
        dup_desc.store([off_m, off_n], (dh * g * sig).to(dup_desc.dtype))
        if STORE_H:
            h_desc.store([off_m, off_n], (g * sig * u).to(h_desc.dtype))


@triton.jit
def ws_logits_kernel(
    x_ptr, w_ptr, out_ptr, stats_ptr, M, V, K,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, WS: tl.constexpr, STATS: tl.constexpr,
):
    """out (M, V) = x (M, K) @ w (V, K).T; with STATS, per (row, N-tile) max and sum of exp of the
    rounded logits into stats (2, M, n_tiles) fp32."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BM, BK])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[V, K], strides=[K, 1], block_shape=[BN, BK])
    o_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, V], strides=[V, 1], block_shape=[BM, BN])
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(V, BN)
    k_tiles = tl.cdiv(K, BK)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=not WS, warp_specialize=WS):
        pid_m, pid_n = _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(k_tiles):
            a = x_desc.load([off_m, k * BK])
            b = w_desc.load([off_n, k * BK])
            acc = tl.dot(a, b.T, acc)
        logits = acc.to(o_desc.dtype)
        o_desc.store([off_m, off_n], logits)
        if STATS:
            cols = off_n + tl.arange(0, BN)
            x = tl.where(cols[None, :] < V, logits.to(tl.float32), float("-inf"))
            m = tl.max(x, axis=1)
            s = tl.sum(tl.exp(x - m[:, None]), axis=1)
            rows = off_m + tl.arange(0, BM)
            ptrs = stats_ptr + rows.to(tl.int64) * num_pid_n + pid_n
            tl.store(ptrs, m, mask=rows < M)
            tl.store(ptrs + M * num_pid_n, s, mask=rows < M)


@triton.jit
def ws_dw_kernel(
    g_ptr, x_ptr, dw_ptr, V, H, C,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, WS: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """dw (V, H) (+)= g (C, V).T @ x (C, H)."""
    g_desc = tl.make_tensor_descriptor(g_ptr, shape=[C, V], strides=[V, 1], block_shape=[BK, BM])
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[C, H], strides=[H, 1], block_shape=[BK, BN])
    dw_desc = tl.make_tensor_descriptor(dw_ptr, shape=[V, H], strides=[H, 1], block_shape=[BM, BN])
    num_pid_m = tl.cdiv(V, BM)
    num_pid_n = tl.cdiv(H, BN)
    k_tiles = tl.cdiv(C, BK)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=not WS, warp_specialize=WS):
        pid_m, pid_n = _tile_ids(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(k_tiles):
            a = g_desc.load([k * BK, off_m])  # (BK, BM)
            b = x_desc.load([k * BK, off_n])
            acc = tl.dot(a.T, b, acc)
        if ACCUMULATE:
            acc += dw_desc.load([off_m, off_n]).to(tl.float32)
        dw_desc.store([off_m, off_n], acc.to(dw_desc.dtype))


VARIANTS = {}  # name: (kernel, signature, constexprs, warps, stages)
DGATE_UP_SIG = {**{n: "*bf16" for n in ("dy_ptr", "w_ptr", "gu_ptr", "dgu_ptr", "h_ptr")}, "M": "i32", "H": "i32", "D": "i32"}
LOGITS_SIG = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "stats_ptr": "*fp32", "M": "i32", "V": "i32", "K": "i32"}
DW_SIG = {"g_ptr": "*bf16", "x_ptr": "*bf16", "dw_ptr": "*bf16", "V": "i32", "H": "i32", "C": "i32"}
TILES = {"BM": 128, "BK": 64, "GROUP_M": 8}


def add(name, kernel, signature, consts, warps, stages):
    VARIANTS[name] = (kernel, signature, dict(TILES, **consts), warps, stages)


# Warp-specialized: 4 warps per group (the pass needs them); stages as shared memory allows.
for stages in (3, 4):
    for store_h in (False, True):
        add(f"dgate_up ws=1 128x128x64 s{stages}{' +h' if store_h else ''}", ws_dgate_up_kernel, DGATE_UP_SIG,
            {"BN": 128, "WS": True, "STORE_H": store_h}, 4, stages)
add("dgate_up ws=1 128x256x64 s3", ws_dgate_up_kernel, DGATE_UP_SIG, {"BN": 256, "WS": True, "STORE_H": False}, 4, 3)
for stats in (False, True):
    for bn in (128, 256):
        add(f"logits ws=1 128x{bn}x64{' +stats' if stats else ''}", ws_logits_kernel, LOGITS_SIG,
            {"BN": bn, "WS": True, "STATS": stats}, 4, 4 if bn == 128 else 3)
for bn in (128, 256):
    add(f"dW+= ws=1 128x{bn}x64", ws_dw_kernel, DW_SIG, {"BN": bn, "WS": True, "ACCUMULATE": True}, 4, 4 if bn == 128 else 3)
# Controls: the same kernels and descriptors without the pass (8 warps, `flatten` pipelining, as
# the committed kernels run).
add("dgate_up ws=0 128x128x64 s4", ws_dgate_up_kernel, DGATE_UP_SIG, {"BN": 128, "WS": False, "STORE_H": False}, 8, 4)
add("dW+= ws=0 128x128x64", ws_dw_kernel, DW_SIG, {"BN": 128, "WS": False, "ACCUMULATE": True}, 8, 4)


def compile_only():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, (kernel, signature, consts, warps, stages) in VARIANTS.items():
        consts = dict(consts, NUM_PROGRAMS=132)
        try:
            c = triton.compile(ASTSource(kernel, signature, consts), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "num_stages": stages})
            ptx = c.asm["ptx"]
            threads = re.findall(r"reqntid (\d+)", ptx)
            print(f"{name:40s} ok  ws_op={'ttg.warp_specialize' in c.asm['ttgir']} threads={threads} "
                  f"smem={c.metadata.shared} setmaxnreg={ptx.count('setmaxnreg')} local={ptx.count('.local')}")
        except Exception as e:  # noqa: BLE001
            print(f"{name:40s} FAIL {str(e).splitlines()[0][:150]}")


def _unwritten(t: torch.Tensor) -> float:
    """Fraction of elements not finite: outputs start as NaN, so these were never written (or were
    computed from garbage)."""
    return (~torch.isfinite(t)).float().mean().item()


def bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def plot(rows: list[tuple], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [(what, ms) for what, ms, note in rows if ms == ms and "nan" not in note]  # right and timed
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(timed) + 1.5))
    ax.barh([w for w, _ in timed], [1e3 * ms for _, ms in timed])
    for i, (_, ms) in enumerate(timed):
        ax.text(1e3 * ms, i, f" {1e3 * ms:.0f} us", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("us (lower is better); kernels with wrong outputs left out")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def gpu(out_path: Path | None):
    from kernels.swiglu import _swiglu_packed_bwd_launch, _swiglu_packed_bwd_rows
    from kernels.swiglu_linear import _dgate_up_fused

    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    rows = []
    torch.manual_seed(0)

    def run_variant(name, grid_tiles, args):
        kernel, _sig, consts, warps, stages = VARIANTS[name]
        programs = min(sms, grid_tiles(consts))
        launch = lambda: kernel[(programs,)](*args, **consts, NUM_PROGRAMS=programs, num_warps=warps, num_stages=stages)  # noqa: E731
        launch()
        torch.cuda.synchronize()
        return launch

    # ---- SwiGLU backward in the down projection's dh GEMM: Qwen2-0.5B, 4 x 2048 tokens
    M, D, H = 8192, 896, 4864
    dy = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
    w = torch.randn(D, H, device=dev, dtype=torch.bfloat16) / 30
    gu = torch.randn(M, 2 * H, device=dev, dtype=torch.bfloat16)
    ref_dh = torch.mm(dy, w)
    ref_dgu, ref_h = _swiglu_packed_bwd_rows(ref_dh, gu, store_y=True)
    t_mm = bench(lambda: torch.mm(dy, w))
    t_rows = bench(lambda: _swiglu_packed_bwd_launch(ref_dh, gu))
    t_rows_h = bench(lambda: _swiglu_packed_bwd_rows(ref_dh, gu, store_y=True))
    t_cur = bench(lambda: _dgate_up_fused(dy, w, gu))
    err = (_dgate_up_fused(dy, w, gu).float() - ref_dgu.float()).abs().max().item()
    rows.append(("dgate_up: cuBLAS dh", t_mm, ""))
    rows.append(("dgate_up: row kernel (no h / + h)", t_rows, f"{t_rows_h * 1e3:.1f} us with h"))
    rows.append(("dgate_up: cuBLAS dh + row kernel", t_mm + t_rows, f"+h {(t_mm + t_rows_h) * 1e3:.1f} us"))
    rows.append(("dgate_up: committed fused kernel", t_cur, f"max err {err:.3g}"))
    for name in [n for n in VARIANTS if n.startswith("dgate_up")]:
        dgu = torch.full_like(gu, float("nan"))
        h = torch.full((M, H), float("nan"), device=dev, dtype=torch.bfloat16)
        try:
            launch = run_variant(name, lambda c: triton.cdiv(M, c["BM"]) * triton.cdiv(H, c["BN"]), (dy, w, gu, dgu, h, M, H, D))
            e = (dgu.float() - ref_dgu.float()).abs().max().item()
            note = f"max err {e:.3g}, {_unwritten(dgu):.1%} not finite"
            if VARIANTS[name][2]["STORE_H"]:
                note += f", h err {(h.float() - ref_h.float()).abs().max().item():.3g}"
            rows.append((name, bench(launch), note))
        except Exception as ex:  # noqa: BLE001
            rows.append((name, float("nan"), f"FAIL {str(ex).splitlines()[0][:120]}"))

    # ---- fused linear + CE parts, one 1024-token chunk at Qwen2-0.5B's head
    C, K, V = 1024, 896, 151936
    x = torch.randn(C, K, device=dev, dtype=torch.bfloat16)
    wv = torch.randn(V, K, device=dev, dtype=torch.bfloat16) / 30
    ref = torch.mm(x, wv.t())
    rows.append(("logits: cuBLAS", bench(lambda: torch.mm(x, wv.t(), out=ref)), ""))
    for name in [n for n in VARIANTS if n.startswith("logits")]:
        out = torch.full((C, V), float("nan"), device=dev, dtype=torch.bfloat16)
        consts = VARIANTS[name][2]
        stats = torch.full((2, C, triton.cdiv(V, consts["BN"])), float("nan"), device=dev)
        try:
            launch = run_variant(name, lambda c: triton.cdiv(C, c["BM"]) * triton.cdiv(V, c["BN"]), (x, wv, out, stats, C, V, K))
            e = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            note = f"rel err {e:.3g}"
            if consts["STATS"]:
                lse = (stats[0] + stats[1].log()).logsumexp(-1)
                note += f", lse err {(lse - out.float().logsumexp(-1)).abs().max().item():.3g}, {_unwritten(stats):.1%} of stats not finite"
            rows.append((name, bench(launch), note))
        except Exception as ex:  # noqa: BLE001
            rows.append((name, float("nan"), f"FAIL {str(ex).splitlines()[0][:120]}"))

    g = torch.randn(C, V, device=dev, dtype=torch.bfloat16) / 100
    dw0 = torch.randn(V, K, device=dev, dtype=torch.bfloat16)
    dw = dw0.clone()
    rows.append(("dW+=: cuBLAS addmm_", bench(lambda: dw.addmm_(g.t(), x)), ""))
    rows.append(("dW=: cuBLAS mm", bench(lambda: torch.mm(g.t(), x)), ""))
    ref_dw = dw0.float() + torch.mm(g.t().float(), x.float())
    for name in [n for n in VARIANTS if n.startswith("dW")]:
        dw = dw0.clone()
        try:
            launch = run_variant(name, lambda c: triton.cdiv(V, c["BM"]) * triton.cdiv(K, c["BN"]), (g, x, dw, V, K, C))
            e = ((dw.float() - ref_dw).abs().max() / ref_dw.abs().max()).item()
            note = f"rel err {e:.3g}, {_unwritten(dw):.1%} not finite (after one call)"
            dw = dw0.clone()
            rows.append((name, bench(launch), note))
        except Exception as ex:  # noqa: BLE001
            rows.append((name, float("nan"), f"FAIL {str(ex).splitlines()[0][:120]}"))

    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "rows": [{"what": r[0], "ms": r[1], "note": r[2]} for r in rows]}
    slug = re.sub(r"[^a-z0-9]+", "_", info["device"].lower()).strip("_")
    out_path = out_path or REPO / "benchmarks" / "results" / f"probe_{slug}_warp_specialize.json"
    with open(out_path, "w") as f:
        json.dump(info, f, indent=1)
    plot(rows, out_path.with_suffix(".png"), f"Triton {info['triton']} Hopper warp specialization, {info['device']}")
    print(f"{info['device']}, torch {info['torch']}, triton {info['triton']}")
    for what, ms, note in rows:
        print(f"{what:44s} {ms * 1e3:9.1f} us  {note}")
    print(f"wrote {out_path} and {out_path.with_suffix('.png')}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--compile-only", action="store_true", help="compile each variant for sm_90 (no GPU needed)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/probe_<device>_warp_specialize.json)")
    a = p.parse_args()
    if a.compile_only:
        compile_only()
    elif not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        p.error("the timed probe needs a CUDA GPU and no TRITON_INTERPRET; --compile-only runs anywhere")
    else:
        gpu(a.out)
