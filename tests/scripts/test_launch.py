"""scripts/run_*.sh through scripts/_launch.sh, as a user runs them: one process with a given
interpreter, the GPU-count check, and an install that fails (an offline machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(script: str, *args: str, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", f"scripts/{script}", *args], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_run_pretrain_trains_in_one_process_with_the_given_interpreter(tmp_path):
    proc = run_script(
        "run_pretrain.sh", "--set", "trainer.max_steps=3", "--set", "schedule.warmup_steps=1", "--set", "trainer.eval_every=0",
        "--set", "logging.log_every=1", "--set", f"output_dir={tmp_path}", "--set", "checkpoint.export_hf=false",
        PYTHON=sys.executable, CONFIG="configs/train/pretrain_cpu.yaml", NUM_GPUS="0",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[run_pretrain] config configs/train/pretrain_cpu.yaml | GPUs per node 0" in proc.stdout
    with open(tmp_path / "pretrain_cpu" / "metrics.jsonl") as f:
        steps = [row["step"] for row in map(json.loads, f) if "train/loss" in row]
    assert steps == [1, 2, 3]


def test_more_gpus_than_the_machine_has_is_refused_before_anything_starts(tmp_path):
    import torch

    have = torch.cuda.device_count()
    proc = run_script("run_sft.sh", "--set", f"output_dir={tmp_path}", PYTHON=sys.executable, NUM_GPUS=str(have + 1))
    assert proc.returncode == 2
    assert f"NUM_GPUS={have + 1} but this machine has {have} GPU(s)" in proc.stderr
    if have == 0:  # the way to several CPU processes is named
        assert "torch.distributed.run --standalone --nproc_per_node=N -m src.train_sft" in proc.stderr
        assert "--set parallel.strategy=ddp --set trainer.micro_batch_size=2" in proc.stderr
    assert not any(tmp_path.iterdir())  # no run directory: nothing started


def test_several_nodes_without_a_gpu_is_refused_by_name(tmp_path):
    """NUM_GPUS defaults to 0 on a host without GPUs; torchrun given --nproc_per_node=0 failed with
    a bare AssertionError."""
    import pytest
    import torch

    if torch.cuda.device_count():
        pytest.skip("a host without GPUs")
    proc = run_script("run_sft.sh", "--set", f"output_dir={tmp_path}", PYTHON=sys.executable, NNODES="2")
    assert proc.returncode == 2
    assert "NNODES=2 needs NUM_GPUS >= 1 process per node; this machine has no GPU" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_a_failed_install_says_what_to_do_and_is_retried_next_time(tmp_path):
    """No package index (PIP_NO_INDEX): the install fails with a hint naming PYTHON, and leaves no
    stamp, so the next run installs again instead of starting with a half-filled virtualenv."""
    venv = tmp_path / "venv"
    proc = run_script("run_dpo.sh", "--set", f"output_dir={tmp_path}", VENV=str(venv), PIP_NO_INDEX="1",
                      PIP_FIND_LINKS=str(tmp_path / "no_wheels"))
    assert proc.returncode == 1
    assert "could not install requirements.txt" in proc.stderr and "PYTHON=/path/to/python" in proc.stderr
    assert (venv / "bin" / "python").exists() and not (venv / ".requirements.sha").exists()
    again = run_script("run_dpo.sh", "--set", f"output_dir={tmp_path}", VENV=str(venv), PIP_NO_INDEX="1",
                       PIP_FIND_LINKS=str(tmp_path / "no_wheels"))
    assert again.returncode == 1 and "installing requirements.txt" in again.stdout


def test_several_gpus_start_torchrun_with_a_long_shutdown_grace(tmp_path):
    """The torchrun line, through a stand-in interpreter that reports two GPUs and prints what it
    is started with: the ranks get 600 s after a SIGTERM to save (torchrun's own default is 30 s),
    unless TORCH_ELASTIC_SHUTDOWN_TIMEOUT is set already."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = "-c" ]; then echo 2; exit 0; fi\n'
        'echo "grace=$TORCH_ELASTIC_SHUTDOWN_TIMEOUT args=$*"\n'
    )
    fake.chmod(0o755)
    proc = run_script("run_pretrain.sh", PYTHON=str(fake), NUM_GPUS="2")
    assert proc.returncode == 0, proc.stderr
    assert "grace=600 args=-m torch.distributed.run --nnodes=1 --node_rank=0 --nproc_per_node=2" in proc.stdout
    proc = run_script("run_pretrain.sh", PYTHON=str(fake), NUM_GPUS="2", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="1200")
    assert "grace=1200 " in proc.stdout
