"""A training process for tests/trainer/test_signals.py to interrupt:

    python -m tests.trainer.signal_worker sigterm RUN_DIR      # trains until SIGTERM
    python -m tests.trainer.signal_worker kill_mid_save RUN_DIR

kill_mid_save checkpoints every 2 steps; the second save writes its shards, then touches
RUN_DIR/in_save and waits there (for the test's SIGKILL) before meta.json and the rename.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import src.trainer.checkpoint as checkpoint_module
from src.trainer import CheckpointConfig, Trainer
from src.utils.distributed import DistInfo

from .helpers import SyntheticLoader, make_config, tiny_model


def main(mode: str, run_dir: str) -> None:
    info = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
    if mode == "sigterm":
        cfg = make_config(run_dir, max_steps=100_000,
                          checkpoint=CheckpointConfig(every=0, save_final=False, export_hf=False))
    elif mode == "kill_mid_save":
        cfg = make_config(run_dir, max_steps=100_000,
                          checkpoint=CheckpointConfig(every=2, save_final=False, export_hf=False))
        real_save = checkpoint_module.dcp.save
        calls = {"n": 0}

        def save_then_hang(*args, **kwargs):
            real_save(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 2:
                open(os.path.join(run_dir, "in_save"), "w").close()
                time.sleep(600)

        checkpoint_module.dcp.save = save_then_hang
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    Trainer(cfg, tiny_model(), SyntheticLoader(4), None, info).fit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
