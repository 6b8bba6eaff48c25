"""FSDP2 scenarios for tests/trainer/test_multi_rank.py, run under torchrun with gloo on the CPU:

    torchrun --nproc_per_node=W -m tests.trainer.multi_rank_worker OUT_DIR [RESUME_ROOT]

For each tiny model config (MODEL_CONFIGS), one launch runs:

1. `continuous`: STEPS optimizer steps of FSDP2 over W ranks with a global batch of
   GLOBAL_BATCH sequences (GLOBAL_BATCH / (W * ACCUM) per rank and micro-step), saving a
   checkpoint every SPLIT_AT steps. At each save rank 0 also writes the gathered (full) model and
   optimizer state to OUT_DIR/<model>/state_at_step_<step>.pt.
2. with RESUME_ROOT (the OUT_DIR of a launch with another world size): `resumed` loads that
   launch's step-SPLIT_AT checkpoint (resharded by torch.distributed.checkpoint), writes the
   gathered state right after the load to OUT_DIR/<model>/state_after_load.pt, and trains to
   STEPS on the batches the original run saw after the split.

Rank 0 writes OUT_DIR/results.json: per model, the logged train losses of each run.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from src.models import AutoModelForCausalLM, KernelConfig, load_model_config
from src.trainer import CheckpointConfig, Trainer
from src.trainer.checkpoint import step_dir_name
from src.utils.distributed import init_distributed, shutdown_distributed

from .helpers import SyntheticLoader, make_config

MODEL_CONFIGS = {"gpt2_tiny": "configs/model/gpt2_tiny.yaml", "qwen2_tiny": "configs/model/qwen2_tiny.yaml"}
STEPS = 20
SPLIT_AT = 10
GLOBAL_BATCH = 8  # sequences per optimizer step, over all ranks and micro-steps
ACCUM = 2  # micro-steps per optimizer step on the multi-rank runs


def build_model(name: str):
    """The same initial weights on every rank and in the single-process runs."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(load_model_config(MODEL_CONFIGS[name]), kernels=KernelConfig.reference())


def per_rank_batch(world_size: int, accum: int) -> int:
    if GLOBAL_BATCH % (world_size * accum):
        raise ValueError(f"GLOBAL_BATCH={GLOBAL_BATCH} does not split over {world_size} ranks x {accum} micro-steps")
    return GLOBAL_BATCH // (world_size * accum)


def full_state(trainer: Trainer) -> dict:
    """The gathered model and optimizer state, keyed by parameter name (a collective; rank 0 gets it)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {
        "model": get_model_state_dict(trainer.model, options=options),
        "optimizer": get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options),
    }


def train_losses(trainer: Trainer) -> list[float]:
    return [row["loss"] for row in trainer.history if row["split"] == "train"]


class RecordingTrainer(Trainer):
    """Also writes the gathered state at each checkpoint, to compare what a resharded load yields."""

    record_dir: str = ""

    def save_checkpoint(self) -> str:
        path = super().save_checkpoint()
        state = full_state(self)
        if self.info.is_rank0:
            torch.save(state, os.path.join(self.record_dir, f"state_at_step_{self.step}.pt"))
        return path


def run(out_dir: str, resume_root: str | None) -> None:
    info = init_distributed("cpu")
    batch = per_rank_batch(info.world_size, ACCUM)
    results: dict[str, dict] = {}
    for name in MODEL_CONFIGS:
        model_dir = os.path.join(out_dir, name)
        loader = SyntheticLoader(batch, info.rank, info.world_size)
        cfg = make_config(os.path.join(model_dir, "continuous"), max_steps=STEPS, micro_batch_size=batch,
                          grad_accum_steps=ACCUM, strategy="fsdp2",
                          checkpoint=CheckpointConfig(every=SPLIT_AT, keep_last=2, save_final=False, export_hf=False))
        continuous = RecordingTrainer(cfg, build_model(name), loader, None, info)
        continuous.record_dir = model_dir
        continuous.fit()
        results[name] = {"continuous": train_losses(continuous)}

        if resume_root is not None:
            ckpt = os.path.join(resume_root, name, "continuous", "checkpoints", step_dir_name(SPLIT_AT))
            cfg = make_config(os.path.join(model_dir, "resumed"), max_steps=STEPS, micro_batch_size=batch,
                              grad_accum_steps=ACCUM, strategy="fsdp2",
                              checkpoint=CheckpointConfig(resume=ckpt, save_final=False, export_hf=False))
            loader = SyntheticLoader(batch, info.rank, info.world_size)
            # Another world size restarts the data order; put the loader where the saving run was
            # (the same sequences: batch b of every layout covers the same global positions).
            loader.position = SPLIT_AT * ACCUM
            resumed = Trainer(cfg, build_model(name), loader, None, info)
            state = full_state(resumed)
            if info.is_rank0:
                torch.save(state, os.path.join(model_dir, "state_after_load.pt"))
            results[name]["resumed_at"] = resumed.step
            resumed.fit()
            results[name]["resumed"] = train_losses(resumed)

    if info.is_rank0:
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f)
    shutdown_distributed(info)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
    sys.stdout.flush()
    # gloo occasionally aborts in its own thread teardown at interpreter exit, after all the work
    # is done and the group destroyed; leave without running it.
    os._exit(0)
