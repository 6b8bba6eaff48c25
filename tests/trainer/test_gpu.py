"""On a CUDA GPU: bf16 + torch.compile + the fused AdamW with the on-device NaN skip, and
selective activation checkpointing. Skipped without CUDA (the `gpu` marker)."""

from __future__ import annotations

import pytest
import torch

from src.trainer import Trainer
from src.utils.distributed import DistInfo

from .helpers import SyntheticLoader, make_config, replace, tiny_model, train_losses, with_optimizer

pytestmark = pytest.mark.gpu


def gpu_info() -> DistInfo:
    return DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0), backend=None)


def cuda_config(tmp_path, **changes):
    cfg = make_config(tmp_path, max_steps=30, **changes)
    cfg.trainer.device = "cuda"
    cfg.trainer.precision = "bf16"
    return cfg


@pytest.mark.parametrize("compile_", [False, True])
def test_bf16_training_on_gpu(tmp_path, compile_):
    cfg = replace(cuda_config(tmp_path / str(compile_)), compile=compile_)
    trainer = Trainer(cfg, tiny_model(), SyntheticLoader(8), None, gpu_info())
    assert trainer.fused_optimizer and trainer.bf16
    trainer.fit()
    losses = [r["loss"] for r in trainer.history if r["split"] == "train"]
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(r["mem_gib"] > 0 for r in trainer.history)


def assert_cuda_graphs_train_like_the_default_mode(tmp_path, batch: int, trainer_changes: dict, **changes):
    """Train compiled with compile_mode default and reduce-overhead: the same losses, falling."""
    losses = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        cfg = replace(cuda_config(tmp_path / mode, **trainer_changes), compile=True, compile_mode=mode, **changes)
        trainer = Trainer(cfg, tiny_model(), SyntheticLoader(batch), None, gpu_info())
        trainer.fit()
        losses[mode] = torch.tensor([r["loss"] for r in trainer.history if r["split"] == "train"])
    torch.testing.assert_close(losses["reduce-overhead"], losses["default"], rtol=2e-2, atol=2e-2)
    assert losses["reduce-overhead"][-1] < losses["reduce-overhead"][0] - 0.5


def test_cuda_graph_compile_mode_trains_like_the_default_mode(tmp_path):
    """compile_mode: reduce-overhead (CUDA graphs per compiled block) gives the same losses."""
    assert_cuda_graphs_train_like_the_default_mode(tmp_path, 8, {})


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_cuda_graphs_with_gradient_accumulation_train_like_the_default_mode(tmp_path, scope):
    """CUDA graphs with two micro-batches per step: the trainer's persistent .grad buffers keep the
    first micro-batch's gradients from being overwritten by the second replay (which raised
    "accessing tensor output of CUDAGraphs that has been overwritten" before)."""
    assert_cuda_graphs_train_like_the_default_mode(
        tmp_path, 4, {"micro_batch_size": 4, "grad_accum_steps": 2}, compile_scope=scope
    )


@pytest.mark.parametrize(
    "cross_entropy, linear, residual_dtype, gelu",
    [
        ("triton", "torch", "fp32", "torch"), ("fused_linear", "torch", "fp32", "torch"),
        ("triton", "fp32_wgrad", "bf16", "cublaslt"),
    ],
)
def test_whole_model_compile_with_every_kernel_trains_like_per_block(tmp_path, cross_entropy, linear, residual_dtype, gelu):
    """compile_scope: model (one graph; the in-place Triton loss head stays eager behind a graph
    break, or with `compile_loss_head: always` is compiled into it) and the same with CUDA graphs
    give the training and evaluation losses of per-block compilation, with our Triton kernels on
    (and the optimized settings: fp32 weight gradients from cuBLAS, the residual stream in bf16,
    the GELU in cuBLASLt's epilogues)."""
    from src.models import AutoModelForCausalLM, KernelConfig

    from .helpers import tiny_model_config

    kernels = KernelConfig(layernorm="triton", gelu=gelu, cross_entropy=cross_entropy, linear=linear, attention="auto")
    losses = {}
    runs = [("blocks", "default", "auto"), ("model", "default", "auto"), ("model", "reduce-overhead", "auto")]
    if cross_entropy == "triton":
        runs.append(("model", "reduce-overhead", "always"))
    for scope, mode, loss_head in runs:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_model_config(), kernels=kernels)
        cfg = replace(cuda_config(tmp_path / f"{scope}_{mode}_{loss_head}", eval_every=15, residual_dtype=residual_dtype),
                      compile=True, compile_scope=scope, compile_mode=mode, compile_loss_head=loss_head, kernels=kernels)
        val = SyntheticLoader(8, seed=1, num_batches=2)  # evaluation: the same forward without grad
        trainer = Trainer(cfg, model, SyntheticLoader(8), val, gpu_info())
        trainer.fit()
        for split in ("train", "val"):
            losses[scope, mode, loss_head, split] = torch.tensor(
                [r["loss"] for r in trainer.history if r["split"] == split]
            )
    for key in runs[1:]:
        for split in ("train", "val"):
            expected = losses["blocks", "default", "auto", split]
            assert len(expected) > 0
            torch.testing.assert_close(losses[(*key, split)], expected, rtol=2e-2, atol=2e-2, msg=str((key, split)))
    train = losses["model", "default", "auto", "train"]
    assert train[-1] < train[0] - 0.5


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_bf16_weight_copies_train_like_the_casts_on_gpu(tmp_path, family, compile_mode):
    """optimizer.bf16_weight_copy on a GPU, with the kernels that read the copies (cuBLAS fp32 weight
    gradients, GPT-2's cuBLASLt GELU epilogues, Qwen2's fused SwiGLU backward and loss head), eager
    and as one compiled model replayed as CUDA graphs: the losses of the casts the copies replace,
    and after the last update every copy is its weight rounded to bf16 by our AdamW kernel."""
    from .test_weight_copy import FAMILIES

    losses = {}
    for copy in (False, True):
        torch._dynamo.reset()
        cfg = with_optimizer(cuda_config(tmp_path / f"{copy}", residual_dtype="bf16"), bf16_weight_copy=copy)
        if compile_mode is not None:
            cfg = replace(cfg, compile=True, compile_scope="model", compile_mode=compile_mode)
        trainer = Trainer(cfg, FAMILIES[family](), SyntheticLoader(8), None, gpu_info())
        assert bool(trainer.weight_copies) == copy
        trainer.fit()
        losses[copy] = torch.tensor(train_losses(trainer))
    # Not bitwise: cuDNN's attention backward and the compiled embedding gradient add with atomics.
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-2, atol=2e-2)
    assert losses[True][-1] < losses[True][0] - 0.5
    for weight, weight_copy in trainer.weight_copies.items():
        assert torch.equal(weight_copy, weight.detach().to(torch.bfloat16))


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
@pytest.mark.parametrize("compile_mode", [None, "reduce-overhead"])
def test_bf16_grads_train_like_fp32_weight_gradients_on_gpu(tmp_path, family, compile_mode):
    """optimizer.bf16_grads on a GPU with the optimized kernels, eager and as one compiled model
    replayed as CUDA graphs: the weight gradients land in the copies in bf16 (the LM head's stays
    fp32), the losses follow those of fp32 weight gradients, and every copy is its weight after
    the last update."""
    from .test_weight_copy import FAMILIES

    losses = {}
    for bf16_grads in (False, True):
        torch._dynamo.reset()
        cfg = with_optimizer(cuda_config(tmp_path / f"{bf16_grads}", residual_dtype="bf16"), bf16_weight_copy=True,
                             bf16_grads=bf16_grads)
        if compile_mode is not None:
            cfg = replace(cfg, compile=True, compile_scope="model", compile_mode=compile_mode)
        trainer = Trainer(cfg, FAMILIES[family](), SyntheticLoader(8), None, gpu_info())
        assert bool(trainer.gradient_copies) == bf16_grads
        assert trainer.bare.lm_head.weight not in trainer.gradient_copies
        trainer.fit()
        losses[bf16_grads] = torch.tensor(train_losses(trainer))
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-2, atol=2e-2)
    assert losses[True][-1] < losses[True][0] - 0.5
    for weight, weight_copy in trainer.weight_copies.items():
        assert weight.grad is None and weight_copy.grad is None
        assert torch.equal(weight_copy.detach(), weight.detach().to(torch.bfloat16))


def test_fused_optimizer_skips_a_nonfinite_step_on_device(tmp_path):
    model = tiny_model()
    forward = model.forward
    state = {"poison": False}

    def maybe_poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if state["poison"]:
            out.loss = out.loss * float("nan")
        return out

    model.forward = maybe_poisoned
    trainer = Trainer(cuda_config(tmp_path), model, SyntheticLoader(8), None, gpu_info())
    loader = SyntheticLoader(8)
    trainer.train_step([loader.batch(0)])
    before = {k: v.clone() for k, v in trainer.bare.state_dict().items()}
    steps = [s["step"].clone() for s in trainer.optimizer.state.values()]
    state["poison"] = True
    trainer.train_step([loader.batch(1)])
    for name, value in trainer.bare.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(torch.equal(s["step"], b) for s, b in zip(trainer.optimizer.state.values(), steps))
    assert int(trainer.skipped) == 1


def test_selective_activation_checkpointing_on_gpu(tmp_path):
    plain = Trainer(cuda_config(tmp_path / "plain"),
                    tiny_model(), SyntheticLoader(8), None, gpu_info())
    ac_cfg = cuda_config(tmp_path / "ac", activation_checkpointing="selective")
    ac = Trainer(ac_cfg, tiny_model(), SyntheticLoader(8), None, gpu_info())
    plain.fit()
    ac.fit()
    a = [r["loss"] for r in plain.history]
    b = [r["loss"] for r in ac.history]
    assert b == pytest.approx(a, rel=2e-2)


@pytest.fixture
def nccl_world_of_one():
    """An NCCL process group of one rank in this process (what the trainer makes for FSDP2 under
    plain `python`), destroyed afterwards: FSDP2 on the one GPU, with its DTensors and mixed
    precision; sharding over one rank keeps each parameter whole."""
    import torch.distributed as dist

    from src.utils.distributed import ensure_process_group

    ensure_process_group(gpu_info())
    try:
        yield gpu_info()
    finally:
        dist.destroy_process_group()


def test_triton_adamw_under_fsdp2_trains_like_torch_adamw(tmp_path, nccl_world_of_one):
    """`optimizer.implementation: auto` takes our AdamW under FSDP2 too: it updates the DTensors'
    local shards (moments kept as DTensors) and trains as torch's fused AdamW does."""
    from torch.distributed.tensor import DTensor

    from src.trainer.optimizer import TritonAdamW

    losses = {}
    for implementation in ("auto", "torch"):
        torch.manual_seed(0)
        cfg = cuda_config(tmp_path / implementation, strategy="fsdp2")
        cfg = replace(cfg, optimizer=replace(cfg.optimizer, implementation=implementation))
        trainer = Trainer(cfg, tiny_model(), SyntheticLoader(8), None, nccl_world_of_one)
        assert isinstance(trainer.optimizer, TritonAdamW) == (implementation == "auto")
        trainer.fit()
        losses[implementation] = torch.tensor([r["loss"] for r in trainer.history if r["split"] == "train"])
        if implementation == "auto":
            assert all(isinstance(s["exp_avg"], DTensor) for s in trainer.optimizer.state.values())
    torch.testing.assert_close(losses["auto"], losses["torch"], rtol=2e-2, atol=2e-2)
    assert losses["auto"][-1] < losses["auto"][0] - 0.5


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_ddp_bucket_views_and_fsdp2_units_on_nccl_train_like_no_strategy(tmp_path, nccl_world_of_one, strategy):
    """Over NCCL on the GPU: DDP with its gradients as bucket views, under the whole-model CUDA-graph
    compile with two micro-batches per step (the trainer's persistent .grad buffers become views
    into the buckets), and FSDP2 with both blocks in one unit; each trains as one process without
    a strategy does."""
    from src.trainer.config import ParallelConfig

    if strategy == "ddp":
        changes = dict(compile=True, compile_scope="model", compile_mode="reduce-overhead")
        trainer_changes, batch = dict(micro_batch_size=4, grad_accum_steps=2), 4
        parallel = ParallelConfig(strategy="ddp")
    else:
        changes, trainer_changes, batch = dict(compile=True), {}, 8
        parallel = ParallelConfig(strategy="fsdp2", fsdp_blocks_per_unit=2)
    losses = {}
    for name, par in (("none", ParallelConfig()), (strategy, parallel)):
        torch._dynamo.reset()
        torch.manual_seed(0)
        cfg = replace(cuda_config(tmp_path / name, **trainer_changes), parallel=par, **changes)
        trainer = Trainer(cfg, tiny_model(), SyntheticLoader(batch), None, nccl_world_of_one)
        trainer.fit()
        losses[name] = torch.tensor([r["loss"] for r in trainer.history if r["split"] == "train"])
    torch.testing.assert_close(losses[strategy], losses["none"], rtol=2e-2, atol=2e-2)
    assert losses[strategy][-1] < losses[strategy][0] - 0.5
    if strategy == "ddp":
        grads = [p.grad for p in trainer.bare.parameters() if p.requires_grad]
        assert len({g.untyped_storage().data_ptr() for g in grads}) <= 2 < len(grads)
