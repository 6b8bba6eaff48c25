"""Probe: the projection GEMMs of a model at its training shape, cuBLAS's own pick against every
algorithm cuBLASLt's heuristic offers, timed one by one.

Our `Linear` runs three GEMMs per projection and step, all through `torch.mm` (cuBLAS picks the
kernel by its heuristic, with no timing): the forward `y = x @ W.T`, the input gradient
`dx = dy @ W` and, under `kernels.linear: fp32_wgrad`, the weight gradient `dW = dy.T @ x` written
in fp32. An H100 profile of Qwen2-0.5B (benchmarks/README.md, "Qwen2-0.5B's step with the weight
copies") has most of them at 600-720 TFLOP/s but the attention projections' weight gradients at
490-545. PyTorch's TunableOp would time the alternatives, but on CUDA builds it offers only
cuBLAS's default. `kernels/cublaslt.py` (the GELU epilogues) times the heuristic's candidates
once per shape and keeps the fastest; this probe asks it for every candidate (`--candidates`) of
each GEMM, checks the result against `torch.mm`, and reports both speeds: a GEMM where the
fastest candidate beats cuBLAS's pick by a margin is a reason to route that projection through
cuBLASLt.

Shapes come from the model configs: each distinct `Linear` of the blocks (the LM head is the
fused loss's business), M = batch x sequence tokens.

    python benchmarks/probe_projection_gemms.py --list     # the GEMMs, no GPU needed
    python benchmarks/probe_projection_gemms.py            # GPU: table, JSON in benchmarks/results/

Writes benchmarks/results/probe_<device>_projection_gemms.json (rewritten after every row).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere

from src.models import AutoModelForCausalLM, load_model_config  # noqa: E402

# (model config, tokens per step): the throughput targets' batch shapes
MODELS = {
    "qwen2_0.5b": ("configs/model/qwen2_0.5b.yaml", 4 * 2048),
    "gpt_125m": ("configs/model/gpt_125m.yaml", 16 * 1024),
}


@dataclass(frozen=True)
class Gemm:
    model: str
    layer: str  # the projection's name in a block, e.g. "self_attn.qkv_proj"
    case: str  # "forward", "input grad" or "weight grad fp32"
    M: int
    N: int
    K: int  # out (M, N) = a (M, K) @ b (K, N)

    @property
    def flops(self) -> int:
        return 2 * self.M * self.N * self.K


def projection_gemms(model: str, tokens: int | None = None, head_chunk: int = 0) -> list[Gemm]:
    """The three GEMMs of every distinct projection in the first block of `model` (a MODELS key);
    with `head_chunk`, also the LM head's two plain GEMMs per chunk of that many tokens in the fused
    loss (logits = h @ W.T and dh = G @ W; its weight gradient accumulates in place, not probed)."""
    path, default_tokens = MODELS[model]
    tokens = tokens or default_tokens
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(load_model_config(str(REPO / path)))
    vocab, hidden = net.lm_head.weight.shape
    head = [
        Gemm(model, "lm_head chunk", "forward", head_chunk, vocab, hidden),
        Gemm(model, "lm_head chunk", "input grad", head_chunk, hidden, vocab),
    ] if head_chunk else []
    gemms = []
    for name, module in net.layers[0].named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        out_features, in_features = module.weight.shape
        gemms += [
            Gemm(model, name, "forward", tokens, out_features, in_features),  # x @ W.T
            Gemm(model, name, "input grad", tokens, in_features, out_features),  # dy @ W
            Gemm(model, name, "weight grad fp32", out_features, in_features, tokens),  # dy.T @ x
        ]
    return gemms + head


def operands(g: Gemm, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.dtype]:
    """(a, b, out dtype) laid out as our Linear lays them out: the weight (N, K) row-major read
    transposed in forward, dy.T a transposed view in the weight gradient."""
    bf16 = dict(device=device, dtype=torch.bfloat16)
    if g.case == "forward":
        return torch.randn(g.M, g.K, **bf16), torch.randn(g.N, g.K, **bf16).div_(g.K**0.5).t(), torch.bfloat16
    if g.case == "input grad":
        return torch.randn(g.M, g.K, **bf16), torch.randn(g.K, g.N, **bf16).div_(g.K**0.5), torch.bfloat16
    return torch.randn(g.K, g.M, **bf16).t(), torch.randn(g.K, g.N, **bf16), torch.float32


def run(args) -> None:
    from triton.testing import do_bench

    from kernels import cublaslt
    from probe_ce_split import probe_result

    cublaslt._CANDIDATES = args.candidates  # how many algorithms the heuristic is asked for
    result, log = probe_result(args.out_dir, "projection_gemms", ("rows",))
    result["candidates"] = args.candidates
    device = torch.device("cuda")
    header = f"{'model':11s} {'layer':22s} {'case':17s} {'M x N x K':>20s} {'torch.mm':>16s} {'cuBLASLt best':>16s}  gain"
    print(header, flush=True)
    for model in args.models:
        for g in projection_gemms(model, head_chunk=args.head_chunk):
            a, b, out_dtype = operands(g, device)
            out = torch.empty(g.M, g.N, device=device, dtype=out_dtype)
            torch_ms = do_bench(lambda: torch.mm(a, b, out_dtype=out_dtype), warmup=25, rep=200)
            row = {**g.__dict__, "torch_us": 1e3 * torch_ms, "torch_tflops": g.flops / torch_ms / 1e9}
            try:
                cublaslt.gemm(a, b, out)  # plans: times the candidates, keeps the fastest
                lt_ms = do_bench(lambda: cublaslt.gemm(a, b, out), warmup=25, rep=200)
                expected = torch.mm(a, b, out_dtype=out_dtype).float()
                row.update(lt_us=1e3 * lt_ms, lt_tflops=g.flops / lt_ms / 1e9,
                           lt_rel_err=float((out.float() - expected).abs().max() / expected.abs().max()))
                best = f"{row['lt_us']:7.1f} us {row['lt_tflops']:4.0f}T  {torch_ms / lt_ms - 1:+.1%}"
            except cublaslt.CublasLtUnsupported as e:
                row["lt_error"] = str(e)[:200]
                best = "unsupported"
            result["rows"].append(row)
            shape = f"{g.M}x{g.N}x{g.K}"
            log(f"{g.model:11s} {g.layer:22s} {g.case:17s} {shape:>20s} {row['torch_us']:7.1f} us {row['torch_tflops']:4.0f}T  {best}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--candidates", type=int, default=32, help="algorithms asked of cuBLASLt's heuristic per GEMM")
    p.add_argument("--head-chunk", type=int, default=2048, metavar="TOKENS",
                   help="also the LM head's GEMMs per fused-loss chunk of this many tokens (0: none)")
    p.add_argument("--list", action="store_true", help="print the GEMMs and exit (no GPU needed)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args()
    if args.list:
        for model in args.models:
            for g in projection_gemms(model, head_chunk=args.head_chunk):
                print(f"{g.model:11s} {g.layer:22s} {g.case:17s} {g.M} x {g.N} x {g.K}  {g.flops / 1e9:.1f} GFLOP")
        return
    if not torch.cuda.is_available():
        sys.exit("probe_projection_gemms.py times GEMMs on a CUDA GPU; run it with --list to see the shapes")
    run(args)


if __name__ == "__main__":
    main()
