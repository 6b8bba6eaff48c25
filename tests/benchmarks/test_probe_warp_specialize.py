"""benchmarks/probe_warp_specialize.py on the CPU: its kernels compute what they claim (through the
interpreter, fp16: the interpreter's bf16 `tl.dot` is wrong), and Triton's Hopper pass really
warp-specializes them when compiled for sm_90 (the timings are measured on a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from tests.kernels.helpers import INTERPRET, needs_triton

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import probe_warp_specialize as probe  # noqa: E402

pytestmark = needs_triton
F16 = torch.float16


def _launch(kernel, grid_tiles, *args, **consts):
    programs = min(3, grid_tiles)  # fewer programs than tiles: each walks several
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8))
    kernel[(programs,)](*args, **consts, NUM_PROGRAMS=programs, WS=False)


@pytest.mark.skipif(not INTERPRET, reason="the GPU run of the probe checks these at real sizes")
def test_dgate_up_kernel_writes_the_swiglu_gradient_and_h():
    M, D, H = 70, 24, 40  # partial tiles in every dimension
    dy, w, gu = torch.randn(M, D, dtype=F16), torch.randn(D, H, dtype=F16) / 5, torch.randn(M, 2 * H, dtype=F16)
    dgu, h = torch.empty_like(gu), torch.empty(M, H, dtype=F16)
    tiles = triton.cdiv(M, 32) * triton.cdiv(H, 16)
    _launch(probe.ws_dgate_up_kernel, tiles, dy, w, gu, dgu, h, M, H, D, BM=32, BN=16, BK=16, GROUP_M=2, STORE_H=True)
    dh = (dy.float() @ w.float()).to(F16).float()
    g, u = gu[:, :H].float(), gu[:, H:].float()
    s = torch.sigmoid(g)
    torch.testing.assert_close(dgu[:, :H].float(), dh * u * s * (1 + g * (1 - s)), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(dgu[:, H:].float(), dh * g * s, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(h.float(), g * s * u, atol=2e-3, rtol=1e-3)


@pytest.mark.skipif(not INTERPRET, reason="the GPU run of the probe checks these at real sizes")
def test_logits_kernel_statistics_give_the_log_sum_exp():
    M, K, V = 40, 32, 104  # V not a multiple of the tile: the last tile's padding must not count
    x, w = torch.randn(M, K, dtype=F16), torch.randn(V, K, dtype=F16) / 4
    out = torch.empty(M, V, dtype=F16)
    stats = torch.empty(2, M, triton.cdiv(V, 32))
    tiles = triton.cdiv(M, 16) * triton.cdiv(V, 32)
    _launch(probe.ws_logits_kernel, tiles, x, w, out, stats, M, V, K, BM=16, BN=32, BK=16, GROUP_M=2, STATS=True)
    torch.testing.assert_close(out.float(), x.float() @ w.float().t(), atol=1e-2, rtol=1e-2)
    lse = (stats[0] + stats[1].log()).logsumexp(-1)
    torch.testing.assert_close(lse, out.float().logsumexp(-1), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="the GPU run of the probe checks these at real sizes")
def test_weight_gradient_kernel_accumulates():
    V, H, C = 72, 24, 40
    g, x = torch.randn(C, V, dtype=F16) / 4, torch.randn(C, H, dtype=F16)
    dw0 = torch.randn(V, H, dtype=F16)
    dw = dw0.clone()
    tiles = triton.cdiv(V, 32) * triton.cdiv(H, 16)
    _launch(probe.ws_dw_kernel, tiles, g, x, dw, V, H, C, BM=32, BN=16, BK=16, GROUP_M=2, ACCUMULATE=True)
    torch.testing.assert_close(dw.float(), dw0.float() + g.float().t() @ x.float(), atol=2e-2, rtol=1e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the probe itself compiles and runs them")
def test_warp_specialized_variants_compile_as_such_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/probe_warp_specialize.py"), "--compile-only"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("this Triton install has no ptxas to compile with")
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == len(probe.VARIANTS), result.stdout + result.stderr[-2000:]
    for line in lines:
        assert " ok " in line, line
        if "ws=1" in line:  # the pass applied: a loading warp group beside two computing ones
            assert "ws_op=True" in line and "threads=['384']" in line and "setmaxnreg=0" not in line, line
        else:  # the controls: a plain 8-warp kernel
            assert "ws_op=False" in line and "threads=['256']" in line, line
