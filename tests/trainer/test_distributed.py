"""2 ranks through torchrun with gloo on the CPU: DDP and FSDP2 match one process with the same
global batch; FSDP2 resumes exactly, with torch's AdamW and with ours on the local shards; a 2-rank
checkpoint resumes in one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from src.trainer import CheckpointConfig, Trainer
from src.utils.distributed import DistInfo

from .dist_worker import MAX_STEPS, SPLIT_AT
from .helpers import (BF16_OPTIMIZED, GELU_MLP_OP, SWIGLU_FUSED, SyntheticLoader, make_config, replace, tiny_model,
                      tiny_qwen2_model)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    # TRITON_INTERPRET: the FSDP2 runs with our Triton AdamW run its kernels on the CPU
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.trainer.dist_worker", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out / "results.json") as f:
        return out, json.load(f)


def single_process_run(tmp_path, steps=MAX_STEPS, kernels=None, model_fn=tiny_model, **trainer_changes) -> Trainer:
    cfg = make_config(tmp_path / "single", max_steps=steps, micro_batch_size=4, grad_accum_steps=2, **trainer_changes)
    trainer = Trainer(cfg, model_fn(kernels=kernels), SyntheticLoader(4), None, CPU)
    trainer.fit()
    return trainer


def single_process_losses(tmp_path, steps=MAX_STEPS):
    return [r["loss"] for r in single_process_run(tmp_path, steps).history if r["split"] == "train"]


def test_ddp_and_fsdp2_match_one_process(two_ranks, tmp_path):
    _, results = two_ranks
    single = single_process_losses(tmp_path)
    assert results["ddp"] == pytest.approx(single, rel=1e-5)
    assert results["ddp_compiled_model"] == pytest.approx(single, rel=1e-5)
    assert results["fsdp2"] == pytest.approx(single, rel=1e-5)
    assert results["ddp_bucket_bytes_cap"] == int(0.01 * 2**20)
    # DDP's gradients live in its buckets: no second copy of every gradient
    assert results["ddp_grads"] > 4 and 1 <= results["ddp_grad_storages"] <= 2


def test_ddp_with_the_optimized_precision_settings_matches_one_process(two_ranks, tmp_path):
    """bf16 autocast with fp32 weight gradients from the matmul (a custom autograd Function, whose
    gradients DDP's hooks must still reduce) and the residual stream in bf16."""
    _, results = two_ranks
    trainer = single_process_run(tmp_path, kernels=BF16_OPTIMIZED["kernels"], **BF16_OPTIMIZED["trainer"])
    single = [r["loss"] for r in trainer.history if r["split"] == "train"]
    assert results["ddp_bf16_optimized"] == pytest.approx(single, rel=2e-5)
    # and it is not the fp32 run: bf16 rounding moves the losses (by 5e-4 over the 4 steps here)
    assert sum(abs(a - b) for a, b in zip(results["ddp_bf16_optimized"], results["ddp"])) > 1e-4


def test_ddp_with_bf16_weight_copies_trains_the_same_and_broadcasts_none_of_them(two_ranks):
    """optimizer.bf16_weight_copy under DDP: each rank's AdamW writes its own copies (the copies
    are the casts they replace, so the losses are the optimized run's); DDP leaves them out of its
    per-forward buffer broadcast."""
    _, results = two_ranks
    assert results["ddp_bf16_weight_copy"] == pytest.approx(results["ddp_bf16_optimized"], rel=1e-5)
    assert results["ddp_weight_copies"] > 4 and results["ddp_copies_are_weights"]
    ignored = results["ddp_ignored_buffers"]
    assert len(ignored) >= results["ddp_weight_copies"] and all(n.endswith(".weight_copy") for n in ignored)


def test_qwen2_with_the_fused_swiglu_op_matches_one_process_under_ddp_and_fsdp2(two_ranks, tmp_path):
    """`swiglu: fused_linear` returns the down projection's weight gradient from its own autograd
    (a custom op): DDP's hooks and FSDP2's reduce-scatter must still reduce it."""
    _, results = two_ranks
    trainer = single_process_run(tmp_path, kernels=SWIGLU_FUSED, model_fn=tiny_qwen2_model)
    single = [r["loss"] for r in trainer.history if r["split"] == "train"]
    assert single[-1] < single[0]  # it trains
    assert results["ddp_qwen2_swiglu_fused"] == pytest.approx(single, rel=1e-5)
    assert results["fsdp2_qwen2_swiglu_fused"] == pytest.approx(single, rel=1e-5)


def test_gpt2_with_the_gelu_mlp_op_matches_one_process_under_ddp_and_fsdp2(two_ranks, tmp_path):
    """`gelu: cublaslt` returns the fc and projection weight and bias gradients from its own
    autograd (a custom op): DDP's hooks and FSDP2's reduce-scatter must still reduce them."""
    _, results = two_ranks
    trainer = single_process_run(tmp_path, kernels=GELU_MLP_OP)
    single = [r["loss"] for r in trainer.history if r["split"] == "train"]
    assert single[-1] < single[0]  # it trains
    assert results["ddp_gpt2_gelu_mlp_op"] == pytest.approx(single, rel=1e-5)
    assert results["fsdp2_gpt2_gelu_mlp_op"] == pytest.approx(single, rel=1e-5)


def test_fsdp2_gradient_norm_from_local_shards_is_the_global_norm(two_ranks, tmp_path):
    """Under FSDP2 the trainer takes the norm from each rank's shards and one all-reduce
    (total_grad_norm); it must be the norm of the whole gradient, and clipping must be on."""
    _, results = two_ranks
    trainer = single_process_run(tmp_path)
    single = [r["grad_norm"] for r in trainer.history if r["split"] == "train"]
    assert max(single) > trainer.cfg.optimizer.grad_clip  # the clip coefficient was applied
    for name in ("ddp_grad_norms", "fsdp2_grad_norms", "fsdp2_triton_adamw_grad_norms"):
        assert results[name] == pytest.approx(single, rel=1e-5), name


def test_fsdp2_exact_resume(two_ranks):
    _, results = two_ranks
    assert results["fsdp2_resumed_at"] == SPLIT_AT
    assert results["fsdp2_split"] == results["fsdp2"]  # bitwise
    assert results["fsdp2_split_bitwise"] is True


def test_fsdp2_units_of_two_blocks_match_and_resume_exactly(two_ranks):
    """parallel.fsdp_blocks_per_unit: 2 puts both blocks in one FSDP2 group (one shared state):
    the losses of one block per unit, a bitwise resume through the distributed checkpoint, and a
    resume from a checkpoint written with one block per unit."""
    _, results = two_ranks
    assert results["fsdp2_units_shared_state"] is True
    assert results["fsdp2_units"] == pytest.approx(results["fsdp2"], rel=1e-5)
    assert results["fsdp2_units_split"] == results["fsdp2_units"]  # bitwise
    # resumed with another unit size than the checkpoint was written with
    assert results["fsdp2_units_changed_resumed_at"] == SPLIT_AT
    assert results["fsdp2_units_changed"] == pytest.approx(results["fsdp2"], rel=1e-6)


def test_triton_adamw_on_fsdp2_shards_matches_torch_and_resumes_exactly(two_ranks):
    _, results = two_ranks
    assert results["fsdp2_triton_adamw"] == pytest.approx(results["fsdp2"], rel=1e-5)
    assert results["fsdp2_triton_adamw_dtensor_moments"] is True  # saved sharded, like torch's
    assert results["fsdp2_triton_adamw_split"] == results["fsdp2_triton_adamw"]  # bitwise
    assert results["fsdp2_triton_adamw_split_bitwise"] is True


def test_bf16_moments_keep_ddp_replicas_identical(two_ranks):
    """Under DDP each rank updates a full copy: with bf16 moments every copy rounds alike, so
    weights and moments stay bit for bit the same on both ranks; the losses stay near fp32's."""
    _, results = two_ranks
    assert results["ddp_bf16_moments_replicas_equal"] is True
    assert results["ddp_bf16_moments"] == pytest.approx(results["ddp"], rel=1e-2)


def test_bf16_moments_on_fsdp2_shards_resume_exactly(two_ranks):
    """optimizer.state_dtype: bfloat16 under FSDP2: bf16 local shards, saved and loaded through the
    distributed checkpoint, the resumed losses bit for bit those of the straight run, and close
    to the fp32-moment run's."""
    _, results = two_ranks
    assert results["fsdp2_bf16_moments_dtype"] == ["torch.bfloat16"]
    assert results["fsdp2_bf16_moments_split"] == results["fsdp2_bf16_moments"]  # bitwise
    assert results["fsdp2_bf16_moments"] == pytest.approx(results["fsdp2_triton_adamw"], rel=1e-2)


def test_two_rank_checkpoint_resumes_in_one_process(two_ranks, tmp_path):
    out, results = two_ranks
    ckpt = out / "fsdp2_split" / "checkpoints" / f"step_{SPLIT_AT:08d}"
    cfg = make_config(tmp_path / "one", max_steps=MAX_STEPS, micro_batch_size=4, grad_accum_steps=2,
                      checkpoint=CheckpointConfig(resume=str(ckpt), save_final=False, export_hf=False))
    loader = SyntheticLoader(4)
    trainer = Trainer(cfg, tiny_model(seed=5), loader, None, CPU)
    assert trainer.step == SPLIT_AT
    expected = torch.load(out / "fsdp2_step2.pt")
    for name, value in trainer.bare.state_dict().items():
        assert torch.equal(value, expected[name]), name
    # The data order restarts with another world size; put the loader where the 2 ranks were.
    loader.position = SPLIT_AT * 2
    trainer.fit()
    losses = [r["loss"] for r in trainer.history if r["split"] == "train"]
    assert losses == pytest.approx(results["fsdp2"][SPLIT_AT:], rel=1e-5)


def test_fsdp2_root_keeps_its_parameters_gathered_after_forward(monkeypatch):
    """The blocks but the last follow parallel.reshard_after_forward; the root (embeddings, head) never
    reshards after forward (freeing it crashed the first backward on an H100 with torch 2.11)."""
    import torch.distributed.fsdp as fsdp

    from src.trainer import parallelize

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append((module, kw["reshard_after_forward"])))
    monkeypatch.setattr(parallelize, "build_device_mesh", lambda info: None)
    model = tiny_model()
    parallelize.apply_fsdp2(model, CPU, bf16=False, reshard_after_forward=True)
    blocks = list(parallelize.transformer_blocks(model))
    assert [m for m, _ in calls] == [*blocks, model]
    # the last block's backward runs first: it keeps its parameters gathered too
    assert [r for _, r in calls] == [True] * (len(blocks) - 1) + [False, False]
    calls.clear()
    parallelize.apply_fsdp2(tiny_model(), CPU, bf16=False, reshard_after_forward=False)
    assert [r for _, r in calls] == [False] * (len(blocks) + 1)


def test_fsdp2_units_group_consecutive_blocks_without_mixing_frozen_ones(monkeypatch):
    """fsdp_units: `blocks_per_unit` blocks at a time, the last unit shorter, never a trainable and
    a frozen block together (DPO's policy, then reference layers); apply_fsdp2 hands each unit of
    several blocks to fully_shard as one list, and the last trainable unit keeps its parameters."""
    import torch.distributed.fsdp as fsdp

    from src.trainer import parallelize

    blocks = [torch.nn.Linear(2, 2) for _ in range(7)]
    for block in blocks[5:]:
        block.requires_grad_(False)
    assert parallelize.fsdp_units(blocks, 1) == [[b] for b in blocks]
    assert parallelize.fsdp_units(blocks, 2) == [blocks[0:2], blocks[2:4], blocks[4:5], blocks[5:7]]
    assert parallelize.fsdp_units(blocks, 8) == [blocks[0:5], blocks[5:7]]
    with pytest.raises(ValueError, match="blocks_per_unit"):
        parallelize.fsdp_units(blocks, 0)

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append((module, kw["reshard_after_forward"])))
    monkeypatch.setattr(parallelize, "build_device_mesh", lambda info: None)
    model = tiny_model(n_layer=5)
    parallelize.apply_fsdp2(model, CPU, bf16=False, reshard_after_forward=True, blocks_per_unit=2)
    layers = list(model.layers)
    assert [m for m, _ in calls] == [layers[0:2], layers[2:4], layers[4], model]
    assert [r for _, r in calls] == [True, True, False, False]


def test_fsdp_blocks_per_unit_config_errors(tmp_path):
    from src.trainer.config import ParallelConfig
    from src.utils.config import ConfigError

    cfg = make_config(tmp_path, max_steps=1)
    with pytest.raises(ConfigError, match="fsdp_blocks_per_unit must be >= 1"):
        replace(cfg, parallel=ParallelConfig(strategy="fsdp2", fsdp_blocks_per_unit=0))
    with pytest.raises(ConfigError, match="set parallel.strategy: fsdp2"):
        replace(cfg, parallel=ParallelConfig(strategy="ddp", fsdp_blocks_per_unit=4))
    assert replace(cfg, parallel=ParallelConfig(strategy="fsdp2", fsdp_blocks_per_unit=4)).parallel.fsdp_blocks_per_unit == 4
    with pytest.raises(ConfigError, match="ddp_bucket_cap_mb must be positive"):
        replace(cfg, parallel=ParallelConfig(strategy="ddp", ddp_bucket_cap_mb=0))
    with pytest.raises(ConfigError, match="set parallel.strategy: ddp or leave it at 25"):
        replace(cfg, parallel=ParallelConfig(strategy="fsdp2", ddp_bucket_cap_mb=100))


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_fsdp2_and_ddp_in_one_plain_process_train_like_no_strategy(tmp_path, strategy):
    """Without torchrun the trainer makes a process group of one (torch's env:// rendezvous
    failed asking for RANK before): the losses of parallel.strategy none."""
    import torch.distributed as dist

    single = single_process_losses(tmp_path)
    assert not dist.is_initialized()
    try:
        cfg = make_config(tmp_path / strategy, max_steps=MAX_STEPS, micro_batch_size=4, grad_accum_steps=2,
                          strategy=strategy)
        trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
        trainer.fit()
        assert dist.get_world_size() == 1
        assert [r["loss"] for r in trainer.history if r["split"] == "train"] == pytest.approx(single, rel=1e-5)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
