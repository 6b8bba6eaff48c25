"""FSDP2 over 2 and 4 CPU ranks (torchrun + gloo) against one process, with the real Trainer and
the tiny model configs (configs/model/gpt2_tiny.yaml, qwen2_tiny.yaml): the CPU half of issue 9.

- Loss curve: STEPS optimizer steps on W ranks match one process fed the same global batch
  (the concatenation of the ranks' micro-batches, as one batch) step by step, within rel 1e-4.
- Resharding: the 4-rank checkpoint at step SPLIT_AT loads on 2 ranks and in one process with
  model weights and optimizer state equal bit for bit to the 4-rank state at that step; the
  following steps, fed the batches the 4-rank run saw, match its losses within rel 1e-4 (not
  bitwise: another world size sums the gradients in another order).

Two torchrun launches in all (4 ranks, then 2 ranks resuming the 4-rank checkpoint); see
tests/trainer/multi_rank_worker.py for what each runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from src.trainer import CheckpointConfig, Trainer
from src.trainer.checkpoint import step_dir_name
from src.utils.distributed import DistInfo

from .helpers import SyntheticLoader, make_config
from .multi_rank_worker import GLOBAL_BATCH, MODEL_CONFIGS, SPLIT_AT, STEPS, build_model, train_losses

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
MODELS = list(MODEL_CONFIGS)
REL = 1e-4  # fp32: a different reduction order moves the loss by ~1e-7 relative; a wrong batch, by far more


def launch(world_size: int, out_dir, resume_root=None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
           "-m", "tests.trainer.multi_rank_worker", str(out_dir)]
    if resume_root is not None:
        cmd.append(str(resume_root))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out_dir, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("four_ranks")
    return out, launch(4, out)


@pytest.fixture(scope="module")
def two_ranks(four_ranks, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_ranks")
    return out, launch(2, out, resume_root=four_ranks[0])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Per model: the train losses of one process with the whole global batch in one micro-batch."""
    losses = {}
    for name in MODELS:
        cfg = make_config(tmp_path_factory.mktemp(name), max_steps=STEPS, micro_batch_size=GLOBAL_BATCH)
        trainer = Trainer(cfg, build_model(name), SyntheticLoader(GLOBAL_BATCH), None, CPU)
        trainer.fit()
        losses[name] = train_losses(trainer)
    return losses


def state_differences(a, b, where: str = "") -> list[str]:
    """Where two nested state dicts differ (tensors compared bit for bit, dtype included)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))} in one only"]
        return [d for k in a for d in state_differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in state_differences(x, y, f"{where}[{i}]")]
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [f"{where}: tensors differ"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def saved_state(out_dir, name: str, file: str) -> dict:
    return torch.load(os.path.join(out_dir, name, file), map_location="cpu")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("world_size", [2, 4])
def test_fsdp2_loss_curve_matches_one_process(world_size, name, four_ranks, two_ranks, one_process):
    _, results = {4: four_ranks, 2: two_ranks}[world_size]
    ranks, single = results[name]["continuous"], one_process[name]
    assert len(ranks) == len(single) == STEPS
    assert single[-1] < single[0] - 1.0  # it trains: the curve is worth comparing
    assert ranks == pytest.approx(single, rel=REL)


@pytest.mark.parametrize("name", MODELS)
def test_four_rank_checkpoint_resumes_on_two_ranks(name, four_ranks, two_ranks):
    four_out, four = four_ranks
    two_out, two = two_ranks
    at_split = saved_state(four_out, name, f"state_at_step_{SPLIT_AT}.pt")
    assert two[name]["resumed_at"] == SPLIT_AT
    assert state_differences(saved_state(two_out, name, "state_after_load.pt"), at_split) == []
    assert two[name]["resumed"] == pytest.approx(four[name]["continuous"][SPLIT_AT:], rel=REL)


@pytest.mark.parametrize("name", MODELS)
def test_four_rank_checkpoint_resumes_in_one_process(name, four_ranks, tmp_path):
    four_out, four = four_ranks
    ckpt = os.path.join(four_out, name, "continuous", "checkpoints", step_dir_name(SPLIT_AT))
    cfg = make_config(tmp_path / "one", max_steps=STEPS, micro_batch_size=GLOBAL_BATCH,
                      checkpoint=CheckpointConfig(resume=ckpt, save_final=False, export_hf=False))
    loader = SyntheticLoader(GLOBAL_BATCH)
    loader.position = SPLIT_AT  # one batch per step: where the 4 ranks were (the data order restarts otherwise)
    trainer = Trainer(cfg, build_model(name), loader, None, CPU)
    assert trainer.step == SPLIT_AT

    loaded = {"model": get_model_state_dict(trainer.model),
              "optimizer": get_optimizer_state_dict(trainer.model, trainer.optimizer)}
    at_split = saved_state(four_out, name, f"state_at_step_{SPLIT_AT}.pt")
    assert state_differences(loaded, at_split) == []
    initial = build_model(name).state_dict()
    assert any(not torch.equal(v, initial[k]) for k, v in loaded["model"].items())  # the load did something

    trainer.fit()
    assert train_losses(trainer) == pytest.approx(four[name]["continuous"][SPLIT_AT:], rel=REL)
