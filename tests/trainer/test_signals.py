"""Interruptions: SIGTERM leaves a resumable checkpoint; SIGKILL in the middle of a checkpoint
write leaves the previous checkpoint the newest, loadable one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import torch

from src.trainer import CheckpointConfig, Trainer, list_checkpoints
from src.utils.distributed import DistInfo

from .helpers import SyntheticLoader, make_config, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def start(mode: str, run_dir) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    return subprocess.Popen([sys.executable, "-m", "tests.trainer.signal_worker", mode, str(run_dir)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the worker exited early ({proc.returncode}):\n{proc.stdout.read()[-3000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the worker")
        time.sleep(0.1)


def logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def resume(run_dir) -> Trainer:
    cfg = make_config(run_dir, max_steps=100_000, checkpoint=CheckpointConfig(resume="auto", export_hf=False))
    return Trainer(cfg, tiny_model(seed=3), SyntheticLoader(4), None, CPU)


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = start("sigterm", run_dir)
    wait_for(lambda: logged_steps(run_dir) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output[-3000:]
    assert "stopped by signal 15" in output
    saved = list_checkpoints(str(run_dir / "checkpoints"))
    assert len(saved) == 1
    meta = json.loads(open(os.path.join(saved[0], "meta.json")).read())
    assert meta["step"] >= 3
    trainer = resume(run_dir)
    assert trainer.step == meta["step"]
    assert trainer.train_loader.position == meta["step"]  # the data position came back too


def test_sigkill_mid_save_keeps_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = start("kill_mid_save", run_dir)
    wait_for(lambda: (run_dir / "in_save").exists(), proc)
    proc.kill()
    proc.communicate(timeout=30)
    ckpt_dir = run_dir / "checkpoints"
    assert [os.path.basename(p) for p in list_checkpoints(str(ckpt_dir))] == ["step_00000002"]
    assert ".tmp_step_00000004" in os.listdir(ckpt_dir)  # the half-written one, never read
    trainer = resume(run_dir)
    assert trainer.step == 2
    trainer.fit(until_step=4)
    assert sorted(os.listdir(ckpt_dir)) == ["step_00000002", "step_00000004"]  # the leftover is gone


def test_a_repeated_sigterm_still_saves_and_a_second_sigint_exits_now(tmp_path, monkeypatch):
    """Launchers send SIGTERM more than once (a scheduler signals torchrun and its workers, and
    torchrun forwards its own): the repeat must not turn the checkpointed stop into an exit without
    one. A second Ctrl-C still exits at once."""
    kills = []
    monkeypatch.setattr(os, "kill", lambda pid, signum: kills.append(signum))
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)
    cfg = make_config(tmp_path / "run", max_steps=10, checkpoint=CheckpointConfig(export_hf=False))
    trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
    trainer._on_signal(signal.SIGTERM, None)
    trainer._on_signal(signal.SIGTERM, None)
    assert trainer._signal == signal.SIGTERM and kills == []
    assert trainer._stop_reason(None, time.time()) == "signal"
    trainer._on_signal(signal.SIGINT, None)
    assert kills == [signal.SIGINT]
