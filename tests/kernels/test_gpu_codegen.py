"""Every kernel compiles for an H100 (sm_90) through Triton's real backend, on a CPU machine.

The interpreter that runs the other CPU tests does not type-check like the compiler does (for
example values merged across a runtime `if`), so this compiles each kernel to PTX in a subprocess
without TRITON_INTERPRET. Float scalars are declared fp64, as Inductor may pass them: the PTX must
convert them to fp32 once and do no fp64 arithmetic.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.cross_entropy as C, kernels.fused_linear_cross_entropy as FL, kernels.layernorm as L, kernels.rmsnorm as R, kernels.rope as P, kernels.swiglu as S
import kernels.adamw as A, kernels.swiglu_linear as SL

def p(t):
    return "*" + t

def sig(names, kind):
    return {n: kind for n in names.split()}

ADAMW = {**sig("PARAM_PTRS GRAD_PTRS EXP_AVG_PTRS EXP_AVG_SQ_PTRS STEP_PTRS COPY_PTRS NUMELS", p("i64")),
         "GRAD_BF16": p("i32"), "BLOCK_TENSOR": p("i32"), "BLOCK_START": p("i64"), **sig("SCALE_ptr FOUND_INF_ptr", p("fp32")),
         **sig("lr beta1 beta2 eps weight_decay", "fp32")}  # launched eagerly (the optimizer), never by Inductor

CASES = [
    (R._rms_norm_fwd_kernel, {**sig("X_ptr R_ptr S_ptr W_ptr Y_ptr", p("bf16")), "RSTD_ptr": p("fp32"),
        **sig("stride_xm stride_rm stride_sm stride_ym M H", "i32"), "eps": "fp64"},
        {"HAS_RESIDUAL": True, "ROWS": 4, "BLOCK_H": 1024}),
    (R._rms_norm_bwd_kernel, {**sig("DY_ptr DS_ptr X_ptr W_ptr", p("bf16")), "RSTD_ptr": p("fp32"), "DX_ptr": p("bf16"),
        "DW_PARTIAL_ptr": p("fp32"), **sig("stride_dym stride_dsm stride_xm stride_dxm M H", "i32")},
        {"HAS_DRESIDUAL": True, "ROWS": 1, "BLOCK_H": 4096}),
    (L._layer_norm_fwd_kernel, {**sig("X_ptr W_ptr B_ptr Y_ptr", p("bf16")), **sig("MEAN_ptr RSTD_ptr", p("fp32")),
        **sig("stride_xm stride_ym M H", "i32"), "eps": "fp64"}, {"HAS_BIAS": True, "ROWS": 4, "BLOCK_H": 1024}),
    (L._layer_norm_bwd_kernel, {**sig("DY_ptr X_ptr W_ptr", p("bf16")), **sig("MEAN_ptr RSTD_ptr", p("fp32")), "DX_ptr": p("bf16"),
        **sig("DW_PARTIAL_ptr DB_PARTIAL_ptr", p("fp32")), **sig("stride_dym stride_xm stride_dxm M H", "i32")},
        {"ROWS": 4, "BLOCK_H": 1024}),
    (P._rope_kernel, {**sig("Q_ptr K_ptr", p("bf16")), **sig("COS_ptr SIN_ptr", p("fp32")), **sig("QO_ptr KO_ptr", p("bf16")),
        **sig("stride_qb stride_qt stride_qh stride_kb stride_kt stride_kh stride_cb stride_ct stride_qob stride_qot "
              "stride_qoh stride_kob stride_kot stride_koh T HQ HKV", "i32")},
        {"HALF": 32, "BACKWARD": True, "BLOCK_HQ": 16, "BLOCK_HKV": 2, "BLOCK_HALF": 32}),
    (S._swiglu_fwd_kernel, {**sig("G_ptr U_ptr Y_ptr", p("bf16")), **sig("stride_gm stride_um stride_ym H", "i32")},
        {"FLAT": True, "PACKED": False, "BLOCK_H": 1024}),
    (S._swiglu_fwd_kernel, {**sig("G_ptr U_ptr Y_ptr", p("bf16")), **sig("stride_gm stride_um stride_ym H", "i32")},
        {"FLAT": False, "PACKED": True, "BLOCK_H": 1024}),
    (S._swiglu_bwd_kernel, {**sig("DY_ptr G_ptr U_ptr DG_ptr DU_ptr Y_ptr", p("bf16")),
        **sig("stride_dym stride_gm stride_um stride_dgm stride_dum stride_ym H", "i32")},
        {"FLAT": True, "PACKED": False, "STORE_Y": False, "BLOCK_H": 1024}),
    (S._swiglu_bwd_kernel, {**sig("DY_ptr G_ptr U_ptr DG_ptr DU_ptr Y_ptr", p("bf16")),
        **sig("stride_dym stride_gm stride_um stride_dgm stride_dum stride_ym H", "i32")},
        {"FLAT": False, "PACKED": False, "STORE_Y": False, "BLOCK_H": 1024}),
    (S._swiglu_bwd_kernel, {**sig("DY_ptr G_ptr U_ptr DG_ptr DU_ptr Y_ptr", p("bf16")),
        **sig("stride_dym stride_gm stride_um stride_dgm stride_dum stride_ym H", "i32")},
        {"FLAT": False, "PACKED": True, "STORE_Y": True, "BLOCK_H": 1024}),
    (C._cross_entropy_fwd_kernel, {"LOGITS_ptr": p("bf16"), "LABELS_ptr": p("i64"), **sig("LOSS_ptr LSE_ptr TARGET_ptr", p("fp32")),
        "stride_lm": "i64", **sig("V ignore_index", "i32"), **sig("label_smoothing z_loss", "fp64")},
        {"HAS_SMOOTHING": True, "BLOCK_V": 8192}),
    (C._cross_entropy_bwd_kernel, {**sig("LOGITS_ptr DLOGITS_ptr", p("bf16")), "LABELS_ptr": p("i64"), **sig("LSE_ptr GRAD_ptr", p("fp32")),
        **sig("stride_lm stride_dm", "i64"), **sig("stride_g V ignore_index", "i32"), **sig("label_smoothing z_loss", "fp64")},
        {"BLOCK_V": 8192}),
    (C._cross_entropy_fwd_bwd_kernel, {"LOGITS_ptr": p("bf16"), "LABELS_ptr": p("i64"), "LOSS_ptr": p("fp32"),
        "stride_lm": "i64", **sig("N V ignore_index", "i32"), **sig("label_smoothing z_loss", "fp64")},
        {"HAS_SMOOTHING": True, "BLOCK_V": 8192}),
    (FL._scale_kernel, {"X_ptr": p("bf16"), "G_ptr": p("fp32"), "n": "i32"}, {"BLOCK": 2048}),
    (FL._loss_and_numerators_kernel, {"LOGITS_ptr": p("bf16"), "LABELS_ptr": p("i64"), **sig("LOSS_ptr SCALE_ptr", p("fp32")),
        **sig("HIDDEN_ptr HS_ptr", p("bf16")), **sig("stride_lm stride_hm stride_sm", "i64"), **sig("N V H ignore_index", "i32"),
        **sig("label_smoothing z_loss", "fp64")},
        {"RESCALE": 30.0, "HAS_SMOOTHING": True, "WRITE_HS": True, "BLOCK_V": 8192, "BLOCK_H": 1024, "MAX_BLOCKS": 32}),
    (A._adamw_kernel, {**ADAMW}, {"HAS_SCALE": True, "HAS_FOUND_INF": True, "ALIGNED": True, "MOMENTS_BF16": False,
        "HAS_COPIES": False, "HAS_BF16_GRADS": False, "BLOCK": 1024}),
    (A._adamw_kernel, {**ADAMW}, {"HAS_SCALE": False, "HAS_FOUND_INF": False, "ALIGNED": False, "MOMENTS_BF16": False,
        "HAS_COPIES": True, "HAS_BF16_GRADS": False, "BLOCK": 4096}),
    (A._adamw_kernel, {**ADAMW}, {"HAS_SCALE": True, "HAS_FOUND_INF": True, "ALIGNED": True, "MOMENTS_BF16": True,
        "HAS_COPIES": True, "HAS_BF16_GRADS": True, "BLOCK": 1024}),
    (SL._dgate_up_kernel, {"dy_desc": "tensordesc<bf16[128, 64]>", "w_desc": "tensordesc<bf16[64, 128]>",
        **sig("gate_desc up_desc dgate_desc dup_desc", "tensordesc<bf16[128, 128]>"), **sig("M H D", "i32")},
        {"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8, "NUM_PROGRAMS": 132}),
    (A._adamw_count_kernel, {"STEP_PTRS": p("i64"), "FOUND_INF_ptr": p("fp32")}, {"HAS_FOUND_INF": True}),
]
for fn, signature, constexprs in CASES:
    signature.update({name: "constexpr" for name in constexprs})
    ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    fp64_math = [l.strip() for l in ptx.splitlines() if "f64" in l and not l.strip().startswith((".param", "ld.param", "cvt.rn.f32.f64"))]
    assert not fp64_math, f"{fn.__name__}: fp64 arithmetic in PTX: {fp64_math[:3]}"
    print("compiled", fn.__name__)
'''


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile and run every kernel")
def test_every_kernel_compiles_for_sm90_without_fp64_math():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("this Triton install has no ptxas to compile with")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == SCRIPT.count("_kernel, {"), result.stdout  # every case compiled
