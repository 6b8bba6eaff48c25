"""Small helpers shared by the trainer and the entry points: seeding, RNG state, formatting, peak FLOPs."""

from __future__ import annotations

import random
import uuid
from typing import Any

import numpy as np
import torch

# Dense bf16 peak FLOP/s by device name (substring match, first hit wins). MFU divides by this;
# `logging.peak_flops` in the train config overrides it for an unlisted or differently clocked device.
PEAK_FLOPS_BF16: list[tuple[str, float]] = [
    ("H200", 989.4e12),
    ("H100", 989.4e12),  # SXM; the PCIe card is 756e12, override with logging.peak_flops
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
]


def peak_flops(device: torch.device, override: float | None = None) -> float | None:
    """Peak FLOP/s of one device for MFU; None when unknown (MFU is then not reported)."""
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_BF16:
        if key in name:
            return flops
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Every RNG the training step can touch (dropout, data shuffles), for exact resume."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def new_run_id() -> str:
    """Id of a metrics run (wandb accepts [a-z0-9]); kept in checkpoints so a resume continues it."""
    return uuid.uuid4().hex[:12]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def format_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"
