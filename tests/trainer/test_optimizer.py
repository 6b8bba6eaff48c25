"""AdamW parameter groups, the gradient norm and clipping, and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from src.models import AutoModelForCausalLM, KernelConfig, Qwen2Config
from src.trainer.config import OptimizerConfig, ScheduleConfig
from src.trainer.optimizer import (
    LRSchedule, TritonAdamW, build_optimizer, clip_grads_, param_groups, resolve_implementation, total_grad_norm,
)
from src.utils.config import ConfigError

from .helpers import tiny_model


def group_names(model):
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    return {names[id(p)] for p in decay["params"]}, {names[id(p)] for p in no_decay["params"]}


def test_no_weight_decay_on_norms_biases_embeddings_gpt2():
    model = tiny_model()
    decay, no_decay = group_names(model)
    assert not decay & no_decay
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "layers.0.ln_1.weight",
            "layers.0.attn.qkv.bias"} <= no_decay
    assert all(n.endswith(".weight") and "ln" not in n and "wte" not in n and "wpe" not in n for n in decay)
    assert "layers.1.mlp.fc.weight" in decay
    # the tied lm_head is the embedding table: counted once, not decayed
    all_params = {id(p) for p in model.parameters()}
    assert len(decay) + len(no_decay) == len(all_params)


def test_no_weight_decay_qwen2_untied_head_is_decayed():
    cfg = Qwen2Config(n_layer=1, n_head=2, num_kv_heads=1, n_embd=32, vocab_size=50, block_size=32,
                      intermediate_size=64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg, kernels=KernelConfig.reference())
    decay, no_decay = group_names(model)
    assert "embed_tokens.weight" in no_decay and "norm.weight" in no_decay
    assert "lm_head.weight" in decay
    assert all(p.dim() < 2 for n, p in model.named_parameters() if n in no_decay and "embed" not in n)


def test_weight_decay_really_skips_the_group():
    model = tiny_model()
    opt = build_optimizer(model, OptimizerConfig(lr=0.1, weight_decay=0.5), torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0 with zero gradients: only decay moves weights
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["ln_f.weight"], before["ln_f.weight"])
    assert torch.equal(after["wte.weight"], before["wte.weight"])
    torch.testing.assert_close(after["layers.0.mlp.fc.weight"], before["layers.0.mlp.fc.weight"] * (1 - 0.1 * 0.5))


def lrs(cfg, lr=1.0, total=100):
    schedule = LRSchedule(cfg, lr, total)
    return [schedule.lr_at(s) for s in range(total)]


def test_cosine_schedule():
    values = lrs(ScheduleConfig(type="cosine", warmup_steps=10, min_lr=0.1))
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)  # linear warmup
    assert values[10] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # half way
    assert values[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))  # monotone decay


def test_wsd_schedule():
    values = lrs(ScheduleConfig(type="wsd", warmup_steps=10, min_lr=0.0, decay_fraction=0.2))
    assert values[5] == pytest.approx(0.6)
    assert all(v == 1.0 for v in values[10:80])  # stable
    assert values[80] == pytest.approx(0.95) and values[90] == pytest.approx(0.45)  # linear over the last 20 steps
    assert values[-1] == 0.0  # min_lr on the last step


def test_wsd_decay_of_one_step_still_reaches_min_lr():
    """A decay_fraction that rounds to one step (0.01 of 100) decays on that step, instead of never."""
    values = lrs(ScheduleConfig(type="wsd", warmup_steps=10, min_lr=0.1, decay_fraction=0.01))
    assert all(v == 1.0 for v in values[10:99]) and values[-1] == pytest.approx(0.1)


def test_constant_schedule_and_no_warmup():
    assert lrs(ScheduleConfig(type="constant", warmup_steps=0, min_lr=0.0), total=5) == [1.0] * 5


def test_optimizer_implementation_auto_takes_triton_on_cuda_only_where_it_applies(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_implementation(OptimizerConfig(), cuda) == "triton"  # FSDP2 included: it updates local shards
    assert resolve_implementation(OptimizerConfig(fused=True), cuda) == "torch"
    assert resolve_implementation(OptimizerConfig(), cpu) == "torch"
    assert resolve_implementation(OptimizerConfig(implementation="torch"), cuda) == "torch"
    model = tiny_model()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(build_optimizer(model, OptimizerConfig(implementation="triton"), cpu), TritonAdamW)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        build_optimizer(model, OptimizerConfig(implementation="triton"), cpu)
    # bf16 moments: auto resolves to torch's AdamW on the CPU, which cannot round them stochastically
    with pytest.raises(ConfigError, match="state_dtype=bfloat16 needs our Triton AdamW.*device cpu"):
        build_optimizer(model, OptimizerConfig(state_dtype="bfloat16"), cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    opt = build_optimizer(model, OptimizerConfig(implementation="triton", state_dtype="bfloat16"), cpu)
    assert opt.state_dtype == torch.bfloat16


def test_total_grad_norm_and_clipping_match_torch_plain_and_sharded(tmp_path):
    """Plain gradients: torch's norm. DTensors sharded on a 1-D mesh (FSDP2): the same norm from
    the local shards; anything else is refused with a message. Clipping scales in place as
    clip_grad_norm_ does (the 2-rank FSDP2 norms are checked in test_distributed.py)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    grads = [torch.randn(6, 4), torch.randn(5), torch.randn(0)]
    expected = torch.nn.utils.get_total_norm(grads)
    assert torch.allclose(total_grad_norm(grads), expected)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    clipped = [g.clone() for g in grads]
    clip_grads_(clipped, 0.5, total_grad_norm(clipped))
    assert all(torch.allclose(c, p.grad) for c, p in zip(clipped, params))

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = [distribute_tensor(g, mesh, [Shard(0)]) for g in grads]
        assert torch.allclose(total_grad_norm(sharded), expected)
        clip_grads_(sharded, 0.5, total_grad_norm(sharded))
        assert all(torch.allclose(s.to_local(), p.grad) for s, p in zip(sharded, params))
        with pytest.raises(ValueError, match="one 1-D device mesh"):
            total_grad_norm([sharded[0], grads[1]])
        with pytest.raises(ValueError, match="sharded gradients"):
            total_grad_norm([distribute_tensor(grads[0], mesh, [Replicate()])])
    finally:
        dist.destroy_process_group()
