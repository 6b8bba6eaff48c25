"""Process-group setup from torchrun's environment, the device mesh, rank-0 helpers, shutdown.

One process per device. Under `torchrun` the environment holds RANK, LOCAL_RANK and WORLD_SIZE;
plain `python` is a world of one and needs no process group, unless FSDP2 or DDP is asked for
(`ensure_process_group` then makes a group of one).

    dist_info = init_distributed("auto")      # picks cuda:<local_rank> or cpu, nccl or gloo
    ...
    shutdown_distributed()

Besides the main group (NCCL on GPUs), a CPU-side gloo group carries small control decisions
(stop now? skip this step?) so that agreeing on them never waits for the GPU stream.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from src.utils.config import ConfigError


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None when no process group was created (world of one)
    control_group: Any = None  # gloo group for host-side agreement; None in a world of one

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from e


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """`auto` is cuda:<local_rank> when a GPU is visible, else the CPU; `cuda` without a GPU is an error."""
    if preference not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda but no CUDA GPU is visible; set trainer.device=auto or cpu")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "start at most one process per GPU (NUM_GPUS / --nproc_per_node)"
        )
    return torch.device("cuda", local_rank)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _init_process_group(device: torch.device, **kwargs) -> None:
    """The main group: NCCL bound to this process's GPU, or gloo on the CPU."""
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(_backend(device), **kwargs)


def init_distributed(device_preference: str = "auto", timeout_minutes: float = 30.0) -> DistInfo:
    """Create the process group described by torchrun's environment (if any) and pick the device."""
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistInfo(rank=0, local_rank=0, world_size=1, device=device, backend=None)
    backend = _backend(device)
    if not dist.is_initialized():
        _init_process_group(device, timeout=datetime.timedelta(minutes=timeout_minutes))
    control_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return DistInfo(rank, local_rank, world_size, device, backend, control_group)


def ensure_process_group(info: DistInfo) -> None:
    """A process group of this one process when there is none (plain `python`, not torchrun):
    FSDP2 and DDP need one even for a world of one, which then runs as on N ranks (DTensors,
    FSDP2's mixed precision) with nothing to communicate. Without it torch's env:// rendezvous
    fails deep inside the wrapper asking for RANK."""
    if dist.is_initialized():
        return
    if info.world_size != 1:
        raise RuntimeError(f"a world of {info.world_size} ranks without a process group: start it with torchrun")
    import socket

    with socket.socket() as sock:  # a free local port for the one-rank rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _init_process_group(info.device, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def build_device_mesh(info: DistInfo):
    """A 1-D mesh over all ranks (FSDP2 shards over it)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world_size,), mesh_dim_names=("dp",))


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier(group=info.control_group)


def _reduce_on_host(info: DistInfo, value, dtype: torch.dtype, op) -> float | int:
    """All-reduce one host-side number over the CPU gloo group: no GPU work, no GPU sync."""
    t = torch.tensor([value], dtype=dtype)
    dist.all_reduce(t, op=op, group=info.control_group)
    return t.item()


def any_rank(info: DistInfo, flag: bool) -> bool:
    """True when `flag` is true on any rank (host-side, gloo)."""
    if not info.distributed:
        return flag
    return bool(_reduce_on_host(info, 1 if flag else 0, torch.int32, dist.ReduceOp.MAX))


def min_over_ranks(info: DistInfo, value: int) -> int:
    """The smallest of each rank's `value` (host-side, gloo)."""
    if not info.distributed:
        return value
    return int(_reduce_on_host(info, value, torch.int64, dist.ReduceOp.MIN))


def sum_over_ranks(info: DistInfo, value: float) -> float:
    """The sum of each rank's host-side `value` (gloo): no GPU work, no GPU sync."""
    if not info.distributed:
        return value
    return float(_reduce_on_host(info, value, torch.float64, dist.ReduceOp.SUM))


def all_reduce_sum(info: DistInfo, tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, on the tensor's device (asynchronous with respect to the host on GPUs)."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(info: DistInfo, obj: Any, src: int = 0) -> Any:
    """Rank `src`'s Python object on every rank (through the gloo control group)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=info.control_group)
    return box[0]


def shutdown_distributed(info: DistInfo | None = None) -> None:
    """Destroy the process group after every rank got here (gloo can abort when one rank leaves early)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier(group=info.control_group if info is not None else None)
        finally:
            dist.destroy_process_group()
