"""The entry points end to end on the sample data in data/ (CPU, tiny models)."""

from __future__ import annotations

import json
import os

import pytest

from src import train_dpo, train_pretrain, train_sft
from src.utils.config import ConfigError


def rows(run_dir, prefix="train/loss"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)[prefix] for line in f if prefix in line]


def test_pretrain_loss_falls_on_the_sample_data(tmp_path):
    reason = train_pretrain.main([
        "--config", "configs/train/pretrain_cpu.yaml",
        "--set", f"output_dir={tmp_path}", "--set", "trainer.max_steps=200", "--set", "trainer.seq_len=64",
        "--set", "trainer.micro_batch_size=4", "--set", "trainer.eval_every=100", "--set", "logging.log_every=20",
        "--set", "checkpoint.every=0",
    ])
    assert reason == "max_steps"
    run_dir = tmp_path / "pretrain_cpu"
    losses = rows(run_dir)
    assert len(losses) == 10
    assert losses[-1] < losses[0] - 1.5, losses  # from ~5.5 (near uniform over 320 tokens) to well below
    val = rows(run_dir, "val/loss")
    assert len(val) == 2 and val[1] < val[0]
    assert os.path.isfile(run_dir / "hf" / "config.json")
    assert os.listdir(run_dir / "checkpoints") == ["step_00000200"]
    # The tiny model's YAML names no end token: the export carries the byte tokenizer's (256), not
    # GPT-2's 50256, which lies outside its 320-token vocabulary.
    exported = json.loads((run_dir / "hf" / "config.json").read_text())
    assert exported["eos_token_id"] == exported["bos_token_id"] == 256 and exported["vocab_size"] == 320


@pytest.mark.parametrize("module, config", [(train_sft, "sft"), (train_dpo, "dpo")])
def test_sft_and_dpo_entry_points_run(module, config, tmp_path):
    reason = module.main(["--config", f"configs/train/{config}.yaml", "--set", f"output_dir={tmp_path}",
                          "--set", "trainer.max_steps=3", "--set", "trainer.eval_every=0", "--set", "logging.log_every=1",
                          "--set", "schedule.warmup_steps=1", "--set", "checkpoint.export_hf=false"])
    assert reason == "max_steps"
    assert len(rows(tmp_path / config)) == 3
    if config == "dpo":
        assert len(rows(tmp_path / config, "train/rewards/accuracies")) == 3


def test_bad_data_path_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match="data.path 'data/nope.jsonl' does not exist"):
        train_pretrain.main(["--config", "configs/train/pretrain_cpu.yaml", "--set", f"output_dir={tmp_path}",
                             "--set", "data.path=data/nope.jsonl"])
    assert not os.listdir(tmp_path)


def test_unknown_key_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'max_steps'"):
        train_pretrain.main(["--config", "configs/train/pretrain_cpu.yaml", "--set", "trainer.maxsteps=3"])


def test_a_missing_config_file_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"--config '.*nope.yaml': no such file .*configs/train/pretrain.yaml"):
        train_pretrain.main(["--config", str(tmp_path / "nope.yaml")])


def test_resume_path_is_taken_as_typed(tmp_path):
    """--resume is a path, not YAML: ' #' would start a comment and ': ' a mapping."""
    from src.trainer.launch import config_from_args, parse_args

    path = str(tmp_path / "run #2" / "checkpoints: old" / "step_00000005")
    args = parse_args("pretrain", ["--config", "configs/train/pretrain_cpu.yaml", "--resume", path])
    assert config_from_args("pretrain", args).checkpoint.resume == path


def test_resume_flag_continues_the_run(tmp_path):
    args = ["--config", "configs/train/pretrain_cpu.yaml", "--set", f"output_dir={tmp_path}", "--set",
            "trainer.max_steps=6", "--set", "trainer.seq_len=32", "--set", "trainer.micro_batch_size=2",
            "--set", "trainer.eval_every=0", "--set", "checkpoint.every=3", "--set", "logging.log_every=1",
            "--set", "schedule.warmup_steps=1", "--set", "checkpoint.export_hf=false"]
    train_pretrain.main(args)
    straight = rows(tmp_path / "pretrain_cpu")
    os.remove(tmp_path / "pretrain_cpu" / "checkpoints" / "step_00000006" / "meta.json")  # as if step 6 never finished
    os.remove(tmp_path / "pretrain_cpu" / "metrics.jsonl")
    train_pretrain.main(args + ["--resume", "auto"])
    assert rows(tmp_path / "pretrain_cpu") == straight[3:]  # steps 4..6 again, identical (data position restored)


@pytest.mark.parametrize("task", ["pretrain", "sft", "dpo"])
def test_a_config_mistake_on_the_command_line_is_one_line_not_a_traceback(task, tmp_path):
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = "configs/train/pretrain_cpu.yaml" if task == "pretrain" else f"configs/train/{task}.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", f"src.train_{task}", "--config", config, "--set", f"output_dir={tmp_path}",
         "--set", "trainer.max_steps=2", "--set", "schedule.warmup_steps=5"],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"python -m src.train_{task}: error: " in proc.stderr
    assert "schedule.warmup_steps (5) must be below trainer.max_steps (2)" in proc.stderr
    assert not os.listdir(tmp_path)  # nothing was started


def test_unusable_data_on_the_command_line_is_one_line_not_a_traceback(tmp_path):
    """A DataError (here: every row of the file fails, no 'text' field) is the user's input, like a
    config mistake: one line naming it, exit status 2."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"body": "no text field here"}\n' * 3)
    proc = subprocess.run(
        [sys.executable, "-m", "src.train_pretrain", "--config", "configs/train/pretrain_cpu.yaml",
         "--set", f"output_dir={tmp_path / 'out'}", "--set", f"data.path={rows}", "--set", "trainer.max_steps=50"],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "python -m src.train_pretrain: error: " in proc.stderr and "rows.jsonl" in proc.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resume", "{tmp}/no_such_checkpoint"], "does not exist; give a step_* directory or --resume auto"),
        (["--set", "kernels.attention=flash_attn"], "kernels.attention: 'flash_attn' needs flash-attn"),
        (["--set", "trainer.device=cuda"], "trainer.device=cuda but no CUDA GPU is visible"),
    ],
    ids=["missing resume path", "flash-attn not installed", "cuda without a GPU"],
)
def test_checkpoint_kernel_and_device_mistakes_are_one_line(args, message, tmp_path):
    """Beside config and data mistakes: an unusable --resume path (a CheckpointError), a kernel this
    machine cannot run (refused when the config loads, not in the first forward) and a device it
    lacks end with one `error:` line and exit status 2."""
    import subprocess
    import sys

    import torch

    from src.models.components.attention.flash import fa2_installed, fa3_installed

    if "flash_attn" in args[-1] and (fa2_installed() or fa3_installed()):
        pytest.skip("flash-attn is installed here")
    if "device=cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "src.train_pretrain", "--config", "configs/train/pretrain_cpu.yaml",
         "--set", f"output_dir={tmp_path / 'out'}", "--set", "trainer.max_steps=2", "--set", "schedule.warmup_steps=0",
         *args],
        cwd=repo, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "python -m src.train_pretrain: error: " in proc.stderr and message in proc.stderr, proc.stderr[-1500:]
