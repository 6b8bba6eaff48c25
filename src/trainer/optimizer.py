"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Weight decay pulls weights towards zero; on gains of norms, biases and embedding tables it only
hurts (it shrinks the scale a norm is supposed to learn, and rows of rare tokens decay towards
zero between their updates), so those parameters go into a group with weight_decay = 0.

Schedules (`lr_at(step)`, step counted from 0):
    cosine    linear warmup to lr over warmup_steps, then cosine from lr to min_lr at total_steps
    wsd       warmup, stable at lr, then a linear decay to min_lr over the last decay_fraction
    constant  warmup, then lr
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimizerConfig, ScheduleConfig


def is_embedding(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding) or type(module).__name__.endswith("Embedding")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed matrices, and the rest (1-D tensors, embedding tables). Tied weights once.

    A weight tied to an embedding (GPT-2's lm_head) is an embedding table and is not decayed.
    """
    no_decay_ids = set()
    for module in model.modules():
        if is_embedding(module):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2 or id(p) in no_decay_ids:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) on CUDA, multi-tensor `foreach` on the CPU."""
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=fused,
        foreach=None if fused else True,
    )


class LRSchedule:
    """lr_at(step) for `total_steps` optimizer steps; its state is the config and length (checkpointed)."""

    def __init__(self, cfg: ScheduleConfig, lr: float, total_steps: int):
        if total_steps < 1:
            raise ValueError(f"the schedule needs total_steps >= 1, got {total_steps}")
        self.cfg = cfg
        self.lr = lr
        self.total_steps = total_steps

    def lr_at(self, step: int) -> float:
        cfg, lr = self.cfg, self.lr
        if step < cfg.warmup_steps:
            return lr * (step + 1) / cfg.warmup_steps
        if cfg.type == "constant":
            return lr
        if cfg.type == "cosine":
            span = max(1, self.total_steps - cfg.warmup_steps)
            progress = min(1.0, (step - cfg.warmup_steps) / span)
            return cfg.min_lr + 0.5 * (lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
        # wsd: stable until the decay starts, then linear to min_lr at total_steps
        decay_steps = max(1, round(cfg.decay_fraction * self.total_steps))
        decay_start = max(cfg.warmup_steps, self.total_steps - decay_steps)
        if step < decay_start:
            return lr
        progress = min(1.0, (step - decay_start) / max(1, self.total_steps - decay_start))
        return lr + (cfg.min_lr - lr) * progress

    def state_dict(self) -> dict:
        return {"type": self.cfg.type, "lr": self.lr, "total_steps": self.total_steps,
                "warmup_steps": self.cfg.warmup_steps, "min_lr": self.cfg.min_lr}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
