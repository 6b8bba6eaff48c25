"""End-to-end training throughput and MFU, side by side: our reference, our optimized default, each
kernel ablated, and Hugging Face transformers (eager / compiled / with Liger-Kernel) when installed.

Every variant of ours is built and prepared exactly as a training run does it: the model from the
model YAML with the variant's `kernels:` block, then `Trainer` (activation checkpointing ->
torch.compile per block or of the whole model -> FSDP2 / DDP / nothing, AdamW, bf16 autocast,
clipping; the references keep torch's fused AdamW, the others take `optimizer.implementation:
auto`, i.e. our Triton AdamW with the clipping folded in, under FSDP2 on the local shards; the
optimized rows also carry the residual stream in bf16, `trainer.residual_dtype`), and the timed
unit is `Trainer.train_step` (forward and backward of each of `--grad-accum` micro-batches,
clip, optimizer step) on random tokens of one fixed batch shape. Warm-up steps (compilation
included) are excluded; compile time is reported separately. MFU = tokens/s x FLOPs per token /
peak FLOP/s, FLOPs per token = 6N + 12 L H Q T from `model.flops_per_token`.

    python benchmarks/throughput.py --model configs/model/gpt_125m.yaml --batch 16 --seq-len 1024
    python benchmarks/throughput.py --model configs/model/qwen2_0.5b.yaml --batch 4 --seq-len 2048 --peers
    python benchmarks/throughput.py --model configs/model/gpt_125m.yaml --loss-check 200   # same math?
    python benchmarks/throughput.py --model configs/model/gpt_125m.yaml --grad-accum 4     # 4 micro-batches a step
    python benchmarks/throughput.py --nproc 8 --model configs/model/qwen2_0.5b.yaml --variants optimized
    python benchmarks/throughput.py --strategy fsdp2 --variants optimized "optimized optimizer=torch"  # FSDP2, one GPU
    python benchmarks/throughput.py --strategy fsdp2 --fsdp-units 4 --variants optimized "optimized +FSDP units of 4 blocks"
    python benchmarks/throughput.py --strategy ddp --variants optimized "optimized +whole-model +CUDA graphs"
    python benchmarks/throughput.py --repeat 2 --variants optimized "optimized linear=tuned"   # A B A B, one process
    python benchmarks/throughput.py --help

Writes benchmarks/results/throughput_<model>_<device>[_loss][_accumN].json and a PNG beside it; prints a
table last. `--loss-check N` trains every variant of ours for N steps on the same batches (drawn
from a fixed random Markov chain: learnable, never memorised) from the same initial weights and
compares the final losses (mean of the last 10 steps). `--repeat N` runs the variant list N times
over, in turn (A B A B ...), in one process on one machine, and adds each variant's median and
spread to the table: two configurations a percent apart are told apart only this way, since
machines of one kind differ by more than that.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# As scripts/_launch.sh sets for training runs: growable CUDA allocator segments, so that
# `peak_reserved_gib` is close to what a run needs. Read when torch first initialises CUDA.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere: the repository root on the path

from benchmarks.gpu_clocks import ClockSampler  # noqa: E402
from src.models import AutoModelForCausalLM, KernelConfig, load_model_config  # noqa: E402
from src.trainer.config import DDP_BUCKET_CAP_MB, TrainConfig  # noqa: E402
from src.trainer.trainer import Trainer  # noqa: E402
from src.utils.config import from_dict  # noqa: E402
from src.utils.distributed import init_distributed, shutdown_distributed  # noqa: E402
from src.utils.misc import peak_flops  # noqa: E402

# The optimized default under torch.compile, chosen from the ablations measured on an H100 (see
# benchmarks/README.md). Inside a compiled block Inductor fuses the norms with their neighbours
# (residual adds, casts), which a standalone Triton kernel cannot: the step was faster with
# `layernorm` and `rmsnorm` set to torch. The packed Triton SwiGLU beats Inductor's (its backward
# writes the gate/up gradient whole; +0.6% per block, +1.5% whole-model with CUDA graphs), and
# `fused_linear` (its backward inside the down projection's input-gradient GEMM) beats that by
# 0.7-1.4% whole-model. The loss is the fused linear + cross-entropy (no (N, V) logits): for
# GPT-2's 50K vocabulary it beat the Triton cross-entropy by 0.75% on two H100s on 2026-12-07
# (after its one-pass loss and tuned GEMMs) at 1.8 GiB less peak; for Qwen2's 152K it saves 2.3 GiB,
# in chunks of 2048 tokens (+0.4-0.7% on an H100 for 0.29 GiB more than the op's own 1024). GPT-2's MLP runs its GELU in cuBLASLt's GEMM epilogues
# (`gelu: cublaslt`, +1.6% and +2.1% whole-model on an H200).
OPTIMIZED = {
    "gpt2": dict(layernorm="torch", gelu="cublaslt", cross_entropy="fused_linear", linear="fp32_wgrad", attention="auto"),
    "qwen2": dict(
        rmsnorm="torch", rope="triton", swiglu="fused_linear", cross_entropy="fused_linear", linear="fp32_wgrad",
        attention="auto", loss_chunk_tokens=2048,
    ),
}
# The optimized rows also carry the residual stream in bf16 (trainer.residual_dtype; llm.c's and
# Megatron-LM's choice): every norm and residual add moves half the bytes. The references keep
# autocast's fp32 stream; `residual=fp32` is the ablation.
OPTIMIZED_RESIDUAL = "bf16"
# The ablations: each op of the optimized default set, alone, to each other value listed here.
ALTERNATIVES = {
    "layernorm": ["torch", "triton"],
    "rmsnorm": ["torch", "triton"],
    "rope": ["torch", "triton"],
    "swiglu": ["torch", "triton", "fused_linear", "fused_linear_recompute"],
    "gelu": ["torch", "cublaslt"],
    "cross_entropy": ["torch", "triton", "fused_linear"],
    "linear": ["torch", "fp32_wgrad", "tuned"],
    "attention": ["auto", "sdpa"],
    "loss_chunk_tokens": [0, 2048],
}
# Kernel choices that change what selective checkpointing recomputes, each with a selective row of
# its own: `fused_linear_recompute` writes the SwiGLU product again inside its backward, where
# selective checkpointing of `fused_linear` recomputes it in a separate pass.
SELECTIVE_FLIPS = {"swiglu": "fused_linear_recompute"}


@dataclass
class Variant:
    name: str
    kind: str  # ours | hf
    kernels: dict = field(default_factory=dict)
    compile: bool = False
    liger: bool = False
    bf16_params: bool = False
    activation_checkpointing: str = "none"
    ac_layers: int | None = None  # trainer.activation_checkpointing_layers (None: every block)
    compile_mode: str = "default"
    compile_scope: str = "blocks"
    memory_budget: float = 1.0
    optimizer: str = "auto"  # optimizer.implementation: the reference keeps torch's AdamW
    optimizer_state: str = "float32"  # optimizer.state_dtype (bfloat16: our AdamW's stochastically rounded moments)
    reshard_after_forward: bool = True  # parallel.reshard_after_forward (FSDP2 only)
    fsdp_blocks_per_unit: int = 1  # parallel.fsdp_blocks_per_unit (FSDP2 only)
    residual_dtype: str = "fp32"  # trainer.residual_dtype
    compile_loss_head: str = "auto"  # compile_loss_head (always: the in-place Triton cross-entropy head too)
    weight_copy: bool = False  # optimizer.bf16_weight_copy: the matmuls read bf16 copies the optimizer writes
    bf16_grads: bool = False  # optimizer.bf16_grads: the linear layers' weight gradients stay bf16, in the copies


def kernel_flips(optimized: dict) -> list[tuple[str, dict]]:
    """Each op of the optimized set switched alone to each other value: ("op=value", kernels)."""
    return [(f"{op}={other}", dict(optimized, **{op: other}))
            for op, value in optimized.items() for other in ALTERNATIVES[op] if other != value]


def our_variants(
    family: str, ac: str, sharded: bool = False, memory_budgets: tuple[float, ...] = (), grad_accum: int = 1,
    ac_layers: tuple[int, ...] = (), fsdp_units: tuple[int, ...] = (),
) -> list[Variant]:
    ref = dataclass_dict(KernelConfig.reference())
    optimized = OPTIMIZED[family]
    res = OPTIMIZED_RESIDUAL
    variants = [
        Variant("reference", "ours", ref, compile=False, activation_checkpointing=ac, optimizer="torch"),
        Variant("reference+compile", "ours", ref, compile=True, activation_checkpointing=ac, optimizer="torch"),
        Variant("optimized", "ours", dict(optimized), compile=True, activation_checkpointing=ac, residual_dtype=res),
    ]
    for flip, kernels in kernel_flips(optimized):
        variants.append(Variant(f"optimized {flip}", "ours", kernels, compile=True, activation_checkpointing=ac,
                                residual_dtype=res))
    variants.append(Variant("optimized residual=fp32", "ours", dict(optimized), compile=True,
                            activation_checkpointing=ac))
    variants.append(Variant("optimized optimizer=torch", "ours", dict(optimized), compile=True,
                            activation_checkpointing=ac, optimizer="torch", residual_dtype=res))
    if sharded:  # keep each block's gathered parameters from forward to backward: no second all-gather
        variants.append(Variant("optimized reshard_after_forward=false", "ours", dict(optimized), compile=True,
                                activation_checkpointing=ac, reshard_after_forward=False, residual_dtype=res))
        for per_unit in fsdp_units:  # fewer FSDP2 units: fewer hooks on the host, larger collectives
            variants.append(Variant(f"optimized +FSDP units of {per_unit} blocks", "ours", dict(optimized),
                                    compile=True, activation_checkpointing=ac, fsdp_blocks_per_unit=per_unit,
                                    residual_dtype=res))
        # bf16 moments on the local shards (FSDP2 has no whole-model graph, so per-block compile here)
        variants.append(Variant("optimized +bf16 moments", "ours", dict(optimized), compile=True,
                                activation_checkpointing=ac, optimizer_state="bfloat16", residual_dtype=res))
        if optimized.get("swiglu") == "fused_linear":
            variants.append(Variant("optimized +bf16 moments swiglu=fused_linear_recompute", "ours",
                                    dict(optimized, swiglu="fused_linear_recompute"), compile=True,
                                    activation_checkpointing=ac, optimizer_state="bfloat16", residual_dtype=res))
    if ac == "none":
        # the memory-lean configuration: recompute elementwise ops in backward
        variants.append(Variant("optimized +selective AC", "ours", dict(optimized), compile=True,
                                activation_checkpointing="selective", residual_dtype=res))
        for budget in memory_budgets:  # the compiler's own recompute choice under a memory budget
            variants.append(Variant(f"optimized +memory budget {budget:g}", "ours", dict(optimized), compile=True,
                                    memory_budget=budget, residual_dtype=res))
    if not sharded:  # CUDA graphs and the whole-model graph do not work with FSDP2's per-block all-gathers
        variants.append(Variant("optimized +CUDA graphs", "ours", dict(optimized), compile=True,
                                activation_checkpointing=ac, compile_mode="reduce-overhead", residual_dtype=res))
        # the whole forward as one graph (nanoGPT's way), ours and the reference
        variants.append(Variant("reference+compile whole model", "ours", ref, compile=True,
                                activation_checkpointing=ac, compile_scope="model", optimizer="torch"))
        variants.append(Variant("optimized +whole-model compile", "ours", dict(optimized), compile=True,
                                activation_checkpointing=ac, compile_scope="model", residual_dtype=res))
        best = "optimized +whole-model +CUDA graphs"  # the fastest configuration
        whole_graphs = dict(compile=True, compile_scope="model", compile_mode="reduce-overhead")
        variants.append(Variant(best, "ours", dict(optimized), activation_checkpointing=ac, residual_dtype=res,
                                **whole_graphs))
        # with torch's fused AdamW: our optimizer's share, without the host noise of per-block compilation
        variants.append(Variant(f"{best} optimizer=torch", "ours", dict(optimized), activation_checkpointing=ac,
                                optimizer="torch", residual_dtype=res, **whole_graphs))
        # The ablations again on the fastest configuration: with the host out of the step a
        # Triton kernel's launch cost (the triton_op path) no longer hides its GPU time.
        for flip, kernels in kernel_flips(optimized):
            variants.append(Variant(f"{best} {flip}", "ours", kernels, activation_checkpointing=ac, residual_dtype=res,
                                    **whole_graphs))
        variants.append(Variant(f"{best} residual=fp32", "ours", dict(optimized), activation_checkpointing=ac,
                                **whole_graphs))
        if ac == "none":
            variants.append(Variant(f"{best} +selective AC", "ours", dict(optimized),
                                    activation_checkpointing="selective", residual_dtype=res, **whole_graphs))
            for op, other in SELECTIVE_FLIPS.items():  # what selective checkpointing recomputes changes
                if optimized.get(op) not in (None, other):
                    variants.append(Variant(f"{best} +selective AC {op}={other}", "ours", dict(optimized, **{op: other}),
                                            activation_checkpointing="selective", residual_dtype=res, **whole_graphs))
            for layers in ac_layers:  # between none and all: the first N blocks checkpointed
                variants.append(Variant(f"{best} +selective AC on {layers} blocks", "ours", dict(optimized),
                                        activation_checkpointing="selective", ac_layers=layers, residual_dtype=res,
                                        **whole_graphs))
            # bf16 AdamW moments: 4 bytes per parameter less. With the SwiGLU product not kept
            # either (Qwen2), memory falls without checkpointing's recompute.
            lean = dict(optimizer_state="bfloat16", residual_dtype=res, **whole_graphs)
            variants.append(Variant(f"{best} +bf16 moments", "ours", dict(optimized), **lean))
            variants.append(Variant(f"{best} +selective AC +bf16 moments", "ours", dict(optimized),
                                    activation_checkpointing="selective", **lean))
            if optimized.get("swiglu") == "fused_linear":
                no_h = dict(optimized, swiglu="fused_linear_recompute")
                variants.append(Variant(f"{best} +bf16 moments swiglu=fused_linear_recompute", "ours", no_h, **lean))
                for layers in ac_layers:
                    variants.append(Variant(f"{best} +bf16 moments swiglu=fused_linear_recompute +selective AC on "
                                            f"{layers} blocks", "ours", no_h, activation_checkpointing="selective",
                                            ac_layers=layers, **lean))
            # bf16 copies of the weights, written by the optimizer: no weight casts in forward and
            # backward (2 bytes per weight more); last, and on the 12 GiB configuration for Qwen2
            variants.append(Variant(f"{best} +bf16 weight copy", "ours", dict(optimized), activation_checkpointing=ac,
                                    residual_dtype=res, weight_copy=True, **whole_graphs))
            if optimized.get("swiglu") == "fused_linear":
                variants.append(Variant(f"{best} +bf16 moments swiglu=fused_linear_recompute +bf16 weight copy", "ours",
                                        no_h, weight_copy=True, **lean))
            # and the weight gradients kept in bf16 in those copies (one process, no accumulation)
            if grad_accum == 1 and not sharded:
                variants.append(Variant(f"{best} +bf16 weight copy +bf16 grads", "ours", dict(optimized),
                                        activation_checkpointing=ac, residual_dtype=res, weight_copy=True,
                                        bf16_grads=True, **whole_graphs))
                variants.append(Variant(f"{best} +bf16 moments +bf16 weight copy +bf16 grads", "ours", dict(optimized),
                                        weight_copy=True, bf16_grads=True, **lean))
                if optimized.get("swiglu") == "fused_linear":
                    variants.append(Variant(f"{best} +bf16 moments swiglu=fused_linear_recompute +bf16 weight copy "
                                            "+bf16 grads", "ours", no_h, weight_copy=True, bf16_grads=True, **lean))
            # every GEMM of the blocks on the faster of cuBLAS's pick and cuBLASLt's best for its
            # shape (kernels/tuned_mm.py), on the memory-lean rows above
            tuned = dict(optimized, linear="tuned")
            variants.append(Variant(f"{best} +bf16 moments linear=tuned", "ours", tuned, **lean))
            variants.append(Variant(f"{best} +bf16 moments +bf16 weight copy linear=tuned", "ours", tuned,
                                    weight_copy=True, **lean))
            if optimized.get("swiglu") == "fused_linear":
                variants.append(Variant(f"{best} +bf16 moments swiglu=fused_linear_recompute +bf16 weight copy "
                                        "linear=tuned", "ours", dict(no_h, linear="tuned"), weight_copy=True, **lean))
            if grad_accum == 1 and not sharded:
                variants.append(Variant(f"{best} +bf16 moments +bf16 weight copy +bf16 grads linear=tuned", "ours",
                                        tuned, weight_copy=True, bf16_grads=True, **lean))
                if optimized.get("swiglu") == "fused_linear":
                    variants.append(Variant(f"{best} +bf16 moments swiglu=fused_linear_recompute +bf16 weight copy "
                                            "+bf16 grads linear=tuned", "ours", dict(no_h, linear="tuned"),
                                            weight_copy=True, bf16_grads=True, **lean))
    return variants


def peer_variants(family: str) -> list[Variant]:
    variants = [Variant("hf eager", "hf"), Variant("hf compile", "hf", compile=True)]
    if family == "qwen2" and _liger_installed():
        variants += [
            Variant("hf+liger", "hf", liger=True),
            Variant("hf+liger bf16 params", "hf", liger=True, bf16_params=True),
            Variant("hf+liger compile", "hf", liger=True, compile=True),
        ]
    return variants


def dataclass_dict(obj) -> dict:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}


def _liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


# ----------------------------------------------------------------------------------------------
# Batches


def host_cpu() -> str:
    """The host CPU's model name (Linux /proc/cpuinfo; else what `platform` knows)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def random_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (batch, seq_len + 1), generator=g)
        out.append({"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return pinned(out)


def pinned(batches: list[dict]) -> list[dict]:
    """Pinned host memory, as the project's DataLoader delivers: the copy to the GPU is asynchronous."""
    if not torch.cuda.is_available():
        return batches
    return [{k: v.pin_memory() for k, v in b.items()} for b in batches]


def markov_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`n` fresh batches from one fixed random Markov chain over the first `MARKOV_STATES` token ids:
    each token has `MARKOV_BRANCHES` possible successors with random probabilities. A model learns
    the transition table (the loss falls from log V towards the chain's entropy rate, about 1.2
    nats) but cannot memorise the data, since every batch is new; once learnt, the final losses of
    two correct implementations differ by bf16 noise only. Measured on an H100, two things made the
    check meaningless: the bundled sample text (16 x 1024 tokens cover all of it every step; the
    loss collapses towards 0.1 by memorisation and the reference and its compiled self differed by
    23%), and a harder chain (2048 states, 8 successors) still on its plateau at step 200, where
    the step at which each run leaves the plateau decides the loss (2.2 against 6.5)."""
    g = torch.Generator().manual_seed(seed)
    states = min(MARKOV_STATES, vocab)
    successors = torch.randint(0, states, (states, MARKOV_BRANCHES), generator=g)  # (S, K) token ids
    cumulative = torch.rand(states, MARKOV_BRANCHES, generator=g).cumsum(1)
    cumulative /= cumulative[:, -1:].clone()  # (S, K) cumulative transition probabilities
    out = []
    for _ in range(n):
        tokens = torch.empty(batch, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, states, (batch,), generator=g)
        u = torch.rand(seq_len, batch, 1, generator=g)
        for t in range(seq_len):
            prev = tokens[:, t]
            branch = torch.searchsorted(cumulative[prev], u[t]).squeeze(1).clamp_(max=MARKOV_BRANCHES - 1)
            tokens[:, t + 1] = successors[prev, branch]
        out.append({"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()})
    return pinned(out)


MARKOV_STATES = 256
MARKOV_BRANCHES = 4


# ----------------------------------------------------------------------------------------------
# Running one variant


def train_config(args, variant: Variant, steps: int, out_dir: str) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "model_config_path": args.model,
            "kernels": variant.kernels,
            "compile": variant.compile,
            "compile_mode": variant.compile_mode,
            "compile_scope": variant.compile_scope,
            "compile_loss_head": variant.compile_loss_head,
            "output_dir": out_dir,
            "run_name": re.sub(r"[^A-Za-z0-9_.-]+", "_", variant.name),
            "trainer": {
                "micro_batch_size": args.batch,
                "seq_len": args.seq_len,
                "grad_accum_steps": args.grad_accum,
                "max_steps": steps,
                "precision": "bf16",
                "activation_checkpointing": variant.activation_checkpointing,
                "activation_checkpointing_layers": variant.ac_layers,
                "activation_memory_budget": variant.memory_budget,
                "residual_dtype": variant.residual_dtype,
                "seed": args.seed,
            },
            "optimizer": {"lr": args.lr, "implementation": variant.optimizer, "state_dtype": variant.optimizer_state,
                          "bf16_weight_copy": variant.weight_copy, "bf16_grads": variant.bf16_grads},
            "schedule": {"type": "cosine", "warmup_steps": min(20, steps // 10), "min_lr": args.lr / 10},
            "checkpoint": {"save_final": False, "export_hf": False},
            "logging": {"log_every": 10**9},
            "parallel": {"strategy": args.strategy, "reshard_after_forward": variant.reshard_after_forward,
                         "fsdp_blocks_per_unit": variant.fsdp_blocks_per_unit,
                         "ddp_bucket_cap_mb": args.ddp_bucket_cap_mb},
        },
        where="benchmarks/throughput.py",
    )


def run_ours(args, variant: Variant, groups: list[list[dict]], steps: int, info) -> dict:
    torch.manual_seed(args.seed)
    model_config = load_model_config(args.model)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = train_config(args, variant, steps, out_dir)
        model = AutoModelForCausalLM.from_config(model_config, kernels=cfg.kernels)
        trainer = Trainer(cfg, model, train_loader=None, val_loader=None, info=info)
        if variant.kernels == dataclass_dict(KernelConfig.reference()):
            # The pure-PyTorch reference compiles as plain torch.compile does, without the graph
            # pass that preparing the model installed (read when the graph compiles, at the first step).
            inductor_config.post_grad_custom_post_pass = None
        step_fn = lambda group, i: trainer.train_step(group)[0]  # noqa: E731  (a group: one step's micro-batches)
        result = time_steps(step_fn, groups, steps, args, info)
        if args.profile and info.rank == 0 and info.device.type == "cuda":
            result["profile"] = profile_steps(step_fn, groups, variant.name, ops=args.profile_ops)
        result["flops_per_token"] = trainer.flops_per_token
        result["params"] = trainer.bare.num_parameters()
        del trainer, model, step_fn
    return result


def run_hf(args, variant: Variant, groups: list[list[dict]], steps: int, info) -> dict:
    import transformers

    torch.manual_seed(args.seed)
    ours = load_model_config(args.model)
    hf_config = transformers.AutoConfig.for_model(**ours.to_hf_config())
    if variant.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()  # patches transformers' Qwen2 classes in this process
    model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(info.device)
    if variant.bf16_params:
        model = model.to(torch.bfloat16)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=info.device.type == "cuda"
    )
    # The peer is compiled as transformers users compile it: without the Inductor graph pass that
    # an earlier variant of ours may have installed in this process (src/trainer/graph_passes.py).
    inductor_config.post_grad_custom_post_pass = None
    forward = torch.compile(model) if variant.compile else model
    autocast = (
        contextlib.nullcontext() if variant.bf16_params else torch.autocast(info.device.type, dtype=torch.bfloat16)
    )

    def step(group, i):
        step_loss = torch.zeros((), device=info.device)
        for batch in group:  # gradient accumulation over the step's micro-batches
            # transformers shifts labels itself: pass the unshifted sequence.
            ids = batch["input_ids"].to(info.device, non_blocking=True)
            with autocast:
                loss = forward(input_ids=ids, labels=ids).loss / len(group)
            loss.backward()
            step_loss += loss.detach().float()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return step_loss

    result = time_steps(step, groups, steps, args, info)
    with torch.device("meta"):  # the same architecture: the same FLOPs per token as ours
        same_shape = AutoModelForCausalLM.from_config(ours)
    result["flops_per_token"] = same_shape.flops_per_token(args.seq_len)
    result["params"] = same_shape.num_parameters()
    del model, optimizer, forward
    return result


def time_steps(step_fn, groups: list[list[dict]], steps: int, args, info) -> dict:
    """Warm-up (compile) steps, then `steps - warmup` timed steps; losses of every step kept.
    With `--clocks`, nvidia-smi samples the SM clock and power from the warm-up on (it needs a few
    hundred ms to start), and the samples of the timed steps are kept."""
    cuda = info.device.type == "cuda"
    sampler = ClockSampler(info.device.index or 0) if cuda and getattr(args, "clocks", False) else None
    if sampler is not None and not sampler.start():
        sampler = None
    reading, begin = None, datetime.datetime.now()
    try:
        losses = []
        t0 = time.perf_counter()
        for i in range(args.warmup):
            losses.append(step_fn(groups[i % len(groups)], i))
        if cuda:
            torch.cuda.synchronize()
        warmup_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        timed = steps - args.warmup
        host_s = []  # each call's own time: below the step time while the host runs ahead of the GPU
        begin = datetime.datetime.now()
        t0 = time.perf_counter()
        for i in range(args.warmup, steps):
            t_call = time.perf_counter()
            losses.append(step_fn(groups[i % len(groups)], i))
            host_s.append(time.perf_counter() - t_call)
        if cuda:
            torch.cuda.synchronize()
        step_s = (time.perf_counter() - t0) / timed
    finally:
        if sampler is not None:  # also stopped when a step raises: no nvidia-smi left running
            reading = sampler.stop(begin, datetime.datetime.now())
    tokens_per_step = args.batch * args.seq_len * args.grad_accum * info.world_size
    return {
        "step_ms": 1e3 * step_s,
        "host_ms": 1e3 * sorted(host_s)[len(host_s) // 2],  # median
        "tokens_per_s": tokens_per_step / step_s,
        "compile_s": max(warmup_s - args.warmup * step_s, 0.0),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        # CUDA-graph variants: their graph pools stay reserved but count as free in "allocated"
        # between replays, so their real footprint is this one.
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
        "losses": [float(l) for l in torch.stack([torch.as_tensor(l, device="cpu") for l in losses]).tolist()],
        # --clocks: median SM clock (MHz) and power draw (W) over the timed steps
        **({"sm_mhz": reading["sm_mhz"], "power_w": reading["power_w"]} if reading else {}),
    }


# Kernel name patterns of the profile's categories, checked in order (the first match wins).
KERNEL_CATEGORIES = [
    ("matmul", re.compile(r"nvjet|gemm|cutlass|xmma|triton_mm|triton_tem", re.I)),
    ("attention", re.compile(r"sdpa|flash|fmha|attention|flex", re.I)),
    ("optimizer", re.compile(r"multi_tensor_apply|adam|foreach", re.I)),
    ("loss", re.compile(r"cross_entropy|_ce_|log_softmax|logprob", re.I)),
]


def kernel_category(name: str) -> str:
    return next((category for category, pattern in KERNEL_CATEGORIES if pattern.search(name)), "elementwise/other")


def profile_steps(step_fn, groups: list[list[dict]], name: str, steps: int = 3, sync=None, activities=None,
                  ops: bool = False) -> dict:
    """The GPU time per step by category and the costliest kernels over a few steps (after
    warm-up): the 15 costliest printed, the 40 costliest returned (for the JSON). With `ops`, the
    host's ops are traced too and each kernel row names the ops that launched it
    (`kernel_launchers`).

    One untraced step runs first, inside the profiler's schedule (the profiler's own start-up
    costs fall in it), and a sync follows it: CUPTI records a kernel by when the GPU runs it, so
    without the sync the warm-up step's kernels, still queued when the trace starts, are counted
    in the traced steps (on an H200 with CUDA graphs, 1.3 steps' kernels per traced step). The
    first traced step then starts from an idle GPU: its first gap is the host's launch."""
    from torch.profiler import ProfilerActivity, profile, schedule

    sync = sync or torch.cuda.synchronize
    one_untraced_then_traced = schedule(wait=0, warmup=1, active=steps, repeat=1)
    if activities is None:
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if ops else [ProfilerActivity.CUDA]
    with profile(activities=activities, schedule=one_untraced_then_traced) as prof:
        for i in range(1 + steps):
            step_fn(groups[i % len(groups)], i)
            if i == 0 or i == steps:  # the warm-up's GPU work before the trace starts; the traced steps' before it stops
                sync()
            prof.step()
    # With the host's ops traced, an op's row also counts its kernels' time (and Inductor's Triton
    # launches are ops named as their kernels): only the GPU's own rows then.
    events = [e for e in prof.key_averages()
              if e.device_type.name == "CUDA" or (not ops and getattr(e, "self_device_time_total", 0))]
    total = sum(getattr(e, "self_device_time_total", 0) for e in events) or 1
    categories: dict[str, float] = {}
    for e in events:
        key = kernel_category(e.key)
        categories[key] = categories.get(key, 0.0) + e.self_device_time_total / 1e3 / steps
    top = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[:40]
    rows = [{"kernel": e.key[:120], "ms_per_step": e.self_device_time_total / 1e3 / steps,
             "share": e.self_device_time_total / total, "calls_per_step": e.count / steps} for e in top]
    if ops:
        launchers = kernel_launchers(prof.events(), steps)
        for r in rows:
            r["launched_by"] = launchers.get(r["kernel"], [])
    idle = gpu_idle(prof, steps)
    print(f"\nprofile of '{name}': GPU time {total / 1e3 / steps:.1f} ms per step, "
          f"GPU idle {idle['idle_ms_per_step']:.2f} ms per step between kernels")
    print("  " + ", ".join(f"{k} {v:.1f} ms" for k, v in sorted(categories.items(), key=lambda kv: -kv[1])))
    for r in rows[:15]:
        print(f"  {r['ms_per_step']:7.2f} ms {100 * r['share']:5.1f}% x{r['calls_per_step']:<5.0f} {r['kernel']}")
        for launcher in r.get("launched_by", [])[:2]:
            print(f"      x{launcher['calls_per_step']:<5.0f} from {launcher['op']}")
    print(f"  host calls that wait for the GPU, per step: {idle['host_syncs_per_step'] or 'none'}")
    print("  host time in CUDA runtime calls, per step: " + ", ".join(
        f"{a['call']} {a['ms_per_step']:.2f} ms (x{a['calls_per_step']:.0f}, max {a['max_ms']:.2f})" for a in idle["host_api"][:4]))
    print("  largest idle gaps (after -> before):")
    for g in idle["gaps"][:8]:
        print(f"  {g['ms_per_step']:7.3f} ms x{g['calls_per_step']:<5.0f} {g['after'][:50]} -> {g['before'][:50]}")
    return {"gpu_ms_per_step": total / 1e3 / steps, "categories_ms": categories, "top_kernels": rows, **idle}


def kernel_launchers(events, steps: int, depth: int = 3) -> dict[str, list[dict]]:
    """For each GPU kernel (and memset, copy) name, the host ops that launched it, costliest first:
    the innermost op and `depth - 1` of its callers ("aten::sum < aten::linalg_vector_norm < ..."),
    with its GPU time and calls per step. `events` is the profiler's event list (`prof.events()`),
    traced with CPU activity: the profiler links each kernel to the op that was running when it
    was launched. Under CUDA graphs every kernel of a graph comes from one graph launch, so this
    is useful on steps without them."""
    by_kernel: dict[str, dict[str, list[float]]] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CPU or not e.kernels:
            continue
        chain, parent = [e.name], e.cpu_parent
        while parent is not None and len(chain) < depth:
            chain.append(parent.name)
            parent = parent.cpu_parent
        op = " < ".join(chain)
        for k in e.kernels:
            by_kernel.setdefault(k.name[:120], {}).setdefault(op, []).append(k.duration / 1e3)
    return {
        kernel: [{"op": op, "ms_per_step": sum(ms) / steps, "calls_per_step": len(ms) / steps}
                 for op, ms in sorted(ops.items(), key=lambda kv: -sum(kv[1]))[:5]]
        for kernel, ops in by_kernel.items()
    }


def gpu_idle(prof, steps: int) -> dict:
    """Where the GPU waits: the time between the first and the last GPU activity of the profiled
    steps that no kernel, copy or memset covers, per step, and the largest gaps summed by the
    pair of kernels around them (a gap after the last kernel of one graph and before the first of
    the next is the host's: launches, Python, a sync)."""
    activity = sorted(
        (e.start_ns(), e.end_ns(), e.name()) for e in prof.profiler.kineto_results.events()
        if e.device_type() == torch.autograd.DeviceType.CUDA and e.duration_ns() > 0
    )
    if not activity:
        return {"idle_ms_per_step": 0.0, "host_syncs_per_step": {}, "host_api": [], "gaps": []}
    gaps: dict[tuple[str, str], list[float]] = {}
    busy_until, after = activity[0][1], activity[0][2]
    for start, end, name in activity[1:]:
        if start > busy_until:
            gaps.setdefault((after, name), []).append((start - busy_until) / 1e6)
        if end > busy_until:
            busy_until, after = end, name
    ranked = sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:20]
    syncs: dict[str, int] = {}  # host calls that wait for the GPU
    # Host time inside each CUDA runtime call: a call that blocks (a sync, a launch into a full
    # queue, a pageable copy) shows as milliseconds here while the others take microseconds.
    api_ms: dict[str, list[float]] = {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            continue
        if re.fullmatch(r"cuda\w*Synchronize|cudaMemcpy", e.name()):
            syncs[e.name()] = syncs.get(e.name(), 0) + 1
        if e.name().startswith("cu"):
            api_ms.setdefault(e.name(), []).append(e.duration_ns() / 1e6)
    api_ranked = sorted(api_ms.items(), key=lambda kv: -sum(kv[1]))[:8]
    return {
        "idle_ms_per_step": sum(sum(v) for v in gaps.values()) / steps,
        "host_syncs_per_step": {k: v / steps for k, v in syncs.items()},
        "host_api": [{"call": name, "ms_per_step": sum(v) / steps, "calls_per_step": len(v) / steps, "max_ms": max(v)}
                     for name, v in api_ranked],
        "gaps": [{"after": a[:120], "before": b[:120], "ms_per_step": sum(v) / steps, "calls_per_step": len(v) / steps,
                  "max_ms": max(v)}  # one long gap or many short ones
                 for (a, b), v in ranked],
    }


# ----------------------------------------------------------------------------------------------
# Reporting


def row_label(row: dict) -> str:
    """The variant's name, and which of the `--repeat` rounds when there are several."""
    return row["variant"] + (f" [{row['round'] + 1}]" if row.get("round") else "")


def repeat_summary(rows: list[dict], baseline: str) -> list[dict]:
    """Per variant, over its `--repeat` rounds (in first-run order): runs, median, min and max
    tokens/s, the spread (max - min) / median, and the median against the baseline's median."""
    by_variant: dict[str, list[float]] = {}
    for r in rows:
        if "tokens_per_s" in r:
            by_variant.setdefault(r["variant"], []).append(r["tokens_per_s"])
    medians = {name: statistics.median(values) for name, values in by_variant.items()}
    return [
        {"variant": name, "runs": len(values), "median_tokens_per_s": medians[name], "min_tokens_per_s": min(values),
         "max_tokens_per_s": max(values), "spread": (max(values) - min(values)) / medians[name],
         "vs_baseline": medians[name] / medians[baseline] if baseline in medians else None}
        for name, values in by_variant.items()
    ]


def format_summary(summary: list[dict], baseline: str) -> str:
    header = f"{'variant (over its rounds)':28s} {'runs':>4s} {'median tok/s':>12s} {'min':>10s} {'max':>10s} {'spread':>7s} {'vs ' + baseline:>22s}"
    lines = [header, "-" * len(header)]
    for s in summary:
        vs = f"{s['vs_baseline']:.3f}x" if s["vs_baseline"] is not None else "-"
        lines.append(f"{s['variant']:28s} {s['runs']:4d} {s['median_tokens_per_s']:12.0f} {s['min_tokens_per_s']:10.0f} "
                     f"{s['max_tokens_per_s']:10.0f} {100 * s['spread']:6.2f}% {vs:>22s}")
    return "\n".join(lines)


def format_table(rows: list[dict], baseline: str, loss_check: bool) -> str:
    base = next((r for r in rows if r["variant"] == baseline and "tokens_per_s" in r), None)
    header = (f"{'variant':28s} {'tokens/s':>10s} {'vs ' + baseline:>22s} {'MFU':>6s} {'step ms':>8s} {'peak GiB':>9s} "
              f"{'reserved':>9s} {'compile s':>9s}")
    if loss_check:
        header += f" {'final loss':>10s} {'vs ref':>8s}"
    lines = [header, "-" * len(header)]
    ref_loss = next((r["final_loss"] for r in rows if r["variant"] == "reference" and "final_loss" in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"{row_label(r):28s} failed: {r['error'][:100]}")
            continue
        speedup = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        line = (
            f"{row_label(r):28s} {r['tokens_per_s']:10.0f} {speedup:>22s} {mfu:>6s} {r['step_ms']:8.1f} "
            f"{r['peak_gib']:9.2f} {r.get('peak_reserved_gib', float('nan')):9.2f} {r['compile_s']:9.1f}"
        )
        if loss_check:
            rel = f"{100 * (r['final_loss'] / ref_loss - 1):+.2f}%" if ref_loss else "-"
            line += f" {r['final_loss']:10.4f} {rel:>8s}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "tokens_per_s" in r]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(ok) + 1.5))
    colors = ["#4c72b0" if r["kind"] == "ours" else "#c44e52" for r in ok]
    ax.barh([row_label(r) for r in ok], [r["tokens_per_s"] / 1e3 for r in ok], color=colors)
    for i, r in enumerate(ok):
        mfu = f"  MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        ax.text(r["tokens_per_s"] / 1e3, i, f" {r['tokens_per_s'] / 1e3:.0f}k{mfu}, {r['peak_gib']:.1f} GiB", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("training tokens/s (thousands)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="configs/model/gpt_125m.yaml", help="a model YAML")
    p.add_argument("--batch", type=int, default=16, help="sequences per GPU per micro-batch")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--grad-accum", type=int, default=1, metavar="N",
                   help="micro-batches per optimizer step (gradient accumulation; tokens/s counts all of them)")
    p.add_argument("--steps", type=int, default=30, help="steps per variant, warm-up included")
    p.add_argument("--warmup", type=int, default=8, help="untimed first steps (compilation happens here)")
    p.add_argument("--variants", nargs="*", default=None,
                   help="names to run (default: all of ours); e.g. reference 'reference+compile' optimized")
    p.add_argument("--peers", action="store_true", help="also run Hugging Face transformers (and Liger when installed)")
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    p.add_argument("--memory-budgets", type=float, nargs="*", default=[0.5],
                   help="add one 'optimized +memory budget B' variant per value (trainer.activation_memory_budget)")
    p.add_argument("--ac-layers", type=int, nargs="*", default=[], metavar="N",
                   help="add one '... +selective AC on N blocks' variant per value (trainer.activation_checkpointing_layers)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="run the variant list N times over, in turn (A B A B ...), in one process; the table adds "
                        "each variant's median and spread (a same-machine comparison)")
    p.add_argument("--loss-check", type=int, default=0, metavar="N",
                   help="train each variant N steps on the sample text and compare final losses (no peers)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strategy", default="none", choices=["none", "ddp", "fsdp2"],
                   help="parallel strategy inside each process (set by --nproc)")
    p.add_argument("--fsdp-units", type=int, nargs="*", default=[], metavar="N",
                   help="with --strategy fsdp2: add one 'optimized +FSDP units of N blocks' variant per value "
                        "(parallel.fsdp_blocks_per_unit)")
    p.add_argument("--ddp-bucket-cap-mb", type=float, default=DDP_BUCKET_CAP_MB, metavar="MB",
                   help="with --strategy ddp: DDP's gradient bucket size for every variant (parallel.ddp_bucket_cap_mb)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs: relaunch under torchrun with FSDP2")
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s per GPU for MFU (default: by device name)")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 3 steps of each variant: GPU time by category, the 15 costliest "
                        "kernels (40 in the JSON), the GPU's idle time between kernels and its largest gaps, "
                        "and host calls that wait for the GPU")
    p.add_argument("--profile-ops", action="store_true",
                   help="with --profile: trace the host's ops too and name, for each costly kernel, the ops that "
                        "launched it (informative without CUDA graphs, whose kernels all come from a graph launch)")
    p.add_argument("--clocks", action="store_true",
                   help="read the SM clock and power draw (nvidia-smi) during each variant's timed steps: an MFU "
                        "below the matmuls' rate can be the clock at the power cap")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/throughput_<model>_<device>.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.grad_accum < 1:
        raise SystemExit(f"--grad-accum must be at least 1, got {args.grad_accum}")
    if args.repeat < 1:
        raise SystemExit(f"--repeat must be at least 1, got {args.repeat}")
    if args.warmup < 0 or (args.loss_check or args.steps) <= args.warmup:
        what = f"--loss-check {args.loss_check}" if args.loss_check else f"--steps {args.steps}"
        raise SystemExit(f"{what} must exceed --warmup {args.warmup} (the untimed first steps), and --warmup be >= 0: "
                         "raise the one or lower the other")
    if args.repeat > 1 and args.loss_check:
        raise SystemExit("--repeat compares speeds over rounds; a --loss-check run trains the same steps again: drop one")
    if args.ddp_bucket_cap_mb != DDP_BUCKET_CAP_MB and args.strategy != "ddp":
        raise SystemExit("--ddp-bucket-cap-mb sizes DDP's gradient buckets: add --strategy ddp")
    if args.fsdp_units and args.strategy != "fsdp2" and args.nproc == 1:  # --nproc N relaunches with fsdp2
        raise SystemExit("--fsdp-units groups FSDP2's units: add --strategy fsdp2 (or --nproc N)")
    if args.profile_ops and not args.profile:
        raise SystemExit("--profile-ops names the ops behind the profile's kernels: add --profile")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
        forwarded += ["--strategy", "fsdp2"] if "--strategy" not in forwarded else []
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", __file__, *forwarded]
        raise SystemExit(subprocess.call(cmd, env=env))

    info = init_distributed("auto")
    if info.device.type != "cuda" and info.rank == 0:
        print("note: no CUDA device; running on the CPU (a smoke test, not a measurement)", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    model_config = load_model_config(args.model)
    family = model_config.model_family
    variants = our_variants(family, args.activation_checkpointing, sharded=args.strategy == "fsdp2",
                            memory_budgets=tuple(args.memory_budgets), grad_accum=args.grad_accum,
                            ac_layers=tuple(args.ac_layers), fsdp_units=tuple(args.fsdp_units))
    if args.peers and not args.loss_check and info.world_size == 1:
        variants += peer_variants(family)
    if args.variants:
        unknown = set(args.variants) - {v.name for v in variants}
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in args.variants]
    steps = args.loss_check or args.steps
    n_groups = steps if args.loss_check else min(steps, 8)
    make = markov_batches if args.loss_check else random_batches
    batches = make(n_groups * args.grad_accum, args.batch, args.seq_len, model_config.vocab_size, args.seed + info.rank)
    groups = [batches[g * args.grad_accum:(g + 1) * args.grad_accum] for g in range(n_groups)]  # one list per step
    peak = peak_flops(info.device, args.peak_flops)
    rows = []
    for repeat, variant in [(r, v) for r in range(args.repeat) for v in variants]:  # A B A B ...
        torch._dynamo.reset()
        try:
            run = run_ours if variant.kind == "ours" else run_hf
            result = run(args, variant, groups, steps, info)
        except Exception as e:  # one failing variant must not hide the others' numbers
            rows.append({"variant": variant.name, "kind": variant.kind, "round": repeat,
                         "error": f"{type(e).__name__}: {e}"})
            if info.rank == 0:
                print(f"{variant.name}: FAILED {type(e).__name__}: {e}", flush=True)
            if "CUDA error" in str(e) or "illegal memory access" in str(e):
                print("the CUDA context is lost after this error: the remaining variants are not run", flush=True)
                break
            continue
        gc.collect()
        torch.cuda.empty_cache()
        result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / (peak * info.world_size) if peak else None
        if args.loss_check:
            tail = result["losses"][-10:]
            result["final_loss"] = sum(tail) / len(tail)
        rows.append({"variant": variant.name, "kind": variant.kind, "round": repeat, "kernels": variant.kernels,
                     "compile": variant.compile, **result})
        if info.rank == 0:
            print(f"{variant.name}: {result['tokens_per_s']:.0f} tokens/s, step {result['step_ms']:.1f} ms "
                  f"(host {result['host_ms']:.1f} ms per call), "
                  f"peak {result['peak_gib']:.2f} GiB, compile {result['compile_s']:.1f} s"
                  + (f", {result['sm_mhz']:.0f} MHz, {result['power_w']:.0f} W" if "sm_mhz" in result else ""),
                  flush=True)

    if info.rank == 0:
        device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
        slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
        model_name = Path(args.model).stem
        suffix = ("_loss" if args.loss_check else "") + (f"_{info.world_size}gpu" if info.world_size > 1 else "")
        suffix += f"_accum{args.grad_accum}" if args.grad_accum > 1 else ""
        out = Path(args.out or REPO / "benchmarks" / "results" / f"throughput_{model_name}_{slug}{suffix}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        import transformers
        import triton

        meta = {
            "device": device_name, "gpus": info.world_size, "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "model": args.model, "batch": args.batch, "seq_len": args.seq_len, "grad_accum": args.grad_accum,
            "steps": steps, "warmup": args.warmup, "repeat": args.repeat,
            "peak_flops": peak, "activation_checkpointing": args.activation_checkpointing,
            "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "strategy": args.strategy,
            "ddp_bucket_cap_mb": args.ddp_bucket_cap_mb,
            # host-bound steps (per-block compile, FSDP2 hooks) move with the host's speed
            "host_cpu": host_cpu(), "host_cores": os.cpu_count(),
        }
        summary = repeat_summary(rows, "reference+compile") if args.repeat > 1 else None
        out.write_text(json.dumps({"meta": meta, "rows": rows, **({"summary": summary} if summary else {})}, indent=1))
        accum = f" x {args.grad_accum} micro-batches" if args.grad_accum > 1 else ""
        title = (f"{model_name}, {args.batch}x{args.seq_len}{accum} per GPU, {info.world_size} x {device_name}, "
                 f"torch {torch.__version__}")
        plot(rows, out.with_suffix(".png"), title)
        print(f"\nwrote {out} and {out.with_suffix('.png')}")
        print(title)
        print(format_table(rows, "reference+compile", bool(args.loss_check)))
        if summary:
            print("\n" + format_summary(summary, "reference+compile"))
    shutdown_distributed(info)


if __name__ == "__main__":
    main()
