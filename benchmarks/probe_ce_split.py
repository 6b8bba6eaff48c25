"""Probe: cross-entropy loss and gradient over (N, V) logits in one read, each row split over
programs, against the committed two-read row kernel (kernels/cross_entropy.py), on a GPU.

The one-launch loss + gradient kernel of `cross_entropy.py` reads every row twice: once for the
log-sum-exp, once more to write the gradient over it. A row of 151936 bf16 logits (297 KiB) does
not fit in one program's registers, but a segment of BLOCK columns does. Here SEGMENTS programs
share each row: each loads its segment once and keeps it in registers, publishes the segment's
max m_s, sum_j exp(x_j - m_s) and (label smoothing) sum_j x_j, waits until every segment of the
row has published, combines them into the row's lse, and writes its segment of the gradient from
the registers. HBM traffic: one read and one write of the logits instead of two reads and a write.

    lse  = M + log(sum_s S_s exp(m_s - M)),  M = max_s m_s
    loss, dx: as in cross_entropy.py (upstream gradient 1; written by the label's segment)

Waiting on other programs needs them to run at the same time. The grid is persistent and sized
to what is resident at once (`programs_for`); even when it is not, the programs of a row are
consecutive, so rows whose programs all run finish and free their slots. Triton's CPU interpreter
runs programs one after another, where a wait could never end: there (and with
`two_launches=True`) the same kernel runs twice, once publishing the partials and once combining
them and writing the gradient, which reads the logits twice but executes every line except the wait.

Limits: as cross_entropy.py; V up to BLOCK x (programs resident at once).

What the probe runs: correctness of the split kernel against the committed one at real sizes
(bf16, ignored rows, label smoothing, z-loss; one launch and two launches), a launch-setting
sweep per shape with registers and spills, a device copy of the same bytes as the ceiling, and
the fused linear + cross-entropy op with either row kernel.

    python benchmarks/probe_ce_split.py [--out DIR]

Writes DIR/probe_<device>_ce_split.json (default benchmarks/results). The CPU tests run the
kernel through the interpreter (tests/benchmarks/test_probe_ce_split.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere

import kernels.fused_linear_cross_entropy as flce  # noqa: E402
from kernels import num_sms  # noqa: E402
from kernels.cross_entropy import ce_forward_backward_rows, check_logits_labels  # noqa: E402

# -- the kernel -----------------------------------------------------------------------------------

# PHASE: one launch with the wait, or the two launches without it
PUBLISH_AND_WRITE = tl.constexpr(0)
PUBLISH = tl.constexpr(1)
WRITE = tl.constexpr(2)


@triton.jit
def _cross_entropy_split_kernel(
    LOGITS_ptr,  # (N, V) logits, overwritten with d loss / d logits (upstream gradient 1)
    LABELS_ptr,  # (N,) integer labels
    LOSS_ptr,  # (N,) fp32 output: per-row loss (0 for ignored rows)
    PARTIALS_ptr,  # (N, SEGMENTS, 3) fp32 scratch: per segment max, sum of exp(x - max), sum of x
    ARRIVED_ptr,  # (N,) int32, zero on entry: segments of the row that have published
    stride_lm,
    N,
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    SEGMENTS: tl.constexpr,
    SEGMENTS_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    PHASE: tl.constexpr,
):
    label_smoothing = tl.cast(label_smoothing, tl.float32)  # Inductor may pass Python floats as fp64
    z_loss = tl.cast(z_loss, tl.float32)
    segment = tl.program_id(0) % SEGMENTS
    groups = tl.num_programs(0) // SEGMENTS  # rows in flight at once
    offs = tl.arange(0, BLOCK)  # columns of this program's segment, from its first
    first_col = segment * BLOCK
    seg_ids = tl.arange(0, SEGMENTS_POW2)
    seg_mask = seg_ids < SEGMENTS
    in_row = offs < V - first_col
    # The first row's label and segment; inside the loop the next row's are loaded while this
    # row waits for its other segments.
    row0 = tl.program_id(0) // SEGMENTS
    label_next = tl.load(LABELS_ptr + row0, mask=row0 < N, other=ignore_index).to(tl.int64)
    x_next = tl.load(
        LOGITS_ptr + tl.cast(row0, tl.int64) * stride_lm + first_col + offs,
        mask=in_row & (label_next != ignore_index), other=float("-inf"),
    )  # fmt: skip
    for row in range(row0, N, groups):
        label = label_next
        x = x_next.to(tl.float32)  # (BLOCK,) this row's segment, kept until its gradient is written
        seg_ptr = LOGITS_ptr + tl.cast(row, tl.int64) * stride_lm + first_col
        part_ptr = PARTIALS_ptr + tl.cast(row, tl.int64) * (SEGMENTS * 3)
        valid = label != ignore_index  # every segment of the row sees the label: an ignored row has no partials, no wait
        if PHASE != WRITE:
            if valid:
                m = tl.max(x, axis=0)
                m_safe = tl.where(m == float("-inf"), 0.0, m)  # a segment of -inf logits adds 0, not nan
                tl.store(part_ptr + segment * 3, m)
                tl.store(part_ptr + segment * 3 + 1, tl.sum(tl.exp(x - m_safe), axis=0))
                if HAS_SMOOTHING:
                    tl.store(part_ptr + segment * 3 + 2, tl.sum(tl.where(in_row, x, 0.0), axis=0))
                if PHASE == PUBLISH_AND_WRITE:
                    # Every thread's partial stores happen before the release.
                    tl.debug_barrier()
                    tl.atomic_add(ARRIVED_ptr + row, 1, sem="release", scope="gpu")
        nxt = row + groups
        label_next = tl.load(LABELS_ptr + nxt, mask=nxt < N, other=ignore_index).to(tl.int64)
        x_next = tl.load(
            LOGITS_ptr + tl.cast(nxt, tl.int64) * stride_lm + first_col + offs,
            mask=in_row & (label_next != ignore_index), other=float("-inf"),
        )  # fmt: skip
        if PHASE != PUBLISH:
            if valid:
                if PHASE == PUBLISH_AND_WRITE:  # wait for the row's other segments; read their partials from L2 (.cg)
                    arrived = tl.atomic_add(ARRIVED_ptr + row, 0, sem="acquire", scope="gpu")
                    while arrived < SEGMENTS:
                        arrived = tl.atomic_add(ARRIVED_ptr + row, 0, sem="acquire", scope="gpu")
                    tl.debug_barrier()
                pm = tl.load(part_ptr + seg_ids * 3, mask=seg_mask, other=float("-inf"), cache_modifier=".cg")
                ps = tl.load(part_ptr + seg_ids * 3 + 1, mask=seg_mask, other=0.0, cache_modifier=".cg")
                big = tl.max(pm, axis=0)
                big = tl.where(big == float("-inf"), 0.0, big)
                lse = big + tl.log(tl.sum(ps * tl.exp(pm - big), axis=0))
                if label // BLOCK == segment:  # the label's segment holds x_y and writes the loss
                    target = tl.sum(tl.where(offs == label - first_col, x, 0.0), axis=0)
                    loss = lse - (1.0 - label_smoothing) * target + z_loss * lse * lse
                    if HAS_SMOOTHING:
                        px = tl.load(part_ptr + seg_ids * 3 + 2, mask=seg_mask, other=0.0, cache_modifier=".cg")
                        loss -= label_smoothing * tl.sum(px, axis=0) / V
                    tl.store(LOSS_ptr + row, loss)
                p_scale = 1.0 + 2.0 * z_loss * lse
                d = tl.exp(x - lse) * p_scale - label_smoothing / V - tl.where(offs == label - first_col, 1.0 - label_smoothing, 0.0)
                tl.store(seg_ptr + offs, d.to(LOGITS_ptr.dtype.element_ty), mask=in_row)
            else:
                tl.store(seg_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32).to(LOGITS_ptr.dtype.element_ty), mask=in_row)
                if segment == 0:
                    tl.store(LOSS_ptr + row, 0.0)


def split_launch_params(vocab: int) -> dict:
    """Columns per segment, warps, register cap and programs per SM: 4K columns over 8 warps
    (16 values per thread) in 64 registers, four programs resident per SM, the setting the GPU
    tests run (the sweep's fastest on an H100 was 4K columns, 4 warps, 96 registers, 5 per SM)."""
    block = min(4096, triton.next_power_of_2(vocab))
    return {"BLOCK": block, "num_warps": max(1, min(8, block // 512)), "ctas_per_sm": 4, "maxnreg": 64}


def programs_for(n_rows: int, segments: int, device: torch.device, ctas_per_sm: int) -> int:
    """A persistent grid: whole rows' worth of programs (`segments` each), as many as are resident
    at once (`ctas_per_sm` per SM), at most one per segment of every row."""
    groups = max(1, min(n_rows, (num_sms(device) * ctas_per_sm) // segments))
    return groups * segments


def ce_forward_backward_rows_split(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    BLOCK: int | None = None,
    num_warps: int | None = None,
    ctas_per_sm: int | None = None,
    maxnreg: int | None = None,
    two_launches: bool | None = None,
):
    """Per-row loss of `logits` (M, V) into `loss` (M,) fp32, and the gradient of their sum
    written over `logits`, reading the logits once (see the module docstring). Returns the
    compiled kernel of the last launch (its registers and spills are in `n_regs`, `n_spills`)."""
    check_logits_labels(logits, labels, "probe_ce_split")
    if logits.stride(-1) != 1:
        raise ValueError("probe_ce_split: logits need a unit stride on the vocabulary dimension; pass logits.contiguous()")
    M, V = logits.shape
    params = split_launch_params(V)
    block = BLOCK or params["BLOCK"]
    warps = num_warps or params["num_warps"]
    per_sm = ctas_per_sm or params["ctas_per_sm"]
    maxnreg = maxnreg or params["maxnreg"]
    segments = triton.cdiv(V, block)
    if segments > num_sms(logits.device) * per_sm and logits.device.type == "cuda":
        raise ValueError(f"probe_ce_split: {segments} segments of {block} columns do not run at once on this device")
    programs = programs_for(M, segments, logits.device, per_sm)
    partials = torch.empty((M, segments, 3), dtype=torch.float32, device=logits.device)
    arrived = torch.zeros(M, dtype=torch.int32, device=logits.device)
    if two_launches is None:
        two_launches = logits.device.type != "cuda"
    phases = (PUBLISH, WRITE) if two_launches else (PUBLISH_AND_WRITE,)
    for phase in phases:
        compiled = _cross_entropy_split_kernel[(programs,)](
            logits, labels, loss, partials, arrived,
            logits.stride(0), M, V, ignore_index, label_smoothing, z_loss,
            SEGMENTS=segments, SEGMENTS_POW2=triton.next_power_of_2(segments), BLOCK=block,
            HAS_SMOOTHING=label_smoothing > 0.0, PHASE=phase, num_warps=warps, maxnreg=maxnreg,
        )  # fmt: skip
    return compiled


# -- the probe ------------------------------------------------------------------------------------

SHAPES = [(1024, 151936), (16384, 50304)]
SETTINGS = [  # BLOCK, warps, maxnreg, programs per SM to try (resident per SM at that register count: 64K / (regs x threads))
    (16384, 32, None, (1, 2)), (8192, 16, 64, (2, 3)), (8192, 8, 96, (2, 3)), (4096, 8, 64, (4, 6)),
    (4096, 4, 96, (5, 8)), (2048, 4, 64, (8, 12)), (2048, 2, 96, (10, 16)), (1024, 2, 64, (16, 24)),
]


def logits_labels(M, V, seed=0, ignore_every=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(M, V, device="cuda", generator=g) * 4).to(torch.bfloat16)
    labels = torch.randint(0, V, (M,), device="cuda", generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return x, labels


def check(log):
    rows = []
    for M, V in [(1024, 151936), (333, 50304), (7, 1000), (64, 123)]:
        for ls, z in [(0.0, 0.0), (0.1, 1e-4)]:
            for two in (False, True):
                x, labels = logits_labels(M, V, ignore_every=5)
                a, b = x.clone(), x.clone()
                la, lb = torch.empty(M, device="cuda"), torch.empty(M, device="cuda")
                ce_forward_backward_rows(a, labels, la, -100, ls, z, flce.ce_programs(a.device))
                ce_forward_backward_rows_split(b, labels, lb, -100, ls, z, two_launches=two)
                torch.cuda.synchronize()
                row = {
                    "M": M, "V": V, "smoothing": ls, "z_loss": z, "two_launches": two,
                    "loss_max_abs": (la - lb).abs().max().item(),
                    "grad_max_abs": (a.float() - b.float()).abs().max().item(),
                    "grad_equal_frac": (a == b).float().mean().item(),
                }  # fmt: skip
                rows.append(row)
                log(f"check {row}")
    return rows


def sweep(M, V, log):
    x0, labels = logits_labels(M, V)
    loss = torch.empty(M, device="cuda")
    nbytes = 2 * x0.numel() * x0.element_size()  # one read and one write
    src = x0.clone()
    copy_ms = do_bench(lambda: x0.copy_(src), warmup=25, rep=200)
    out = {"M": M, "V": V, "copy_ms": copy_ms, "copy_tbps": nbytes / copy_ms / 1e9, "rows": []}
    x = x0.clone()
    base_ms = do_bench(lambda: ce_forward_backward_rows(x, labels, loss, -100, 0.0, 0.0, flce.ce_programs(x.device)), warmup=25, rep=200)
    out["committed_ms"] = base_ms
    log(f"{M}x{V}: copy {copy_ms:.4f} ms ({out['copy_tbps']:.2f} TB/s); committed two-read kernel {base_ms:.4f} ms")
    for block, warps, maxnreg, per_sm_choices in SETTINGS:
        if block > 2 * triton.next_power_of_2(V):
            continue
        for per_sm in per_sm_choices:
            x = x0.clone()
            t0 = time.time()
            try:
                compiled = ce_forward_backward_rows_split(x, labels, loss, -100, 0.0, 0.0, BLOCK=block, num_warps=warps, ctas_per_sm=per_sm, maxnreg=maxnreg)
                torch.cuda.synchronize()
                regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
                ms = do_bench(
                    lambda: ce_forward_backward_rows_split(x, labels, loss, -100, 0.0, 0.0, BLOCK=block, num_warps=warps, ctas_per_sm=per_sm, maxnreg=maxnreg),
                    warmup=25, rep=200,
                )  # fmt: skip
            except Exception as e:  # a setting that does not compile or launch: recorded, not fatal
                log(f"  BLOCK {block} warps {warps} maxnreg {maxnreg} per_sm {per_sm}: {type(e).__name__}: {str(e)[:200]}")
                continue
            row = {"BLOCK": block, "num_warps": warps, "maxnreg": maxnreg, "ctas_per_sm": per_sm, "ms": ms, "tbps": nbytes / ms / 1e9,
                   "vs_committed": base_ms / ms, "first_call_s": time.time() - t0, "regs": regs, "spills": spills}  # fmt: skip
            out["rows"].append(row)
            log(f"  BLOCK {block:5d} warps {warps:2d} maxnreg {maxnreg} per_sm {per_sm}: {ms:.4f} ms {row['tbps']:.2f} TB/s ({row['vs_committed']:.2f}x) regs {regs} spills {spills}")
    return out


def flce_time(N, H, V, chunk, row_kernel, log):
    g = torch.Generator(device="cuda").manual_seed(1)
    h = (torch.randn(N, H, device="cuda", generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)
    flce.ce_forward_backward_rows = row_kernel

    def step():
        h.grad = w.grad = None
        flce.fused_linear_cross_entropy(h, w, labels, chunk_size=chunk).backward()

    step()
    torch.cuda.synchronize()
    ms = do_bench(step, warmup=5, rep=100)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**30
    log(f"flce {N}x{H}x{V} chunk {chunk} {row_kernel.__name__}: {ms:.3f} ms, extra peak {extra:.3f} GiB")
    return {"N": N, "H": H, "V": V, "chunk": chunk, "row_kernel": row_kernel.__name__, "ms": ms, "extra_peak_gib": extra}


def device_slug() -> str:
    """The GPU's name as results files spell it, e.g. nvidia_h100_80gb_hbm3."""
    return torch.cuda.get_device_name().lower().replace(" ", "_").replace("-", "_")


def probe_result(out_dir: str, name: str, sections: tuple[str, ...]):
    """The result dict of a probe (device, versions, date, an empty list per section) and a `log`
    that prints a line and rewrites `probe_<device>_<name>.json` in `out_dir`, so that a run cut
    short keeps what it measured."""
    path = Path(out_dir) / f"probe_{device_slug()}_{name}.json"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": time.strftime("%Y-%m-%d"), **{section: [] for section in sections}}  # fmt: skip

    def log(msg):
        print(msg, flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))

    return result, log


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    result, log = probe_result(args.out, "ce_split", ("check", "sweep", "flce"))

    result["check"] = check(log)
    best = {}
    if not args.skip_sweep:
        for M, V in SHAPES:
            swept = sweep(M, V, log)
            result["sweep"].append(swept)
            top = min(swept["rows"], key=lambda r: r["ms"])
            best[V] = {k: top[k] for k in ("BLOCK", "num_warps", "ctas_per_sm", "maxnreg")}
            log(f"best for V={V}: {best[V]} {top['ms']:.4f} ms")
    result["best"] = best

    def split_rows(grads, labels, loss, ignore_index, label_smoothing, z_loss, programs):
        ce_forward_backward_rows_split(grads, labels, loss, ignore_index, label_smoothing, z_loss, **best.get(grads.shape[1], {}))

    for N, H, V, chunk in [(8192, 896, 151936, None), (16384, 768, 50304, None), (16384, 768, 50304, 16384)]:
        for fn in (ce_forward_backward_rows, split_rows):
            result["flce"].append(flce_time(N, H, V, chunk, fn, log))
    flce.ce_forward_backward_rows = ce_forward_backward_rows
    log("done")


if __name__ == "__main__":
    main()
