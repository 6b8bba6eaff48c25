"""Probe: cross-entropy loss and gradient with each row read once and held in registers, against
the committed two-read row kernel (kernels/cross_entropy.py), on a GPU; for vocabularies up to 64K.

The one-launch loss + gradient kernel of the fused linear + CE reads each row twice (log-sum-exp,
then the gradient written over it). `probe_ce_split.py` split a row over programs that wait for
each other and lost to it. Here a row of up to 65536 columns stays whole in one program's
registers, in the logits' dtype: GPT-2's 50304 bf16 logits are 98 KiB, 38% of an SM's register
file. One program per SM (32 warps, about 50 values per thread) loops over rows: it loads the row
once as up to three power-of-two pieces (50304 = 32768 + 16384 + 2048 masked), reduces max and
sum of exponentials over the registers, and writes the gradient from them. HBM traffic is one read
and one write, as a device copy. Nothing waits on another program, so the interpreter runs it as is.

For GPT-2 this matters only through the fused linear + CE op: the `cross_entropy` op already moves
the minimum for its split (forward: one read for the lse; backward: one read and the write), while
the fused op forms the gradient in its forward pass, where the one-read kernel saves a pass.

What the probe runs (one command, a short table last):
- the kernel against the committed one at real sizes (ignored rows, label smoothing, z-loss);
- row kernels at 16384 x 50304 and 2048 x 50304 bf16 (GPT-2's logits, one chunk of them): a device
  copy (the ceiling), the `cross_entropy` op's forward + backward kernels, the two-read one-launch
  kernel at 2 and 4 programs per SM, the resident kernel at 16 / 32 warps and 1 / 2 programs per SM
  with its registers and spills;
- GPT-2's head, 16384 tokens x 768 x 50304, forward + backward: materialized logits + the
  `cross_entropy` op (GPT-2's default) against the fused op at chunks of 2048 / 8192 / 16384 tokens
  with either row kernel, time and extra peak memory;
- with `--e2e`, then `benchmarks/throughput.py` on gpt_125m (16 x 1024): the compiled reference,
  the fastest configuration, and the same with `cross_entropy=fused_linear` on the resident kernel.

    python benchmarks/probe_ce_resident.py [--out DIR] [--e2e]

Writes DIR/probe_<device>_ce_resident.json (default benchmarks/results). CPU tests:
tests/benchmarks/test_probe_ce_resident.py (the interpreter).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere

import kernels.fused_linear_cross_entropy as flce  # noqa: E402
from kernels import num_sms  # noqa: E402
from kernels.cross_entropy import (  # noqa: E402
    ce_backward_rows,
    ce_forward_backward_rows,
    ce_forward_rows,
    check_logits_labels,
    cross_entropy,
)
from probe_ce_split import device_slug, logits_labels, probe_result  # noqa: E402  (benchmarks/, the script's own folder)

# -- the kernel -----------------------------------------------------------------------------------


@triton.jit
def _cross_entropy_resident_kernel(
    LOGITS_ptr,  # (N, V) logits, overwritten with d loss / d logits (upstream gradient 1)
    LABELS_ptr,  # (N,) integer labels
    LOSS_ptr,  # (N,) fp32 output: per-row loss (0 for ignored rows)
    stride_lm,
    N,
    V,
    ignore_index,
    label_smoothing,
    z_loss,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_A: tl.constexpr,  # the row is held as up to three pieces of power-of-two widths:
    BLOCK_B: tl.constexpr,  # columns [0, A), [A, A + B), [A + B, A + B + C) (the last one masked);
    BLOCK_C: tl.constexpr,  # B or C is 0 when the row needs fewer pieces
):
    """Loss and gradient in one launch, reading each row once: the whole row stays in registers
    (in the logits' dtype) between the log-sum-exp and the gradient written over it. For rows
    of up to 64K columns (GPT-2's 50304 bf16 logits are 98 KiB), one program per SM looping
    over rows; HBM traffic is one read and one write, against two reads and a write for
    `_cross_entropy_fwd_bwd_kernel`."""
    label_smoothing = tl.cast(label_smoothing, tl.float32)  # Inductor may pass Python floats as fp64
    z_loss = tl.cast(z_loss, tl.float32)
    cols_a = tl.arange(0, BLOCK_A)
    for row in range(tl.program_id(0), N, tl.num_programs(0)):
        row_ptr = LOGITS_ptr + tl.cast(row, tl.int64) * stride_lm
        label = tl.load(LABELS_ptr + row).to(tl.int64)
        if label == ignore_index:
            zero = tl.zeros((BLOCK_A,), dtype=tl.float32).to(LOGITS_ptr.dtype.element_ty)
            for start in range(0, V, BLOCK_A):
                tl.store(row_ptr + start + cols_a, zero, mask=start + cols_a < V)
            tl.store(LOSS_ptr + row, 0.0)
        else:
            # one read of the row: the pieces stay in registers in the logits' dtype
            x_a = tl.load(row_ptr + cols_a, mask=cols_a < V, other=float("-inf"))
            m = tl.max(x_a.to(tl.float32), axis=0)
            if BLOCK_B > 0:
                cols_b = BLOCK_A + tl.arange(0, BLOCK_B)
                x_b = tl.load(row_ptr + cols_b, mask=cols_b < V, other=float("-inf"))
                m = tl.maximum(m, tl.max(x_b.to(tl.float32), axis=0))
            if BLOCK_C > 0:
                cols_c = BLOCK_A + BLOCK_B + tl.arange(0, BLOCK_C)
                x_c = tl.load(row_ptr + cols_c, mask=cols_c < V, other=float("-inf"))
                m = tl.maximum(m, tl.max(x_c.to(tl.float32), axis=0))
            s = tl.sum(tl.exp(x_a.to(tl.float32) - m), axis=0)
            if HAS_SMOOTHING:
                x_sum = tl.sum(tl.where(cols_a < V, x_a.to(tl.float32), 0.0), axis=0)
            if BLOCK_B > 0:
                s += tl.sum(tl.exp(x_b.to(tl.float32) - m), axis=0)
                if HAS_SMOOTHING:
                    x_sum += tl.sum(tl.where(cols_b < V, x_b.to(tl.float32), 0.0), axis=0)
            if BLOCK_C > 0:
                s += tl.sum(tl.exp(x_c.to(tl.float32) - m), axis=0)
                if HAS_SMOOTHING:
                    x_sum += tl.sum(tl.where(cols_c < V, x_c.to(tl.float32), 0.0), axis=0)
            lse = m + tl.log(s)
            target = tl.load(row_ptr + label).to(tl.float32)  # the row's own label logit, an L2 hit
            loss = lse - (1.0 - label_smoothing) * target + z_loss * lse * lse
            if HAS_SMOOTHING:
                loss -= label_smoothing * x_sum / V
            tl.store(LOSS_ptr + row, loss)
            p_scale = 1.0 + 2.0 * z_loss * lse
            uniform = label_smoothing / V
            hit = 1.0 - label_smoothing
            d_a = tl.exp(x_a.to(tl.float32) - lse) * p_scale - uniform - tl.where(cols_a == label, hit, 0.0)
            tl.store(row_ptr + cols_a, d_a.to(LOGITS_ptr.dtype.element_ty), mask=cols_a < V)
            if BLOCK_B > 0:
                d_b = tl.exp(x_b.to(tl.float32) - lse) * p_scale - uniform - tl.where(cols_b == label, hit, 0.0)
                tl.store(row_ptr + cols_b, d_b.to(LOGITS_ptr.dtype.element_ty), mask=cols_b < V)
            if BLOCK_C > 0:
                d_c = tl.exp(x_c.to(tl.float32) - lse) * p_scale - uniform - tl.where(cols_c == label, hit, 0.0)
                tl.store(row_ptr + cols_c, d_c.to(LOGITS_ptr.dtype.element_ty), mask=cols_c < V)


RESIDENT_MAX_VOCAB = 65536


def resident_blocks(vocab: int) -> tuple[int, int, int]:
    """Widths (A, B, C) of the pieces that hold a row of `vocab` columns: A the largest power of
    two <= vocab, B the largest <= what is left, C the next power of two >= the rest (masked).
    50304 -> (32768, 16384, 2048): 51200 columns held for 50304 (2% masked)."""
    if not 0 < vocab <= RESIDENT_MAX_VOCAB:
        raise ValueError(f"resident_blocks: rows of 1..{RESIDENT_MAX_VOCAB} columns, got {vocab}")
    a = 1 << (vocab.bit_length() - 1)
    rest = vocab - a
    b = 1 << (rest.bit_length() - 1) if rest else 0
    rest -= b
    c = triton.next_power_of_2(rest) if rest else 0
    return a, b, c


def ce_forward_backward_rows_resident(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    programs: int,
    num_warps: int = 32,
):
    """As `ce_forward_backward_rows`, each row read once (`_cross_entropy_resident_kernel`);
    rows of up to RESIDENT_MAX_VOCAB columns. Returns the launched kernel (its registers and
    spills are what a probe wants to see)."""
    check_logits_labels(logits, labels, "ce_forward_backward_rows_resident")
    if logits.stride(-1) != 1:
        raise ValueError("ce_forward_backward_rows_resident: logits need a unit stride on the vocabulary dimension")
    a, b, c = resident_blocks(logits.shape[1])
    return _cross_entropy_resident_kernel[(max(1, min(programs, logits.shape[0])),)](
        logits, labels, loss,
        logits.stride(0), logits.shape[0], logits.shape[1],
        ignore_index, label_smoothing, z_loss,
        HAS_SMOOTHING=label_smoothing > 0.0, BLOCK_A=a, BLOCK_B=b, BLOCK_C=c, num_warps=num_warps,
    )  # fmt: skip


# -- measurement ----------------------------------------------------------------------------------


def check(sms, log):
    """The resident kernel against the committed two-read one at real sizes."""
    rows = []
    for M, V in [(2048, 50304), (333, 50257), (7, 1000)]:
        for ls, z in [(0.0, 0.0), (0.1, 1e-4)]:
            for warps in (16, 32):
                x, labels = logits_labels(M, V, ignore_every=5)
                a, b = x.clone(), x.clone()
                la, lb = torch.empty(M, device="cuda"), torch.empty(M, device="cuda")
                ce_forward_backward_rows(a, labels, la, -100, ls, z, 4 * sms)
                ce_forward_backward_rows_resident(b, labels, lb, -100, ls, z, sms, num_warps=warps)
                torch.cuda.synchronize()
                row = dict(M=M, V=V, smoothing=ls, z_loss=z, num_warps=warps, loss_max_abs=(la - lb).abs().max().item(),
                           grad_max_abs=(a.float() - b.float()).abs().max().item(), grad_equal_frac=(a == b).float().mean().item())  # fmt: skip
                rows.append(row)
                log(f"check {row}")
    return rows


def row_kernels(M, V, sms, log):
    """Each row kernel over (M, V) bf16 logits; the rate counts one read and one write."""
    x0, labels = logits_labels(M, V)
    loss, lse, target = (torch.empty(M, device="cuda") for _ in range(3))
    one = torch.ones((), device="cuda")
    src, x = x0.clone(), x0.clone()
    nbytes = 2 * x0.numel() * x0.element_size()
    timed = {"device copy (1 read + 1 write)": do_bench(lambda: x.copy_(src), warmup=25, rep=200)}
    timed["cross_entropy op: forward + backward kernels"] = do_bench(
        lambda: (ce_forward_rows(x, labels, loss, lse, target, -100, 0.0, 0.0),
                 ce_backward_rows(x, x, labels, lse, one, -100, 0.0, 0.0)), warmup=25, rep=200)  # fmt: skip
    for per_sm in (2, 4):
        timed[f"two-read one-launch, {per_sm}/SM"] = do_bench(
            lambda: ce_forward_backward_rows(x, labels, loss, -100, 0.0, 0.0, per_sm * sms), warmup=25, rep=200)
    settings = {}
    for warps in (16, 32):
        for per_sm in (1, 2):
            try:
                compiled = ce_forward_backward_rows_resident(x, labels, loss, -100, 0.0, 0.0, per_sm * sms, num_warps=warps)
                ms = do_bench(lambda: ce_forward_backward_rows_resident(x, labels, loss, -100, 0.0, 0.0, per_sm * sms, num_warps=warps),
                              warmup=25, rep=200)  # fmt: skip
            except Exception as e:  # a setting that does not compile or launch: recorded, not fatal
                log(f"resident {warps} warps {per_sm}/SM: {type(e).__name__}: {str(e)[:300]}")
                continue
            name = f"resident, {warps} warps, {per_sm}/SM (regs {getattr(compiled, 'n_regs', '?')}, spills {getattr(compiled, 'n_spills', '?')})"
            timed[name] = ms
            settings[name] = (warps, per_sm)
    rows = []
    for kernel, ms in timed.items():
        row = dict(M=M, V=V, kernel=kernel, ms=ms, tbps_one_read_one_write=nbytes / ms / 1e9, setting=settings.get(kernel))
        rows.append(row)
        log(f"{M}x{V} {kernel:60s} {ms:.4f} ms  {row['tbps_one_read_one_write']:.2f} TB/s")
    return rows


def resident_rows_for(warps, per_sm, sms):
    """A drop-in for `ce_forward_backward_rows` inside the fused op, at one launch setting."""
    def resident_rows(grads, labels, loss, ignore_index, label_smoothing, z_loss, programs):
        ce_forward_backward_rows_resident(grads, labels, loss, ignore_index, label_smoothing, z_loss, per_sm * sms, num_warps=warps)
    return resident_rows


def gpt2_head(resident_rows, log, N=16384, H=768, V=50304):
    """GPT-2's LM head forward + backward: materialized logits + cross_entropy against the fused op."""
    g = torch.Generator(device="cuda").manual_seed(1)
    h = (torch.randn(N, H, device="cuda", generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (N,), device="cuda", generator=g)

    def materialized():
        h.grad = w.grad = None
        (cross_entropy(h @ w.t(), labels) / N).backward()

    def fused(chunk):
        def step():
            h.grad = w.grad = None
            (flce.fused_linear_cross_entropy(h, w, labels, chunk_size=chunk) / N).backward()
        return step

    cases = [("materialized logits + cross_entropy op (GPT-2's default)", materialized, ce_forward_backward_rows)]
    for chunk in (2048, 8192, 16384):
        cases.append((f"fused, chunks of {chunk}, two-read kernel", fused(chunk), ce_forward_backward_rows))
        cases.append((f"fused, chunks of {chunk}, resident kernel", fused(chunk), resident_rows))
    rows = []
    for name, step, row_kernel in cases:
        flce.ce_forward_backward_rows = row_kernel
        step()
        torch.cuda.synchronize()
        ms = do_bench(step, warmup=5, rep=100)
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        rows.append(dict(N=N, H=H, V=V, case=name, ms=ms, extra_peak_gib=extra))
        log(f"head {name:60s} {ms:.3f} ms  extra peak {extra:.3f} GiB")
    flce.ce_forward_backward_rows = ce_forward_backward_rows
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--e2e", action="store_true", help="then gpt_125m end to end through benchmarks/throughput.py")
    args = parser.parse_args()
    result, log = probe_result(args.out, "ce_resident", ("check", "row_kernels", "gpt2_head"))

    sms = num_sms(torch.device("cuda"))
    result["check"] = check(sms, log)
    for M, V in [(16384, 50304), (2048, 50304)]:
        result["row_kernels"] += row_kernels(M, V, sms, log)
    chunk_rows = [r for r in result["row_kernels"] if r["M"] == 2048 and r["setting"]]
    warps, per_sm = min(chunk_rows, key=lambda r: r["ms"])["setting"] if chunk_rows else (32, 1)
    result["resident_setting"] = {"num_warps": warps, "per_sm": per_sm}
    result["gpt2_head"] = gpt2_head(resident_rows_for(warps, per_sm, sms), log)
    print("\n=== summary ===")
    for r in result["row_kernels"]:
        print(f"{r['M']:5d} x {r['V']} {r['kernel']:60s} {r['ms']:.4f} ms {r['tbps_one_read_one_write']:.2f} TB/s")
    for r in result["gpt2_head"]:
        print(f"head {r['case']:60s} {r['ms']:.3f} ms {r['extra_peak_gib']:.3f} GiB")
    log("done")
    if args.e2e:  # the fused op on the resident kernel inside training steps, same process
        sys.path.append(str(REPO / "benchmarks"))  # after the repo root: `kernels` is the package
        import throughput

        flce.ce_forward_backward_rows = resident_rows_for(warps, per_sm, sms)
        best = "optimized +whole-model +CUDA graphs"
        throughput.main(["--model", "configs/model/gpt_125m.yaml", "--batch", "16", "--seq-len", "1024", "--steps", "18",
                         "--warmup", "5", "--variants", "reference+compile", best, f"{best} cross_entropy=fused_linear",
                         "--out", str(Path(args.out) / f"throughput_gpt_125m_{device_slug()}_ce_resident.json")])  # fmt: skip


if __name__ == "__main__":
    main()
