"""`src.train_dpo` with `dpo.reference: precomputed` on the sample preference data (CPU, tiny Qwen2):
the same losses as the live reference, the stored log-probs reused, a stale file refused, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from src import train_dpo
from src.models.dpo import load_reference_logps
from src.utils.config import ConfigError

BASE = ["--config", "configs/train/dpo.yaml", "--set", "trainer.seq_len=128", "--set", "trainer.micro_batch_size=2",
        "--set", "data.val_fraction=0.25", "--set", "trainer.eval_every=1", "--set", "trainer.eval_batches=2",
        "--set", "logging.log_every=1", "--set", "schedule.warmup_steps=1", "--set", "checkpoint.export_hf=false"]


# Starts of a new run in a directory used before, which save no checkpoint: a new run that finds
# one sets it and metrics.jsonl aside, and these tests read the rows of every start together.
NEW_RUN_AGAIN = ("--set", "checkpoint.save_final=false")


def run(output_dir, reference, *extra, steps=2):
    return train_dpo.main(BASE + ["--set", f"output_dir={output_dir}", "--set", f"dpo.reference={reference}",
                                  "--set", f"trainer.max_steps={steps}", *extra])


def rows(run_dir, split="train"):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if any(k.startswith(f"{split}/") for k in r)]


def metrics(run_dir, split, name):
    return [r[f"{split}/{name}"] for r in rows(run_dir, split)]


def test_precomputed_reference_gives_the_live_losses(tmp_path):
    assert run(tmp_path / "live", "live") == "max_steps"
    assert run(tmp_path / "pre", "precomputed") == "max_steps"
    live, pre = tmp_path / "live" / "dpo", tmp_path / "pre" / "dpo"
    for split in ("train", "val"):
        assert os.path.isfile(pre / f"reference_logps_{split}.safetensors")
        assert not os.path.exists(live / f"reference_logps_{split}.safetensors")
    # Step 1: policy == reference, so the loss is log 2 in both runs; the rewards are exactly 0 only if
    # the stored log-probs are those of the same rows (example_ids matched through the shuffle).
    first_live, first_pre = rows(live)[0], rows(pre)[0]
    assert first_pre["train/loss"] == pytest.approx(first_live["train/loss"], rel=1e-6, abs=1e-6)
    assert first_pre["train/loss"] == pytest.approx(0.693147, abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert first_pre[f"train/{name}"] == pytest.approx(first_live[f"train/{name}"], rel=1e-5, abs=1e-5), name
    assert abs(first_pre["train/rewards/chosen"]) < 1e-4
    # Step 2 and the evaluations (after an update) agree too: the reference stayed the starting policy.
    assert metrics(pre, "train", "loss") == pytest.approx(metrics(live, "train", "loss"), rel=1e-5, abs=1e-6)
    assert metrics(pre, "val", "loss") == pytest.approx(metrics(live, "val", "loss"), rel=1e-5, abs=1e-6)
    assert len(metrics(pre, "val", "loss")) == 2
    table = load_reference_logps(pre / "reference_logps_train.safetensors")
    assert table["example_ids"].tolist() == list(range(len(table["example_ids"])))


def test_stored_logps_are_reused_and_a_stale_file_is_refused(tmp_path, capsys):
    run(tmp_path, "precomputed", *NEW_RUN_AGAIN, steps=2)
    path = tmp_path / "dpo" / "reference_logps_train.safetensors"
    assert "reference log-probs of" in capsys.readouterr().out
    # Poison the stored values: a second start must read them instead of recomputing.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, table = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({**table, "chosen": table["chosen"] + 50.0}, str(path), metadata=meta)
    run(tmp_path, "precomputed", *NEW_RUN_AGAIN, steps=2)
    assert "reusing the reference log-probs" in capsys.readouterr().out
    # At step 1 (policy == reference) ref_chosen + 50 makes every chosen reward beta * -50 = -5.
    first_steps = [r for r in rows(tmp_path / "dpo") if r["step"] == 1]
    assert [r["train/rewards/chosen"] for r in first_steps] == pytest.approx([0.0, -5.0], abs=1e-3)

    with pytest.raises(ConfigError, match=r"reference_logps_train.safetensors is stale: .*seq_len: stored 128, now 96.*"
                                          r"delete .*reference_logps_train.safetensors to recompute"):
        run(tmp_path, "precomputed", *NEW_RUN_AGAIN, "--set", "trainer.seq_len=96", steps=2)
    with pytest.raises(ConfigError, match=r"stale: .*data: stored .*overlong.*delete"):
        run(tmp_path, "precomputed", *NEW_RUN_AGAIN, "--set", "data.overlong=skip", steps=2)
    save_file(table, str(path))  # no fingerprint: not ours
    with pytest.raises(ConfigError, match="holds no reference log-prob fingerprint .*delete"):
        run(tmp_path, "precomputed", *NEW_RUN_AGAIN, steps=2)
    os.remove(path)  # the fix the message names: recomputed on the next start
    assert run(tmp_path, "precomputed", *NEW_RUN_AGAIN, steps=2) == "max_steps"
    assert torch.equal(load_reference_logps(path)["chosen"], table["chosen"])


def test_resume_continues_through_the_wrapped_loader(tmp_path):
    args = ("--set", "checkpoint.every=2", "--set", "trainer.eval_every=0")
    run(tmp_path, "precomputed", *args, steps=4)
    run_dir = tmp_path / "dpo"
    straight = metrics(run_dir, "train", "loss")
    os.remove(run_dir / "checkpoints" / "step_00000004" / "meta.json")  # as if step 4 never finished
    os.remove(run_dir / "metrics.jsonl")
    run(tmp_path, "precomputed", *args, "--resume", "auto", steps=4)
    assert metrics(run_dir, "train", "loss") == straight[2:]  # steps 3 and 4 again, identical
    # --resume PATH has no init_from; the stored file (of the original start) is still the reference.
    os.remove(run_dir / "metrics.jsonl")
    run(tmp_path, "precomputed", *args, "--resume", str(run_dir / "checkpoints" / "step_00000002"), steps=4)
    assert metrics(run_dir, "train", "loss") == straight[2:]
    for split in ("train", "val"):
        if os.path.exists(run_dir / f"reference_logps_{split}.safetensors"):
            os.remove(run_dir / f"reference_logps_{split}.safetensors")
    with pytest.raises(ConfigError, match="--resume from a checkpoint with dpo.reference: precomputed needs .*copy"):
        run(tmp_path, "precomputed", *args, "--resume", str(run_dir / "checkpoints" / "step_00000002"), steps=4)


def test_two_ranks_share_the_pass_and_match_rows_by_id(tmp_path):
    """torchrun, 2 CPU ranks (gloo), FSDP2: each rank computes half of each split, rank 0 writes the
    gathered table, which equals the one-process table; at step 1 every pair's reward is 0 on both
    ranks, so each rank looked up its own (shuffled, rank-disjoint) rows."""
    run(tmp_path / "one", "precomputed")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "src.train_dpo",
           *BASE, "--set", f"output_dir={tmp_path / 'two'}", "--set", "dpo.reference=precomputed",
           "--set", "trainer.max_steps=2", "--set", "parallel.strategy=fsdp2"]
    proc = subprocess.run(cmd, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "computed in" in proc.stdout and "over 2 rank(s)" in proc.stdout
    for split in ("train", "val"):
        one = load_reference_logps(tmp_path / "one" / "dpo" / f"reference_logps_{split}.safetensors")
        two = load_reference_logps(tmp_path / "two" / "dpo" / f"reference_logps_{split}.safetensors")
        assert two["example_ids"].tolist() == list(range(len(one["example_ids"])))
        torch.testing.assert_close(two["chosen"], one["chosen"], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(two["rejected"], one["rejected"], rtol=1e-5, atol=1e-4)
    first = rows(tmp_path / "two" / "dpo")[0]
    assert first["train/loss"] == pytest.approx(0.693147, abs=1e-5)
    assert abs(first["train/rewards/chosen"]) < 1e-4 and abs(first["train/rewards/rejected"]) < 1e-4
    assert first["train/rewards/accuracies"] == 0.0  # no pair has a positive margin yet
    assert len(metrics(tmp_path / "two" / "dpo", "val", "loss")) == 2


@pytest.mark.gpu
def test_precomputed_matches_live_in_bf16_on_gpu(tmp_path):
    """On CUDA (bf16 autocast, Triton kernels, the fused token log-prob kernel): the reference pass
    runs in the live reference's precision, so the losses agree up to bf16 rounding."""
    gpu = ["--set", "trainer.device=cuda", "--set", "kernels.cross_entropy=fused_linear",
           "--set", "kernels.rmsnorm=triton", "--set", "kernels.rope=triton", "--set", "kernels.swiglu=triton"]
    run(tmp_path / "live", "live", *gpu, steps=3)
    run(tmp_path / "pre", "precomputed", *gpu, steps=3)
    live, pre = tmp_path / "live" / "dpo", tmp_path / "pre" / "dpo"
    first = rows(pre)[0]
    assert first["train/loss"] == pytest.approx(0.693147, abs=1e-2)
    assert abs(first["train/rewards/chosen"]) < 5e-2 and abs(first["train/rewards/rejected"]) < 5e-2
    assert metrics(pre, "train", "loss") == pytest.approx(metrics(live, "train", "loss"), abs=5e-2)
    assert metrics(pre, "val", "loss") == pytest.approx(metrics(live, "val", "loss"), abs=5e-2)
    assert "train/mem_gib" in first  # metrics rows carry the split prefix


def test_live_reference_with_bf16_weight_copies_trains_like_the_casts(tmp_path, capsys):
    """optimizer.bf16_weight_copy in a DPO run with the live reference (the frozen reference's
    linears get copies too, written once: its weights never change): under bf16 autocast the run
    is bitwise the run without copies."""
    bf16 = ("--set", "trainer.precision=bf16", "--set", "trainer.residual_dtype=bf16")
    assert run(tmp_path / "casts", "live", *bf16, "--set", "optimizer.bf16_weight_copy=false", steps=3) == "max_steps"
    capsys.readouterr()
    assert run(tmp_path / "copies", "live", *bf16, "--set", "optimizer.bf16_weight_copy=true", steps=3) == "max_steps"
    assert "bf16 copies of" in capsys.readouterr().out  # the copies were on
    casts, copies = tmp_path / "casts" / "dpo", tmp_path / "copies" / "dpo"
    for name in ("loss", "rewards/margins", "logps/chosen"):
        assert metrics(copies, "train", name) == metrics(casts, "train", name), name
    assert metrics(copies, "val", "loss") == metrics(casts, "val", "loss")
    assert len(metrics(copies, "train", "loss")) == 3 and len(metrics(copies, "val", "loss")) == 3


def test_a_dpo_checkpoint_as_init_from_starts_from_its_policy(tmp_path):
    """A DPO checkpoint holds `policy.*` and `reference.*`: as another run's init_from, the policy's
    weights load (they were a deep crash in torch.distributed.checkpoint before)."""
    from src.models import AutoModelForCausalLM, load_model_config
    from src.trainer.checkpoint import list_checkpoints, load_model_weights

    run(tmp_path, "live", "--set", "checkpoint.export_hf=true", "--set", "trainer.eval_every=0", steps=2)
    run_dir = tmp_path / "dpo"
    [checkpoint] = list_checkpoints(str(run_dir / "checkpoints"))
    config = load_model_config("configs/model/qwen2_tiny.yaml")
    fresh = AutoModelForCausalLM.from_config(config)
    load_model_weights(checkpoint, fresh, config)
    exported = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf"))  # the policy, as the run exported it
    trained, loaded = exported.state_dict(), fresh.state_dict()
    assert trained.keys() == loaded.keys()
    for name in trained:
        assert torch.equal(trained[name], loaded[name]), name


def test_stored_logps_are_stale_once_the_init_from_weights_change(tmp_path):
    """The same init_from path with new weights (an SFT run redone into it) must not reuse the
    log-probs of the old weights: the fingerprint holds the files' sizes and modification times."""
    from src.models import AutoModelForCausalLM, load_model_config

    export = tmp_path / "sft_hf"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(load_model_config("configs/model/qwen2_tiny.yaml")).save_pretrained(str(export))
    start = ("--set", f"init_from={export}", "--set", "model_config_path=null", *NEW_RUN_AGAIN)
    assert run(tmp_path, "precomputed", *start, steps=2) == "max_steps"
    torch.manual_seed(1)  # the SFT run again: other weights, the same path
    AutoModelForCausalLM.from_config(load_model_config("configs/model/qwen2_tiny.yaml")).save_pretrained(str(export))
    stale = r"reference_logps_train.safetensors is stale: it was computed for another setup \(init: stored .*sft_hf"
    with pytest.raises(ConfigError, match=stale):
        run(tmp_path, "precomputed", *start, steps=2)
