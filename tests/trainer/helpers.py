"""Shared pieces of the trainer tests: a tiny model, a synthetic loader that follows the data
loader protocol (dict batches of CPU LongTensors, state_dict / load_state_dict), configs."""

from __future__ import annotations

import dataclasses

import torch

from src.models import AutoModelForCausalLM, GPT2Config, KernelConfig
from src.trainer.config import (
    CheckpointConfig,
    LoggingConfig,
    OptimizerConfig,
    ParallelConfig,
    ScheduleConfig,
    TrainConfig,
    TrainerConfig,
)

VOCAB = 61
SEQ_LEN = 16


def tiny_model_config(**changes) -> GPT2Config:
    base = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=VOCAB, block_size=32)
    base.update(changes)
    return GPT2Config(**base)


def tiny_model(seed: int = 0, kernels: KernelConfig | None = None, **changes):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_model_config(**changes), kernels=kernels or KernelConfig.reference())


def tiny_qwen2_model(seed: int = 0, kernels: KernelConfig | None = None):
    """A tiny Qwen2 (RoPE, GQA, SwiGLU, tied embeddings) over the same vocabulary; MLP widths are
    multiples of 8, as the fused SwiGLU kernel's TMA rows need."""
    torch.manual_seed(seed)
    family = dict(model_family="qwen2", n_layer=2, n_head=4, num_kv_heads=2, n_embd=32, intermediate_size=64,
                  vocab_size=VOCAB, block_size=32, tie_word_embeddings=True)  # fmt: skip
    return AutoModelForCausalLM.from_config(family, kernels=kernels or KernelConfig.reference())


# Qwen2's fused MLP kernel (`swiglu: fused_linear`): on the CPU in fp32 it runs its unfused backward
# through the interpreter, with the op's own autograd, which DDP and FSDP2 must reduce like any other.
SWIGLU_FUSED = KernelConfig.reference().replace(swiglu="fused_linear")

# GPT-2's MLP as one op (`gelu: cublaslt`): on the CPU it computes its unfused math, with the op's
# own autograd returning all four MLP parameters' gradients, which DDP and FSDP2 must reduce.
GELU_MLP_OP = KernelConfig.reference().replace(gelu="cublaslt")


# The optimized run's precision settings, on the CPU: bf16 autocast, the projections' weight
# gradients in fp32 from the matmul, the residual stream in bf16.
BF16_OPTIMIZED = dict(kernels=KernelConfig.reference().replace(linear="fp32_wgrad"),
                      trainer=dict(precision="bf16", residual_dtype="bf16"))


class SyntheticLoader:
    """Sequence i of an endless stream is fixed by (seed, i). Rank r of W, batch b of size B holds
    sequences b*B*W + r*B + [0, B): one process with batch B*W sees exactly the union of W ranks.
    Labels follow a learnable rule (next token = (token * 3 + 1) % VOCAB) with a random share
    ignored (-100), so micro-batches carry different numbers of supervised tokens."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 seq_len: int = SEQ_LEN, ignore_share: float = 0.3, num_batches: int | None = None):
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.seq_len, self.ignore_share = seed, seq_len, ignore_share
        self.num_batches = num_batches  # None: endless (a train loader); else a finite val loader
        self.position = 0

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        first = torch.randint(0, VOCAB, (1,), generator=g)
        ids = [int(first)]
        for _ in range(self.seq_len):
            ids.append((ids[-1] * 3 + 1) % VOCAB if torch.rand((), generator=g) < 0.9 else int(torch.randint(0, VOCAB, (1,), generator=g)))
        ids = torch.tensor(ids)
        labels = ids[1:].clone()
        labels[torch.rand(self.seq_len, generator=g) < self.ignore_share] = -100
        return ids[:-1], labels

    def batch(self, b: int) -> dict[str, torch.Tensor]:
        start = b * self.batch_size * self.world_size + self.rank * self.batch_size
        pairs = [self.sequence(start + j) for j in range(self.batch_size)]
        return {"input_ids": torch.stack([p[0] for p in pairs]), "labels": torch.stack([p[1] for p in pairs])}

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("endless loader")
        return self.num_batches

    def __iter__(self):
        if self.num_batches is not None:
            return (self.batch(b) for b in range(self.num_batches))
        return self._endless()

    def _endless(self):
        while True:
            b = self.position
            self.position += 1
            yield self.batch(b)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def make_config(run_dir, *, max_steps=8, micro_batch_size=4, grad_accum_steps=1, strategy="none",
                checkpoint=None, **trainer_changes) -> TrainConfig:
    import os

    output_dir, run_name = os.path.split(os.fspath(run_dir))
    cfg = TrainConfig(
        run_name=run_name,
        output_dir=output_dir,
        trainer=TrainerConfig(micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps, seq_len=SEQ_LEN,
                              max_steps=max_steps, device="cpu", **trainer_changes),
        optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(type="cosine", warmup_steps=2, min_lr=3e-4),
        checkpoint=checkpoint or CheckpointConfig(every=0, save_final=False, export_hf=False),
        logging=LoggingConfig(log_every=1),
        parallel=ParallelConfig(strategy=strategy),
    )
    return cfg


def replace(cfg, **sections):
    return dataclasses.replace(cfg, **sections)


def with_optimizer(cfg, **changes):
    return replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, **changes))


def train_losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.history if row["split"] == "train"]


def params(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.bare.state_dict().items()}


def assert_resume_is_bitwise(straight_cfg, split_cfg, build, info, check_resumed=None, split_at: int = 2) -> None:
    """A run stopped at `split_at` and resumed into a model built with another seed (the loaded weights
    must win) ends with the losses and weights of one straight run. `check_resumed(trainer)` looks at
    the resumed trainer before it trains on."""
    from src.trainer.trainer import Trainer

    straight = Trainer(straight_cfg, build(), SyntheticLoader(4), None, info)
    straight.fit()
    first = Trainer(split_cfg, build(), SyntheticLoader(4), None, info)
    first.fit(until_step=split_at)
    resumed = replace(split_cfg, checkpoint=CheckpointConfig(resume="auto", save_final=False, export_hf=False))
    second = Trainer(resumed, build(seed=123), SyntheticLoader(4), None, info)
    assert second.step == split_at
    if check_resumed is not None:
        check_resumed(second)
    second.fit()
    assert train_losses(first) + train_losses(second) == train_losses(straight)
    for name, p in params(straight).items():
        assert torch.equal(params(second)[name], p), name
