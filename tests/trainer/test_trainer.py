"""The Trainer in one process on the CPU: accumulation, exact resume, non-finite steps, evaluation,
checkpoint rotation and the Hugging Face export."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest
import torch

from src.trainer import CheckpointConfig, Trainer, list_checkpoints
from src.trainer.checkpoint import CheckpointError
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
