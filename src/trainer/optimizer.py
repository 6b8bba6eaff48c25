"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Two implementations of the same AdamW (`optimizer.implementation`): torch.optim.AdamW (fused on
CUDA, foreach on the CPU), and `TritonAdamW`, torch's class with its step replaced by one Triton
launch per parameter group (kernels/adamw.py) that applies the gradient-clipping coefficient
while it reads the gradients, instead of the separate read-and-write pass of clip_grad_norm_.
Both keep the same state and state_dict, so a checkpoint of one resumes with the other. Under
FSDP2 the parameters, gradients and moments are DTensors: TritonAdamW updates each rank's local
shards (AdamW is elementwise, so the shards need nothing from each other) and keeps the moments
as DTensors, so that distributed checkpoints save them sharded as they do torch's.

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
import os

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from kernels.adamw import BLOCK, NUM_WARPS, AdamWTables, adamw_step_, check_launch
from src.utils.config import ConfigError

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


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW (same hyper-parameters, state and state_dict) whose step is kernels/adamw.py.

    Before `step()` the caller may set two 0-d fp32 device tensors: `grad_scale`, multiplied
    into every gradient as it is read (the clip coefficient), and `found_inf`, nonzero to skip
    the whole update and keep the step counts. Neither is read on the host. Step counts are fp32
    device tensors, as torch's fused AdamW keeps them. Parameters must be contiguous fp32 tensors
    on one device, or FSDP2's DTensors whose local shards are.

    `state_dtype=torch.bfloat16` keeps exp_avg and exp_avg_sq in bf16, stored with stochastic
    rounding (kernels/adamw.py); the state_dict then holds bf16 moments. A state dict of either
    dtype loads into either: its moments are cast to this optimizer's state dtype.

    `weight_copies` ({parameter: its bf16 copy}, from `weight_copies(model)`): the update writes
    each listed parameter's new value, rounded to bf16, into its copy as well (kernels/adamw.py).
    `gradient_copies` ({parameter: its bf16 copy}, `optimizer.bf16_grads`): the listed parameters'
    gradients are read from their copies' `.grad` (bf16) instead of their own."""

    def __init__(self, params, *, lr: float, betas: tuple[float, float], eps: float, block: int = BLOCK,
                 num_warps: int = NUM_WARPS, state_dtype: torch.dtype = torch.float32,
                 weight_copies: dict[torch.Tensor, torch.Tensor] | None = None,
                 gradient_copies: dict[torch.Tensor, torch.Tensor] | None = None):
        check_launch(block, num_warps)
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"TritonAdamW: state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, foreach=False)
        self.launch = {"block": block, "num_warps": num_warps}  # the update kernel's (benchmarks/optimizer.py sweeps them)
        self.state_dtype = state_dtype
        self.weight_copies = dict(weight_copies or {})
        self.gradient_copies = dict(gradient_copies or {})
        self.grad_scale: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None
        # per group: (params, their local shards' addresses, step tensors, tables)
        self._tables: dict[int, tuple[list, list, list, AdamWTables]] = {}

    def _state_of(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        elif state["step"].device != p.device or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)  # from a foreach checkpoint
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # torch casts the moments to each parameter's dtype (fp32)
        for state in self.state.values():
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state and state[name].dtype != self.state_dtype:
                    state[name] = state[name].to(self.state_dtype)
        self._tables.clear()  # the loaded state tensors live at other addresses

    def gradient_of(self, p: torch.Tensor) -> torch.Tensor | None:
        return gradient_of(p, self.gradient_copies)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for copy in self.gradient_copies.values():
            if set_to_none or copy.grad is None:
                copy.grad = None
            else:
                copy.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("TritonAdamW.step takes no closure")
        for index, group in enumerate(self.param_groups):
            if group["amsgrad"] or group["maximize"]:
                raise ValueError("TritonAdamW supports neither amsgrad nor maximize")
            params = [p for p in group["params"] if self.gradient_of(p) is not None]
            if not params:
                continue
            # Tables of addresses, rebuilt when the set of parameters with a gradient or their
            # storage changes (usually never after the first step) or a state dict was loaded.
            addresses = [local(p).data_ptr() for p in params]
            cached = self._tables.get(index)
            if cached is None or cached[1] != addresses or any(a is not b for a, b in zip(cached[0], params)):
                states = [self._state_of(p) for p in params]
                steps = [s["step"] for s in states]
                tables = AdamWTables([local(p) for p in params], [local(s["exp_avg"]) for s in states],
                                     [local(s["exp_avg_sq"]) for s in states], steps,
                                     copies=[self.weight_copies.get(p) for p in params], **self.launch)
                cached = (params, addresses, steps, tables)  # the step tensors are kept alive with their addresses
                self._tables[index] = cached
            tables = cached[3]
            beta1, beta2 = group["betas"]
            adamw_step_(tables, [local(self.gradient_of(p)) for p in params], lr=group["lr"], beta1=beta1, beta2=beta2,
                        eps=group["eps"], weight_decay=group["weight_decay"], grad_scale=self.grad_scale,
                        found_inf=self.found_inf)


def gradient_of(p: torch.Tensor, gradient_copies: dict[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
    """`p`'s gradient: its copy's (bf16) for a parameter in `gradient_copies` (optimizer.bf16_grads),
    else `p.grad` (also for a listed one whose copy has none: torch.distributed.checkpoint creates
    the state of a new optimizer by a zero-lr step on zero `.grad`s)."""
    copy = gradient_copies.get(p)
    return p.grad if copy is None or copy.grad is None else copy.grad


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (the same memory); a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def total_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of `grads` (fp32 0-d tensor), as `torch.nn.utils.get_total_norm`.

    FSDP2's gradients are DTensors sharded over one mesh dimension. Their norm is taken here from
    each rank's local shards (one multi-tensor norm), squared, and summed over ranks by one
    all-reduce. torch's own path dispatches the norm through DTensor: on an H100 host, under
    cProfile, that cost about 7 ms per step for Qwen2-0.5B's 170 gradients, against 1 ms
    without FSDP2."""
    if not any(isinstance(g, DTensor) for g in grads):
        if any(g.dtype != torch.float32 for g in grads):
            # bf16 gradients (optimizer.bf16_grads): each tensor's norm accumulated and returned in
            # fp32 (torch's get_total_norm would round the per-tensor norms to bf16), one
            # multi-tensor launch per dtype (a list of mixed dtypes takes a kernel per tensor)
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for g in grads:
                by_dtype.setdefault(g.dtype, []).append(g)
            norms = [n for group in by_dtype.values() for n in torch._foreach_norm(group, 2, dtype=torch.float32)]
            return torch.linalg.vector_norm(torch.stack(norms))
        return torch.nn.utils.get_total_norm(grads, foreach=True)
    meshes = {g.device_mesh for g in grads if isinstance(g, DTensor)}
    if len(meshes) != 1 or not all(isinstance(g, DTensor) and g.device_mesh.ndim == 1 for g in grads):
        raise ValueError("total_grad_norm: expected every gradient to be a DTensor on one 1-D device mesh "
                         "(FSDP2 as apply_fsdp2 shards); got a mixture")
    if not all(p.is_shard() for g in grads for p in g.placements):
        raise ValueError(f"total_grad_norm: expected sharded gradients (FSDP2); got placements "
                         f"{sorted({str(g.placements) for g in grads})}")
    squared = torch.nn.utils.get_total_norm([local(g) for g in grads], foreach=True).float().square()
    torch.distributed.all_reduce(squared, group=meshes.pop().get_group())
    return squared.sqrt()


def clip_coefficient(max_norm: float, total_norm: torch.Tensor) -> torch.Tensor:
    """clip_grad_norm_'s scale, min(1, max_norm / (total_norm + 1e-6)), as a device tensor."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def clip_grads_(grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale `grads` in place by `clip_coefficient`, on the device; DTensors through their local
    shards."""
    torch._foreach_mul_([local(g) for g in grads], clip_coefficient(max_norm, total_norm))


def resolve_implementation(cfg: OptimizerConfig, device: torch.device) -> str:
    """`auto`: our Triton AdamW on CUDA unless `optimizer.fused` asks for torch's;
    torch.optim.AdamW otherwise."""
    if cfg.implementation != "auto":
        return cfg.implementation
    return "triton" if device.type == "cuda" and cfg.fused is None else "torch"


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device: torch.device,
                    weight_copies: dict[torch.Tensor, torch.Tensor] | None = None,
                    gradient_copies: dict[torch.Tensor, torch.Tensor] | None = None) -> torch.optim.AdamW:
    """AdamW: `TritonAdamW` or torch's (fused on CUDA, multi-tensor `foreach` on the CPU), as
    `resolve_implementation` says. Build it after FSDP2 has sharded the model, so that it holds
    the sharded parameters. `weight_copies`: bf16 copies that `TritonAdamW` writes with its update
    (torch's AdamW does not: the caller refreshes them after its step). `gradient_copies`: the
    copies that hold their weights' gradients (optimizer.bf16_grads; `TritonAdamW` only)."""
    groups = param_groups(model, cfg.weight_decay)
    implementation = resolve_implementation(cfg, device)
    if cfg.state_dtype == "bfloat16" and implementation != "triton":
        raise ConfigError(f"optimizer.state_dtype=bfloat16 needs our Triton AdamW (its stochastic rounding), but this "
                          f"run resolves optimizer.implementation={cfg.implementation} to torch's (device {device.type}"
                          f"{', optimizer.fused set' if cfg.fused is not None else ''}); use optimizer.state_dtype: "
                          "float32, or implementation: triton on a CUDA device")
    if gradient_copies and implementation != "triton":
        raise ConfigError(f"optimizer.bf16_grads needs our Triton AdamW, which reads the gradients from the bf16 "
                          f"copies, but this run resolves optimizer.implementation={cfg.implementation} to torch's "
                          f"(device {device.type}); drop bf16_grads, or use implementation: triton on a CUDA device")
    if implementation == "triton":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"optimizer.implementation=triton needs a CUDA device (this run is on {device.type}); "
                              "use optimizer.implementation: torch (or auto)")
        return TritonAdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                           state_dtype=getattr(torch, cfg.state_dtype), weight_copies=weight_copies,
                           gradient_copies=gradient_copies)
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(
        groups,
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
        # wsd: stable until the decay starts, then linear down to min_lr, reached on the last step
        # (steps 0 .. total_steps - 1). Counting the first decay step as a step down means a decay
        # of one step, a decay_fraction that rounds to one, still ends the run at min_lr.
        decay_steps = max(1, round(cfg.decay_fraction * self.total_steps))
        decay_start = max(cfg.warmup_steps, self.total_steps - decay_steps)
        if step < decay_start:
            return lr
        progress = min(1.0, (step + 1 - decay_start) / max(1, self.total_steps - decay_start))
        return lr + (cfg.min_lr - lr) * progress

    def state_dict(self) -> dict:
        return {"type": self.cfg.type, "lr": self.lr, "total_steps": self.total_steps,
                "warmup_steps": self.cfg.warmup_steps, "min_lr": self.cfg.min_lr}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
