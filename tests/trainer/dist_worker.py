"""Two-rank scenarios for tests/trainer/test_distributed.py, run under torchrun with gloo:

    torchrun --nproc_per_node=2 -m tests.trainer.dist_worker OUT_DIR

DDP runs (eager, and compiled whole through its wrapper with persistent gradient buffers) and
FSDP2 runs (2 micro-steps of 2 sequences per rank), and an FSDP2 run split by a checkpoint at
step 2 and resumed; the same FSDP2 runs with our Triton AdamW on the local shards (through the
Triton interpreter: the caller sets TRITON_INTERPRET=1), and with bf16 moments under DDP and
FSDP2. Rank 0 writes OUT_DIR/results.json and
the gathered FSDP2 weights at step 2 (OUT_DIR/fsdp2_step2.pt) for the single-process checks.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from src.trainer import CheckpointConfig, Trainer
from src.trainer.config import ParallelConfig
from src.trainer.optimizer import TritonAdamW
from src.utils.distributed import init_distributed, shutdown_distributed

from .helpers import BF16_OPTIMIZED, GELU_MLP_OP, SWIGLU_FUSED, SyntheticLoader, make_config, replace, tiny_model, tiny_qwen2_model

MAX_STEPS = 4
SPLIT_AT = 2


def losses(trainer: Trainer) -> list[float]:
    return [row["loss"] for row in trainer.history if row["split"] == "train"]


def grad_norms(trainer: Trainer) -> list[float]:
    return [row["grad_norm"] for row in trainer.history if row["split"] == "train"]


def full_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def run(out_dir: str) -> None:
    info = init_distributed("cpu")
    rank, world = info.rank, info.world_size

    def trainer(name: str, strategy: str, kernels=None, trainer_changes=None, model_fn=tiny_model, **changes) -> Trainer:
        cfg = make_config(os.path.join(out_dir, name), max_steps=MAX_STEPS, micro_batch_size=2, grad_accum_steps=2,
                          strategy=strategy, **(trainer_changes or {}))
        cfg = replace(cfg, **changes)
        return Trainer(cfg, model_fn(kernels=kernels), SyntheticLoader(2, rank, world), None, info)

    def split_run(name: str, **changes) -> tuple[Trainer, Trainer]:
        """`name` trained to SPLIT_AT, then a fresh trainer resumed from its checkpoint to the end."""
        first = trainer(name, "fsdp2", **changes)
        first.fit(until_step=SPLIT_AT)
        second = trainer(name, "fsdp2", **changes,
                         checkpoint=CheckpointConfig(resume="auto", save_final=False, export_hf=False))
        second.fit()
        return first, second

    results = {}
    # small buckets (parallel.ddp_bucket_cap_mb): several all-reduces per step, the same math
    ddp = trainer("ddp", "ddp", parallel=ParallelConfig(strategy="ddp", ddp_bucket_cap_mb=0.01))
    results["ddp_bucket_bytes_cap"] = ddp.model.bucket_bytes_cap
    ddp.fit()
    results["ddp"] = losses(ddp)
    results["ddp_grad_norms"] = grad_norms(ddp)
    # The whole forward compiled through the DDP wrapper (Dynamo splits it at gradient buckets), in
    # the CUDA-graph mode: on the CPU Inductor runs no graphs, but the trainer's persistent .grad
    # buffers (kept for CUDA graphs with accumulation) go through DDP's no_sync and all-reduce.
    ddp_compiled = trainer("ddp_compiled_model", "ddp", compile=True, compile_scope="model",
                           compile_mode="reduce-overhead")
    assert ddp_compiled.persistent_grads
    ddp_compiled.fit()
    results["ddp_compiled_model"] = losses(ddp_compiled)
    # Its gradients are views into DDP's all-reduce buckets (gradient_as_bucket_view), so they
    # share a few bucket storages instead of holding one copy each.
    grads = [p.grad for p in ddp_compiled.bare.parameters() if p.requires_grad]
    results["ddp_grads"] = len(grads)
    results["ddp_grad_storages"] = len({g.untyped_storage().data_ptr() for g in grads if g is not None})

    # DDP with bf16 AdamW moments: every replica must round its moments alike (the random bits
    # come from tensor, element and step, not the rank), or the weights would drift apart.
    ddp_moments = trainer("ddp_bf16_moments", "ddp", optimizer=replace(ddp.cfg.optimizer, implementation="triton",
                                                                      state_dtype="bfloat16"))
    ddp_moments.fit()
    results["ddp_bf16_moments"] = losses(ddp_moments)
    flat = torch.cat([p.detach().flatten() for p in ddp_moments.bare.parameters()]
                     + [s["exp_avg_sq"].float().flatten() for s in ddp_moments.optimizer.state.values()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(gathered, flat)
    results["ddp_bf16_moments_replicas_equal"] = all(torch.equal(g, gathered[0]) for g in gathered)

    # DDP with the optimized run's precision settings (bf16 autocast on the CPU)
    ddp_bf16 = trainer("ddp_bf16_optimized", "ddp", kernels=BF16_OPTIMIZED["kernels"],
                       trainer_changes=BF16_OPTIMIZED["trainer"])
    assert ddp_bf16.bare.residual_dtype == torch.bfloat16
    ddp_bf16.fit()
    results["ddp_bf16_optimized"] = losses(ddp_bf16)
    # and with bf16 weight copies written by our AdamW: DDP must leave those buffers out of its
    # broadcast, and every replica's copies must be its weights
    ddp_copies = trainer("ddp_bf16_weight_copy", "ddp", kernels=BF16_OPTIMIZED["kernels"],
                         trainer_changes=BF16_OPTIMIZED["trainer"],
                         optimizer=replace(ddp.cfg.optimizer, implementation="triton", bf16_weight_copy=True))
    ddp_copies.fit()
    results["ddp_bf16_weight_copy"] = losses(ddp_copies)
    results["ddp_ignored_buffers"] = sorted(ddp_copies.model.parameters_to_ignore)
    results["ddp_weight_copies"] = len(ddp_copies.weight_copies)
    results["ddp_copies_are_weights"] = all(torch.equal(c, w.detach().to(torch.bfloat16))
                                            for w, c in ddp_copies.weight_copies.items())

    # Qwen2 with the fused SwiGLU + down projection op, under both strategies
    for strategy in ("ddp", "fsdp2"):
        fused = trainer(f"{strategy}_qwen2_swiglu_fused", strategy, kernels=SWIGLU_FUSED, model_fn=tiny_qwen2_model)
        fused.fit()
        results[f"{strategy}_qwen2_swiglu_fused"] = losses(fused)
        gelu_op = trainer(f"{strategy}_gpt2_gelu_mlp_op", strategy, kernels=GELU_MLP_OP)
        gelu_op.fit()
        results[f"{strategy}_gpt2_gelu_mlp_op"] = losses(gelu_op)

    straight = trainer("fsdp2", "fsdp2")
    straight.fit()
    results["fsdp2"] = losses(straight)
    results["fsdp2_grad_norms"] = grad_norms(straight)  # from the local shards and one all-reduce
    straight_state = full_state(straight)

    first = trainer("fsdp2_split", "fsdp2")
    first.fit(until_step=SPLIT_AT)
    step2_state = full_state(first)
    second = trainer("fsdp2_split", "fsdp2", checkpoint=CheckpointConfig(resume="auto", save_final=False, export_hf=False))
    results["fsdp2_resumed_at"] = second.step
    second.fit()
    results["fsdp2_split"] = losses(first) + losses(second)
    split_state = full_state(second)

    # Our AdamW on each rank's shards: torch's losses, moments kept as DTensors, an exact resume.
    triton_adamw = dict(optimizer=replace(first.cfg.optimizer, implementation="triton"))
    ours = trainer("fsdp2_triton_adamw", "fsdp2", **triton_adamw)
    assert isinstance(ours.optimizer, TritonAdamW)
    ours.fit()
    results["fsdp2_triton_adamw"] = losses(ours)
    results["fsdp2_triton_adamw_grad_norms"] = grad_norms(ours)
    moments = [s["exp_avg"] for s in ours.optimizer.state.values()]
    results["fsdp2_triton_adamw_dtensor_moments"] = bool(moments) and all(isinstance(m, DTensor) for m in moments)
    ours_state = full_state(ours)
    first, second = split_run("fsdp2_triton_adamw_split", **triton_adamw)
    results["fsdp2_triton_adamw_split"] = losses(first) + losses(second)
    ours_split_state = full_state(second)

    # bf16 moments on the shards, through the distributed checkpoint: an exact resume too.
    bf16_moments = dict(optimizer=replace(first.cfg.optimizer, implementation="triton", state_dtype="bfloat16"))
    straight_bf16 = trainer("fsdp2_bf16_moments", "fsdp2", **bf16_moments)
    straight_bf16.fit()
    moments = [s["exp_avg"] for s in straight_bf16.optimizer.state.values()]
    results["fsdp2_bf16_moments_dtype"] = sorted({str(m.to_local().dtype) for m in moments})
    results["fsdp2_bf16_moments"] = losses(straight_bf16)
    first, second = split_run("fsdp2_bf16_moments_split", **bf16_moments)
    results["fsdp2_bf16_moments_split"] = losses(first) + losses(second)
    # Both blocks in one FSDP2 unit (parallel.fsdp_blocks_per_unit): one all-gather and one
    # reduce-scatter for the two, the same losses, and an exact resume through the checkpoint.
    units = dict(parallel=replace(straight.cfg.parallel, fsdp_blocks_per_unit=2))
    grouped = trainer("fsdp2_units", "fsdp2", **units)
    blocks = list(grouped.bare.layers)
    results["fsdp2_units_shared_state"] = fully_shard.state(blocks[0]) is fully_shard.state(blocks[1])
    grouped.fit()
    results["fsdp2_units"] = losses(grouped)
    first, second = split_run("fsdp2_units_split", **units)
    results["fsdp2_units_split"] = losses(first) + losses(second)
    # A checkpoint written with one block per unit resumes with two: the same parameter names.
    first = trainer("fsdp2_units_changed", "fsdp2")
    first.fit(until_step=SPLIT_AT)
    second = trainer("fsdp2_units_changed", "fsdp2", **units,
                     checkpoint=CheckpointConfig(resume="auto", save_final=False, export_hf=False))
    results["fsdp2_units_changed_resumed_at"] = second.step
    second.fit()
    results["fsdp2_units_changed"] = losses(first) + losses(second)
    if rank == 0:
        results["fsdp2_split_bitwise"] = all(torch.equal(split_state[k], v) for k, v in straight_state.items())
        results["fsdp2_triton_adamw_split_bitwise"] = all(
            torch.equal(ours_split_state[k], v) for k, v in ours_state.items())
        torch.save(step2_state, os.path.join(out_dir, "fsdp2_step2.pt"))
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
    shutdown_distributed(info)


if __name__ == "__main__":
    run(sys.argv[1])
    sys.stdout.flush()
    # gloo occasionally aborts in its own thread teardown at interpreter exit, after all the work
    # is done and the group destroyed; leave without running it.
    os._exit(0)
