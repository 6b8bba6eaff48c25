"""The Trainer in one process on the CPU: accumulation, exact resume, non-finite steps, evaluation,
checkpoint rotation and the Hugging Face export."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time

import pytest
import torch

from src.trainer import CheckpointConfig, Trainer, list_checkpoints
from src.trainer.checkpoint import CheckpointError, step_dir_name
from src.trainer.config import LoggingConfig
from src.utils.config import ConfigError
from src.utils.distributed import DistInfo

from .helpers import SyntheticLoader, make_config, params, replace, tiny_model, train_losses, with_optimizer

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)


def capture_grads(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """The clipped gradients of every optimizer step. (Parameters are a poor witness: the key bias
    has a zero gradient in exact arithmetic, and Adam blows its rounding noise up to lr-sized steps.)"""
    names = {id(p): n for n, p in trainer.bare.named_parameters()}
    steps = []

    def hook(optimizer, args, kwargs):
        steps.append({names[id(p)]: p.grad.clone() for g in optimizer.param_groups for p in g["params"]})

    trainer.optimizer.register_step_pre_hook(hook)
    return steps


def assert_same_grads(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) > 0
    for step_a, step_b in zip(a, b):
        for name, grad in step_b.items():
            torch.testing.assert_close(step_a[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_accumulation_equals_one_large_batch(tmp_path):
    """4 micro-batches of 2 (with different numbers of supervised tokens) == one batch of 8."""
    big = Trainer(make_config(tmp_path / "big", max_steps=3, micro_batch_size=8), tiny_model(),
                  SyntheticLoader(8), None, CPU)
    big_grads = capture_grads(big)
    big.fit()
    accum = Trainer(make_config(tmp_path / "accum", max_steps=3, micro_batch_size=2, grad_accum_steps=4),
                    tiny_model(), SyntheticLoader(2), None, CPU)
    accum_grads = capture_grads(accum)
    accum.fit()
    assert train_losses(accum) == pytest.approx(train_losses(big), rel=1e-5)
    assert_same_grads(accum_grads, big_grads)
    # the supervised-token counts really differ between micro-batches, or the test proves nothing
    loader = SyntheticLoader(2)
    counts = {int((loader.batch(b)["labels"] != -100).sum()) for b in range(4)}
    assert len(counts) > 1


def test_cuda_graph_mode_accumulates_into_persistent_gradient_buffers(tmp_path):
    """With CUDA graphs and accumulation the trainer allocates .grad once and zeroes it after each
    step (a graph's output must not become .grad: the next replay overwrites it). On the CPU
    Inductor runs no graphs, but the gradients and losses must still be those of one large batch."""
    big = Trainer(make_config(tmp_path / "big", max_steps=3, micro_batch_size=8), tiny_model(),
                  SyntheticLoader(8), None, CPU)
    big_grads = capture_grads(big)
    big.fit()
    torch._dynamo.reset()
    cfg = replace(make_config(tmp_path / "graphs", max_steps=3, micro_batch_size=2, grad_accum_steps=4),
                  compile=True, compile_mode="reduce-overhead")
    accum = Trainer(cfg, tiny_model(), SyntheticLoader(2), None, CPU)
    assert accum.persistent_grads
    buffers = {n: p.grad for n, p in accum.bare.named_parameters()}
    assert all(g is not None and not g.any() for g in buffers.values())
    accum_grads = capture_grads(accum)
    accum.fit()
    assert train_losses(accum) == pytest.approx(train_losses(big), rel=1e-4)
    assert_same_grads(accum_grads, big_grads)
    for name, p in accum.bare.named_parameters():  # the same buffers, zeroed after the last step
        assert p.grad is buffers[name] and not p.grad.any(), name


def test_resume_with_persistent_gradient_buffers_restores_the_optimizer_state(tmp_path):
    """The CUDA-graph mode with accumulation gives every parameter a .grad before the checkpoint
    loads, which made torch's state-dict helpers skip creating the AdamW state: the resume went on
    with empty moments. The load must restore them exactly and leave the buffers in place, zeroed.
    (The saving run needs no compile: compiling does not change the parameter names.)"""
    cfg = make_config(tmp_path / "run", max_steps=4, micro_batch_size=2, grad_accum_steps=2)
    first = Trainer(cfg, tiny_model(), SyntheticLoader(2), None, CPU)
    first.fit(until_step=2)
    resumed = replace(cfg, compile=True, compile_mode="reduce-overhead",
                      checkpoint=CheckpointConfig(resume="auto", save_final=False, export_hf=False))
    second = Trainer(resumed, tiny_model(seed=123), SyntheticLoader(2), None, CPU)
    assert second.persistent_grads and second.step == 2
    saved = {name: first.optimizer.state[p] for name, p in first.bare.named_parameters()}
    for name, p in second.bare.named_parameters():
        state = second.optimizer.state[p]
        assert set(state) == set(saved[name]) == {"step", "exp_avg", "exp_avg_sq"}, name
        assert all(torch.equal(state[k], v) for k, v in saved[name].items()), name
        assert p.grad is not None and not p.grad.any(), name


@pytest.mark.parametrize("implementation,state_dtype", [("torch", "float32"), ("triton", "float32"),
                                                        ("triton", "bfloat16")])
def test_exact_resume_is_bitwise(tmp_path, implementation, state_dtype):
    """bf16 moments too: their stochastic rounding draws its bits from the step count, so the
    resumed steps round as the straight run's did."""
    def config(name):
        return with_optimizer(make_config(tmp_path / name, max_steps=6, grad_accum_steps=2),
                              implementation=implementation, state_dtype=state_dtype)

    straight = Trainer(config("straight"), tiny_model(), SyntheticLoader(4), None, CPU)
    assert straight.fit() == "max_steps"

    cfg = config("split")
    first = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
    assert first.fit(until_step=4) == "until_step"
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "split" / "checkpoints"))] == ["step_00000004"]
    resumed_cfg = replace(cfg, checkpoint=CheckpointConfig(resume="auto", save_final=False, export_hf=False))
    # A different init seed: everything must come from the checkpoint.
    second = Trainer(resumed_cfg, tiny_model(seed=123), SyntheticLoader(4), None, CPU)
    assert second.step == 4 and second.run_id == first.run_id
    second.fit()
    assert train_losses(first) + train_losses(second) == train_losses(straight)
    for name, p in params(straight).items():
        assert torch.equal(params(second)[name], p), name
    exp_avg = lambda t: [s["exp_avg"] for s in t.optimizer.state.values()]  # noqa: E731
    for a, b in zip(exp_avg(second), exp_avg(straight)):
        assert a.dtype == getattr(torch, state_dtype) and torch.equal(a, b)


def test_nonfinite_steps_are_skipped_then_stop_with_a_checkpoint(tmp_path):
    model = tiny_model()
    forward = model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # the loss becomes NaN from the 3rd step on
        calls["n"] += 1
        out = forward(*args, **kwargs)
        if calls["n"] > 2:
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    cfg = make_config(tmp_path / "nan", max_steps=20, max_nonfinite_steps=3)
    trainer = Trainer(cfg, model, SyntheticLoader(4), None, CPU)
    with pytest.raises(FloatingPointError, match="3 steps in a row had a NaN/Inf"):
        trainer.fit()
    assert trainer.step == 5 and int(trainer.skipped) == 3
    rows = [r for r in trainer.history if r["split"] == "train"]
    assert math.isnan(rows[-1]["loss"]) and rows[-1]["skipped_steps"] == 3
    saved = list_checkpoints(str(tmp_path / "nan" / "checkpoints"))
    assert [os.path.basename(p) for p in saved] == ["step_00000005"]
    for p in trainer.bare.parameters():
        assert torch.isfinite(p).all()


def test_a_nonfinite_streak_between_two_logs_stops_the_run(tmp_path):
    """Steps 1-4 non-finite, the rest fine, a log every 10 steps: the streak of 4 (limit 3) ended
    before the log, which must stop the training all the same."""
    model = tiny_model()
    forward = model.forward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = forward(*args, **kwargs)
        if calls["n"] <= 4:
            out.loss = out.loss * float("nan")
        return out

    model.forward = poisoned
    cfg = replace(make_config(tmp_path / "nan", max_steps=20, max_nonfinite_steps=3),
                  logging=LoggingConfig(log_every=10))
    trainer = Trainer(cfg, model, SyntheticLoader(4), None, CPU)
    with pytest.raises(FloatingPointError, match="4 steps in a row had a NaN/Inf"):
        trainer.fit()
    assert trainer.step == 10 and int(trainer.skipped) == 4


def test_a_time_budget_stop_saves_a_checkpoint_even_without_save_final(tmp_path):
    """trainer.max_time_minutes is a pause, like a signal: checkpoint.save_final (false here) does
    not apply, or the work since the last checkpoint would be lost."""
    cfg = make_config(tmp_path / "time", max_steps=1000, max_time_minutes=1e-9)
    assert not cfg.checkpoint.save_final
    trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
    assert trainer.fit() == "max_time"
    saved = list_checkpoints(str(tmp_path / "time" / "checkpoints"))
    assert [os.path.basename(p) for p in saved] == [step_dir_name(trainer.step)]


@pytest.mark.parametrize("implementation", ["torch", "triton"])
def test_nonfinite_step_leaves_weights_unchanged(tmp_path, implementation):
    model = tiny_model()
    forward = model.forward
    state = {"poison": False}

    def maybe_poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if state["poison"]:
            out.loss = out.loss * float("inf")
        return out

    model.forward = maybe_poisoned
    cfg = with_optimizer(make_config(tmp_path / "inf", max_steps=4), implementation=implementation)
    trainer = Trainer(cfg, model, SyntheticLoader(4), None, CPU)
    loader = SyntheticLoader(4)
    trainer.train_step([loader.batch(0)])
    before = params(trainer)
    adam_step = [s["step"].clone() for s in trainer.optimizer.state.values()]
    state["poison"] = True
    _, grad_norm, applied = trainer.train_step([loader.batch(1)])
    assert not bool(applied) and not torch.isfinite(grad_norm)
    for name, p in before.items():
        assert torch.equal(params(trainer)[name], p), name
    assert [s["step"] for s in trainer.optimizer.state.values()] == adam_step


def test_triton_adamw_trains_like_torch_adamw_with_clipping(tmp_path):
    """optimizer.implementation: triton applies the clip coefficient inside its update instead of
    clipping the gradients first; with a threshold low enough to clip every step, the losses and
    weights are those of torch's AdamW after clip_grad_norm_."""
    runs = {}
    for implementation in ("torch", "triton"):
        cfg = with_optimizer(make_config(tmp_path / implementation, max_steps=5), implementation=implementation,
                             grad_clip=0.05)
        trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
        assert trainer.scales_grads == (implementation == "triton")
        trainer.fit()
        runs[implementation] = trainer
    assert all(r["grad_norm"] > 0.05 for r in runs["triton"].history if r["split"] == "train")  # clipping was on
    assert train_losses(runs["triton"]) == pytest.approx(train_losses(runs["torch"]), rel=1e-5)
    for name, p in params(runs["torch"]).items():
        torch.testing.assert_close(params(runs["triton"])[name], p, rtol=1e-4, atol=1e-6, msg=name)


def test_evaluation_logs_and_files(tmp_path):
    cfg = make_config(tmp_path / "run", max_steps=4, eval_every=2, eval_batches=2,
                      checkpoint=CheckpointConfig(every=1, keep_last=2, export_hf=True))
    trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), SyntheticLoader(4, seed=7, num_batches=5), CPU)
    assert trainer.fit() == "max_steps"
    val = [r for r in trainer.history if r["split"] == "val"]
    assert [r["step"] for r in val] == [2, 4] and all(r["batches"] == 2 for r in val)
    assert val[1]["loss"] < val[0]["loss"]
    # keep_last=2 rotation, no temporary directories left
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(ckpt_dir)) == ["step_00000003", "step_00000004"]
    meta = json.loads((ckpt_dir / "step_00000004" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["tokens"] == 4 * 4 * 16 and meta["run_id"] == trainer.run_id
    assert meta["model_config"]["n_embd"] == 32 and meta["config"]["trainer"]["max_steps"] == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(rows[0])
    assert any("val/loss" in r for r in rows)
    # the export loads in transformers and gives our logits
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "run" / "hf"))
    ids = SyntheticLoader(2).batch(0)["input_ids"]
    trainer.bare.eval()
    with torch.no_grad():
        ours = trainer.bare(ids, return_logits=True).logits
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_resume_from_another_model_shape_is_a_clear_error(tmp_path):
    cfg = make_config(tmp_path / "shape", max_steps=2)
    Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU).fit(until_step=1)
    resumed = replace(cfg, checkpoint=CheckpointConfig(resume="auto"))
    with pytest.raises(CheckpointError, match=r"another model.*n_embd: checkpoint 32 vs config 48"):
        Trainer(resumed, tiny_model(n_embd=48), SyntheticLoader(4), None, CPU)


def test_resume_from_a_missing_or_incomplete_path_is_a_clear_error(tmp_path):
    cfg = make_config(tmp_path / "x", max_steps=2)
    with pytest.raises(CheckpointError, match="does not exist"):
        Trainer(replace(cfg, checkpoint=CheckpointConfig(resume=str(tmp_path / "nope"))), tiny_model(),
                SyntheticLoader(4), None, CPU)
    (tmp_path / "half").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        Trainer(replace(cfg, checkpoint=CheckpointConfig(resume=str(tmp_path / "half"))), tiny_model(),
                SyntheticLoader(4), None, CPU)


def test_checkpoints_carry_the_gemm_picks_into_the_resumed_run(tmp_path, capsys):
    """Each rank's file holds the GEMM kernels its process picked by timing (`kernels.linear: tuned`,
    cuBLASLt's algorithms); a resume hands them to the kernels, and unreadable ones are a logged skip
    (the GEMMs are timed again), not a failed resume."""
    from kernels import cublaslt, tuned_mm
    from src.trainer.checkpoint import rank_file_name

    cfg = make_config(tmp_path / "picks", max_steps=2, checkpoint=CheckpointConfig(every=1, save_final=False,
                                                                                   export_hf=False))
    Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU).fit(until_step=1)
    rank_file = os.path.join(list_checkpoints(str(tmp_path / "picks" / "checkpoints"))[-1], rank_file_name(0))
    state = torch.load(rank_file, weights_only=False)
    assert state["gemm_picks"]["format"] == 1  # the CPU times nothing: no picks, but the slot is there
    state["gemm_picks"]["tuned_mm"] = {"(8, 4)|(4, 1)|key of the saved run": "cublaslt"}
    torch.save(state, rank_file)
    saved_before = dict(tuned_mm._saved)
    try:
        resumed = replace(cfg, checkpoint=CheckpointConfig(resume="auto", save_final=False, export_hf=False))
        Trainer(resumed, tiny_model(), SyntheticLoader(4), None, CPU)
        assert tuned_mm._saved["(8, 4)|(4, 1)|key of the saved run"] == "cublaslt"

        state["gemm_picks"] = {"format": 0}
        torch.save(state, rank_file)
        trainer = Trainer(resumed, tiny_model(), SyntheticLoader(4), None, CPU)
        assert "the GEMM picks are not usable (GEMM picks of format 0, expected 1 " in capsys.readouterr().out
        assert trainer.step == 1 and trainer.fit() == "max_steps"
    finally:
        tuned_mm._saved.clear()
        tuned_mm._saved.update(saved_before)
        assert not cublaslt._saved_algos


def test_a_new_run_sets_an_earlier_runs_checkpoints_and_metrics_aside(tmp_path, capsys):
    """Without a resume, the new run's checkpoints would be ranked with the earlier run's (rotation
    deleting the new ones, --resume auto picking the old) and its rows appended to theirs: the
    earlier run's checkpoints and metrics.jsonl move to checkpoints/superseded/, kept, and the new
    run starts clean."""
    cfg = make_config(tmp_path / "run", max_steps=4, checkpoint=CheckpointConfig(every=1, keep_last=1,
                                                                               export_hf=False))
    Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU).fit(until_step=3)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    capsys.readouterr()
    again = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
    assert again.step == 0
    [aside] = os.listdir(ckpt_dir / "superseded")
    assert aside.endswith("_before_a_new_run")
    assert sorted(os.listdir(ckpt_dir / "superseded" / aside)) == ["metrics.jsonl", "step_00000003"]
    assert "moved step_00000003, metrics.jsonl to" in capsys.readouterr().out
    again.fit(until_step=1)
    assert [os.path.basename(p) for p in list_checkpoints(str(ckpt_dir))] == ["step_00000001"]
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1]  # the new run's rows only


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    """A resume from step 1 of a run that reached step 3: steps 2 and 3 belong to the abandoned line
    of training. They move to checkpoints/superseded/<a new folder per resume>, kept, and neither
    rotation nor --resume auto sees them."""
    def ck(**kw):
        return CheckpointConfig(every=1, keep_last=3, save_final=False, export_hf=False, **kw)

    cfg = make_config(tmp_path / "run", max_steps=6, checkpoint=ck())
    ckpt_dir = tmp_path / "run" / "checkpoints"
    names = lambda: [os.path.basename(p) for p in list_checkpoints(str(ckpt_dir))]  # noqa: E731
    Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU).fit(until_step=3)
    from_step_1 = replace(cfg, checkpoint=ck(resume=str(ckpt_dir / "step_00000001")))
    capsys.readouterr()
    branch = Trainer(from_step_1, tiny_model(), SyntheticLoader(4), None, CPU)
    out = capsys.readouterr().out
    assert re.search(r"is older than this run's newest checkpoint: moved step_00000002, step_00000003 to "
                     + re.escape(str(ckpt_dir / "superseded")), out), out
    assert names() == ["step_00000001"]
    [aside] = os.listdir(ckpt_dir / "superseded")
    assert sorted(os.listdir(ckpt_dir / "superseded" / aside)) == ["step_00000002", "step_00000003"]
    branch.fit(until_step=2)
    assert names() == ["step_00000001", "step_00000002"]
    # once more from step 1: the new step 2 goes to a folder of its own, nothing set aside is replaced
    Trainer(from_step_1, tiny_model(), SyntheticLoader(4), None, CPU)
    assert names() == ["step_00000001"] and len(os.listdir(ckpt_dir / "superseded")) == 2
    assert Trainer(replace(cfg, checkpoint=ck(resume="auto")), tiny_model(), SyntheticLoader(4), None, CPU).step == 1


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    """A checkpoint of a later step (here one copied in by hand) outranks the new ones by step;
    keep_last=1 must still keep the one just written."""
    cfg = make_config(tmp_path / "run", max_steps=2,
                      checkpoint=CheckpointConfig(every=1, keep_last=1, save_final=False, export_hf=False))
    trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
    later = tmp_path / "run" / "checkpoints" / "step_00000099"
    later.mkdir(parents=True)
    (later / "meta.json").write_text("{}")
    trainer.fit()
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "run" / "checkpoints"))] == ["step_00000002"]


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    cfg = make_config(tmp_path / "fresh", max_steps=2)
    trainer = Trainer(replace(cfg, checkpoint=CheckpointConfig(resume="auto", export_hf=False)), tiny_model(),
                      SyntheticLoader(4), None, CPU)
    assert trainer.step == 0
    assert trainer.fit() == "max_steps" and trainer.step == 2


def test_token_budget_sets_the_schedule_length(tmp_path):
    cfg = make_config(tmp_path / "tok", max_steps=None, max_tokens=3 * 4 * 16 + 1)
    trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
    assert trainer.total_steps == 4
    assert trainer.fit() == "max_tokens" and trainer.tokens == 4 * 4 * 16


def test_token_budget_after_a_resume_with_fewer_tokens_per_step(tmp_path):
    """A checkpoint of 64-token steps resumed with 32-token steps (a smaller batch, or fewer ranks):
    the steps left come from the tokens left, so the run ends at max_tokens, not beyond it."""
    first = Trainer(make_config(tmp_path / "run", max_steps=None, max_tokens=640, micro_batch_size=4), tiny_model(),
                    SyntheticLoader(4), None, CPU)
    first.fit(until_step=5)
    assert first.tokens == 320
    resumed = make_config(tmp_path / "run", max_steps=None, max_tokens=640, micro_batch_size=2,
                          checkpoint=CheckpointConfig(resume="auto", save_final=False, export_hf=False))
    second = Trainer(resumed, tiny_model(), SyntheticLoader(2), None, CPU)
    assert second.total_steps == 5 + 320 // 32
    assert second.fit() == "max_tokens" and second.tokens == 640


def test_evaluation_and_checkpoint_time_is_left_out_of_tokens_per_s(tmp_path, monkeypatch):
    """Each evaluation and checkpoint here takes an hour of a clock that only they advance: the
    logging windows around them must still measure the training steps alone (tokens/s, ETA)."""
    real_perf_counter, hours = time.perf_counter, {"n": 0}
    monkeypatch.setattr(time, "perf_counter", lambda: real_perf_counter() + 3600.0 * hours["n"])
    cfg = make_config(tmp_path / "run", max_steps=6, eval_every=2, eval_batches=1,
                      checkpoint=CheckpointConfig(every=3, save_final=False, export_hf=False))
    cfg = replace(cfg, logging=LoggingConfig(log_every=2))
    trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), SyntheticLoader(4, seed=1, num_batches=1), CPU)
    for name in ("evaluate", "save_checkpoint"):
        def an_hour_long(work=getattr(trainer, name)):
            hours["n"] += 1
            return work()

        monkeypatch.setattr(trainer, name, an_hour_long)
    trainer.fit()
    assert hours["n"] == 5  # evaluations at steps 2, 4, 6, checkpoints at 3, 6
    rows = [r for r in trainer.history if r["split"] == "train"]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for row in rows:  # 2 steps of 64 tokens in under 10 minutes
        assert row["tokens_per_s"] > 128 / 600 and row["eta_s"] < 600, row


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(mode, tmp_path):
    plain = Trainer(make_config(tmp_path / "plain", max_steps=2), tiny_model(), SyntheticLoader(4), None, CPU)
    ac = Trainer(make_config(tmp_path / mode, max_steps=2, activation_checkpointing=mode), tiny_model(),
                 SyntheticLoader(4), None, CPU)
    assert set(ac.bare.state_dict()) == set(plain.bare.state_dict())  # parameter names unchanged
    grads = [capture_grads(t) for t in (plain, ac)]
    for trainer in (plain, ac):
        trainer.fit()
    assert train_losses(ac) == pytest.approx(train_losses(plain), rel=1e-6)
    assert_same_grads(grads[1], grads[0])


def test_selective_checkpointing_recomputes_no_matmul_and_no_attention():
    """What selective checkpointing keeps: the matmuls' and attention's outputs, so its backward
    runs the same matmuls as a backward without checkpointing (the gradients' own) and no attention
    forward (on the CPU SDPA was recomputed: its CPU op was missing from the list)."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from src.trainer.parallelize import apply_activation_checkpointing

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if "attention" in name or name in ("aten.mm.default", "aten.addmm.default"):
                self.seen[name] += 1
            return func(*args, **(kwargs or {}))

    ids = torch.randint(0, 61, (2, 16))
    in_backward = {}
    for mode in ("none", "selective"):
        model = tiny_model()
        apply_activation_checkpointing(model, mode)
        loss = model(input_ids=ids, labels=ids).loss
        with Ops() as ops:
            loss.backward()
        in_backward[mode] = ops.seen
    assert in_backward["selective"] == in_backward["none"]
    assert not any("attention" in name and "backward" not in name for name in in_backward["selective"])


def test_activation_checkpointing_on_the_first_layers_only(tmp_path):
    """activation_checkpointing_layers=1: the first block is checkpointed, the others are not, and
    the gradients are those without checkpointing; more layers than blocks is an error that says
    how many there are."""
    plain = Trainer(make_config(tmp_path / "plain", max_steps=2), tiny_model(), SyntheticLoader(4), None, CPU)
    cfg = make_config(tmp_path / "one", max_steps=2, activation_checkpointing="selective",
                      activation_checkpointing_layers=1)
    ac = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
    checkpointed = [hasattr(block.forward, "__wrapped__") for block in ac.bare.layers]
    assert checkpointed[0] and not any(checkpointed[1:]) and len(checkpointed) > 1
    grads = [capture_grads(t) for t in (plain, ac)]
    for trainer in (plain, ac):
        trainer.fit()
    assert train_losses(ac) == pytest.approx(train_losses(plain), rel=1e-6)
    assert_same_grads(grads[1], grads[0])

    n = len(checkpointed)
    too_many = make_config(tmp_path / "many", max_steps=2, activation_checkpointing="full",
                           activation_checkpointing_layers=n + 1)
    with pytest.raises(ValueError, match=rf"activation_checkpointing_layers={n + 1}, but the model has {n} "
                                         rf"trainable blocks; set at most {n}"):
        Trainer(too_many, tiny_model(), SyntheticLoader(4), None, CPU)


@pytest.mark.parametrize("gc_every", [0, 3])
def test_garbage_collection_is_scheduled_during_fit_and_restored_after(gc_every, tmp_path, monkeypatch):
    import gc

    cfg = make_config(tmp_path / f"gc{gc_every}", max_steps=7, gc_every=gc_every)
    trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
    enabled_during, young_collections = [], []
    real_collect, real_train_step = gc.collect, trainer.train_step

    def train_step(batches):
        enabled_during.append(gc.isenabled())
        return real_train_step(batches)

    def collect(generation=2):
        if generation == 1:
            young_collections.append(trainer.step)
        return real_collect(generation)

    monkeypatch.setattr(trainer, "train_step", train_step)
    monkeypatch.setattr(gc, "collect", collect)
    assert gc.isenabled()
    trainer.fit()
    assert gc.isenabled()  # restored for the caller
    if gc_every:
        assert enabled_during == [False] * 7 and young_collections == [3, 6]
    else:
        assert enabled_during == [True] * 7 and young_collections == []


def test_negative_gc_every_is_a_clear_error(tmp_path):
    from src.utils.config import ConfigError

    with pytest.raises(ConfigError, match="gc_every"):
        make_config(tmp_path / "bad", gc_every=-1)


def test_activation_memory_budget_recomputes_without_changing_the_math(tmp_path):
    """A compiled run under a memory budget (the partitioner recomputes some block activations in
    backward) trains exactly like the unconstrained compiled run; the budget is restored to the
    process default by the next plain compile."""
    import torch._functorch.config as functorch_config

    losses = {}
    for budget in (1.0, 0.3):
        torch._dynamo.reset()
        base = make_config(tmp_path / f"budget{budget}", max_steps=3)
        cfg = replace(base, compile=True, trainer=dataclasses.replace(base.trainer, activation_memory_budget=budget))
        trainer = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
        assert functorch_config.activation_memory_budget == budget
        trainer.fit()
        losses[budget] = train_losses(trainer)
    assert losses[0.3] == pytest.approx(losses[1.0], rel=1e-5)
    torch._dynamo.reset()
    Trainer(replace(make_config(tmp_path / "plain", max_steps=1), compile=True), tiny_model(), SyntheticLoader(4), None, CPU)
    assert functorch_config.activation_memory_budget == 1.0


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_compile_scopes_train_like_eager(scope, tmp_path):
    """Compiling each block or the whole forward as one graph changes neither the parameter names
    (checkpoints stay interchangeable) nor the math."""
    torch._dynamo.reset()
    eager = Trainer(make_config(tmp_path / "eager", max_steps=3), tiny_model(), SyntheticLoader(4), None, CPU)
    cfg = replace(make_config(tmp_path / scope, max_steps=3), compile=True, compile_scope=scope)
    compiled = Trainer(cfg, tiny_model(), SyntheticLoader(4), None, CPU)
    assert set(compiled.bare.state_dict()) == set(eager.bare.state_dict())
    for trainer in (eager, compiled):
        trainer.fit()
    assert train_losses(compiled) == pytest.approx(train_losses(eager), rel=1e-5)
    if scope == "model":  # one graph: the forward itself is compiled, the blocks are not
        assert compiled.bare._compiled_call_impl is not None
        assert all(block._compiled_call_impl is None for block in compiled.bare.layers)



@pytest.mark.parametrize("loss_head", ["auto", "always"])
def test_the_in_place_triton_loss_head_is_compiled_only_when_asked(loss_head, tmp_path):
    """compile_scope: model with `cross_entropy: triton`: by default the head (whose backward writes
    the gradient over the logits) runs eagerly outside the graph; `compile_loss_head: always` puts it
    in the one graph. Either way the losses are the eager run's."""
    from src.models import KernelConfig

    kernels = KernelConfig.reference().replace(cross_entropy="triton")
    torch._dynamo.reset()
    eager = Trainer(make_config(tmp_path / "eager", max_steps=3), tiny_model(kernels=kernels), SyntheticLoader(4), None, CPU)
    cfg = replace(make_config(tmp_path / loss_head, max_steps=3), compile=True, compile_scope="model",
                  compile_loss_head=loss_head)
    compiled = Trainer(cfg, tiny_model(kernels=kernels), SyntheticLoader(4), None, CPU)
    assert ("lm_output" in vars(compiled.bare)) == (loss_head == "auto")  # the eager head: a compiler.disable wrapper
    for trainer in (eager, compiled):
        trainer.fit()
    assert train_losses(compiled) == pytest.approx(train_losses(eager), rel=1e-5)


def test_whole_model_compile_of_qwen2_with_checkpointing_and_accumulation(tmp_path):
    """compile_scope: model on a tiny Qwen2 (RoPE, GQA, tied embeddings) with selective
    checkpointing inside the one graph, two micro-batches per step and an evaluation pass (a
    no-grad call of the same compiled forward): the eager run's losses."""
    from src.models import AutoModelForCausalLM, KernelConfig, Qwen2Config

    from .helpers import VOCAB

    def qwen():
        torch.manual_seed(0)
        config = Qwen2Config(n_layer=2, n_head=4, num_kv_heads=2, n_embd=32, intermediate_size=64, vocab_size=VOCAB,
                             block_size=32, tie_word_embeddings=True)
        return AutoModelForCausalLM.from_config(config, kernels=KernelConfig.reference())

    torch._dynamo.reset()
    runs = {}
    for scope in ("eager", "model"):
        cfg = make_config(tmp_path / scope, max_steps=3, grad_accum_steps=2, activation_checkpointing="selective",
                          eval_every=3)
        if scope == "model":
            cfg = replace(cfg, compile=True, compile_scope="model")
        trainer = Trainer(cfg, qwen(), SyntheticLoader(4), SyntheticLoader(4, seed=1, num_batches=2), CPU)
        trainer.fit()
        runs[scope] = trainer.history
    for split in ("train", "val"):
        eager = [r["loss"] for r in runs["eager"] if r["split"] == split]
        compiled = [r["loss"] for r in runs["model"] if r["split"] == split]
        assert len(eager) > 0 and compiled == pytest.approx(eager, rel=1e-5), split


@pytest.mark.parametrize("saved_by", [dict(implementation="torch"), dict(implementation="triton")],
                         ids=["torch-foreach", "triton"])
def test_resume_into_torch_fused_adamw_keeps_its_own_settings(tmp_path, saved_by, capsys):
    """torch's load_state_dict takes every group setting from the checkpoint: the implementation
    flags of the AdamW that saved it (torch's fused step then asserted on found_inf) and the saved
    betas / eps / weight decay. The run's config keeps its own, with a warning where they differ."""
    if saved_by["implementation"] == "triton":
        pytest.importorskip("triton")
    run_dir = tmp_path / "run"
    Trainer(with_optimizer(make_config(run_dir, max_steps=4), **saved_by), tiny_model(), SyntheticLoader(4), None,
            CPU).fit(until_step=2)
    cfg = with_optimizer(make_config(run_dir, max_steps=4), implementation="torch", fused=True, betas=(0.8, 0.9))
    cfg = replace(cfg, checkpoint=CheckpointConfig(resume="auto", save_final=False, export_hf=False))
    resumed = Trainer(cfg, tiny_model(seed=1), SyntheticLoader(4), None, CPU)
    assert all(g["fused"] and not g["foreach"] and g["betas"] == (0.8, 0.9) for g in resumed.optimizer.param_groups)
    assert "optimizer betas differ from this run's config" in capsys.readouterr().out
    assert resumed.optimizer.state  # the moments came back
    resumed.fit(until_step=3)  # the fused step runs
    assert resumed.step == 3
