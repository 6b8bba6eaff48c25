"""Preparing a built model for the hardware: functions applied to the model, in this order.

    0. the residual stream's dtype under autocast (trainer.residual_dtype)
    1. activation checkpointing per transformer block (none | full | selective)
    2. torch.compile per transformer block, and of the loss head (lm_head + cross-entropy)
    3. FSDP2 `fully_shard` per block and at the root, or DDP, or nothing

Model code stays single-device code: every step here changes how a block runs, never the
parameter names, so state dicts, checkpoints and the Hugging Face export see the same keys
whatever was applied. `prepare_model` returns the module to call in training (DDP's wrapper, or
the model itself) and the bare model (for its config, layers and export).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from src.models.components import attach_weight_copies
from src.models.modeling_utils import CausalLM
from src.utils.config import ConfigError
from src.utils.distributed import DistInfo, build_device_mesh, ensure_process_group

from .config import TrainConfig
from .graph_passes import install_tied_embedding_pass

# Selective checkpointing keeps the outputs of the expensive ops (matmuls and attention) and
# recomputes the cheap elementwise ones (norms, activations, residual adds) in backward: most
# of full checkpointing's memory saving for a few percent of extra compute.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,  # SDPA on the CPU
}


# Our ops that run a matmul, saved like aten's. By name: a kernel module registers its ops when it
# is imported, which only happens when a config chooses it.
_SAVED_KERNEL_OPS = {
    "kernels::swiglu_linear_fwd", "kernels::swiglu_linear_recompute_fwd", "kernels::gelu_mlp_fwd",
    # flash-attn 2.6+ (`kernels.attention: flash_attn`) registers its kernels as torch.library ops
    "flash_attn::_flash_attn_forward", "flash_attn::_flash_attn_varlen_forward",
}


def _selective_policy(ctx, op, *args, **kwargs):
    saved = op in _SAVED_OPS or getattr(op, "name", lambda: "")() in _SAVED_KERNEL_OPS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, selective: bool):
    context_fn = (
        functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        if selective
        else None
    )

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if context_fn is None:
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    return run


def residual_dtype(cfg: TrainConfig, bf16: bool) -> torch.dtype | None:
    """The residual stream's dtype that trainer.residual_dtype asks for at this precision (None:
    the embeddings' own)."""
    return torch.bfloat16 if bf16 and cfg.trainer.residual_dtype == "bf16" else None


def apply_residual_dtype(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Carry the residual stream in `dtype` under autocast, in every model inside `model` (the
    policy and the reference of DPO included); None keeps the embeddings' dtype."""
    for module in model.modules():
        if isinstance(module, CausalLM):
            module.residual_dtype = dtype


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks to checkpoint, compile and shard one by one: `model.sharded_blocks()` when the
    model lists them (DPO: policy layers, then the frozen reference's), else `model.layers`."""
    if hasattr(model, "sharded_blocks"):
        return list(model.sharded_blocks())
    return list(model.layers)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def apply_activation_checkpointing(model: nn.Module, mode: str, layers: int | None = None) -> None:
    """Recompute the activations of the first `layers` trainable blocks (None: all of them) in
    backward instead of keeping them.

    The block's `forward` is replaced on the instance (not wrapped in another module), so the
    parameter names do not change.
    """
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpointing must be none, full or selective, got {mode!r}")
    # a frozen block (DPO's reference) keeps no activations anyway
    blocks = [block for block in transformer_blocks(model) if _trainable(block)]
    if layers is not None and layers > len(blocks):
        raise ValueError(f"trainer.activation_checkpointing_layers={layers}, but the model has {len(blocks)} "
                         f"trainable blocks; set at most {len(blocks)} (or leave it out for all of them)")
    for block in blocks[:layers]:
        block.forward = _checkpointed(block.forward, selective=mode == "selective")


def apply_compile(
    model: nn.Module,
    mode: str = "default",
    activation_memory_budget: float = 1.0,
    scope: str = "blocks",
    loss_head: str = "auto",
) -> None:
    """torch.compile the model in place (`Module.compile` keeps parameter names).

    scope="blocks": each transformer block, and the loss head (`lm_output`; see below for when).
    Blocks share one compiled graph; per-block compilation keeps compile time flat in depth and
    lets FSDP2 hook each block. scope="model": the whole forward as one graph (the nanoGPT way),
    which lets Inductor fuse across block boundaries and runs one set of guards and wrappers per
    step instead of one per block; for a causal LM on one GPU (DDP: see `prepare_model`, which
    compiles the DDP wrapper instead so that Dynamo splits the graph at gradient buckets).

    `mode="reduce-overhead"` replays each compiled graph as a CUDA graph (Inductor's cudagraph
    trees): on an H100, gpt_125m at 8 x 1024 went from 371k to 412k tokens/s, its step having been
    bound by the host's kernel launches. At 16 x 1024 the step is GPU-bound when the host keeps up;
    there the whole model as one CUDA graph was the fastest setting (458k tokens/s, 1% over
    per-block compile; 8% on a slower host).
    `activation_memory_budget` < 1 makes the partitioner keep only that share of each block's
    activations, recomputing the cheapest ops (by FLOPs) in backward. `loss_head` ("auto" or
    "always", the config's `compile_loss_head`): whether the in-place Triton cross-entropy head is
    compiled too (see below)."""
    options = {} if mode == "default" else {"mode": mode}
    # Read by AOTAutograd's min-cut partitioner when each graph compiles (at its first call). It
    # is process-wide: one training run per process.
    torch._functorch.config.activation_memory_budget = activation_memory_budget
    # A tied embedding's gradient built without a zero-filled (V, D) buffer (graph_passes.py);
    # it applies where the lookup and the loss head are in one graph (scope="model").
    install_tied_embedding_pass()
    # The loss head is compiled with the PyTorch cross-entropy (Inductor fuses the log-softmax) and
    # with the fused linear+CE (an opaque op: the graph holds the casts around it). The Triton
    # `cross_entropy` writes its gradient into the logits in place; under compile that mutation is
    # functionalized, which may copy the (N, V) logits (Inductor re-inplaced it on the CPU; not
    # measured on a GPU), so that head stays eager unless `loss_head="always"`.
    if loss_head not in ("auto", "always"):
        raise ValueError(f"loss_head must be auto or always, got {loss_head!r}")
    inner = getattr(model, "module", model)  # the model inside a DDP wrapper
    kernels = getattr(inner, "kernels", None)
    compile_head = hasattr(inner, "lm_output") and (
        loss_head == "always" or kernels is None or kernels.cross_entropy in ("torch", "fused_linear")
    )
    if scope == "model":
        if not hasattr(inner, "lm_output"):
            raise ValueError(f"compile_scope=model compiles a causal LM's forward; {type(inner).__name__} is "
                             "compiled per block: set compile_scope: blocks")
        if not compile_head:  # one graph up to the final norm, then the eager in-place loss head
            inner.lm_output = torch.compiler.disable(inner.lm_output)
        model.compile(**options)
        return
    if scope != "blocks":
        raise ValueError(f"compile scope must be blocks or model, got {scope!r}")
    for block in transformer_blocks(model):
        block.compile(**options)
    if compile_head:
        model.lm_output = torch.compile(model.lm_output, **options)


def apply_fsdp2(model: nn.Module, info: DistInfo, bf16: bool, reshard_after_forward: bool,
                blocks_per_unit: int = 1) -> None:
    """Shard parameters, gradients and optimizer state over all ranks: each `blocks_per_unit`
    consecutive blocks are one all-gather unit (`fsdp_units`); the root holds the embeddings,
    final norm and head (tied weights stay in one unit). bf16 compute with fp32 gradient reduction
    when `bf16`.

    `reshard_after_forward` applies to the units but the last trainable one, whose backward runs
    first. False skips each block's second all-gather in backward for the memory of every block's
    gathered parameters (Qwen2-0.5B on one H100: +0.64 GiB, the same speed within the run-to-run
    noise of its host-bound step). The root never reshards after forward: its
    head is the first thing backward needs, so freeing it would only cost a second all-gather
    (FSDP2's own choice for a root left at its default). Passing True to the root as well made
    the first backward fail on an H100 (torch 2.11, CUDA): the head's gathered weight had been
    freed ("setStorage: ... out of bounds for storage of size 0"); gloo on the CPU did not show it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = build_device_mesh(info)
    mp_policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    units = fsdp_units(transformer_blocks(model), blocks_per_unit)
    # Backward starts with the last unit that has gradients: freeing its parameters after
    # forward would only make backward gather them again at once (torchtitan's rule too).
    first_in_backward = max((i for i, unit in enumerate(units) if _trainable(unit[0])), default=-1)
    for i, unit in enumerate(units):
        reshard = reshard_after_forward and i != first_in_backward
        # a list is one FSDP2 group: one all-gather before its first block, one reduce-scatter
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)


def fsdp_units(blocks: list[nn.Module], blocks_per_unit: int) -> list[list[nn.Module]]:
    """`blocks` in order, `blocks_per_unit` at a time (the last unit may be shorter), never mixing
    trainable and frozen blocks in one unit (DPO lists the policy's layers, then the frozen
    reference's, which run in another forward)."""
    if blocks_per_unit < 1:
        raise ValueError(f"blocks_per_unit must be >= 1, got {blocks_per_unit}")
    units: list[list[nn.Module]] = []
    for block in blocks:
        last = units[-1] if units else None
        if last is not None and len(last) < blocks_per_unit and _trainable(last[0]) == _trainable(block):
            last.append(block)
        else:
            units.append([block])
    return units


def apply_ddp(model: nn.Module, info: DistInfo, bucket_cap_mb: float) -> nn.Module:
    """DDP over all ranks, gradients all-reduced in buckets of `bucket_cap_mb` MB. A compiled
    DDP model (compile_scope: model) is split into one graph per bucket."""
    from torch.nn.parallel import DistributedDataParallel

    # The bf16 weight copies are buffers, which DDP would broadcast from rank 0 before every
    # forward; each rank's optimizer writes the same values into its own.
    copies = [name for name, _ in model.named_buffers() if name.rsplit(".", 1)[-1] == "weight_copy"]
    if copies:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, copies)
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # Gradients as views into DDP's all-reduce buckets. Without it every gradient is copied into
    # its bucket before the all-reduce and back out after it, and .grad and the buckets each hold
    # all of them after backward. A gradient that is not a bucket view yet (the first step, after
    # zero_grad's set_to_none) is copied in once and replaced by the view. On one H200, Qwen2-0.5B
    # in its 12 GiB configuration under DDP: 125.3k -> 127.4k tokens/s, 0.2 GiB less reserved.
    return DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=bucket_cap_mb,
                                   gradient_as_bucket_view=True)


def prepare_model(model: nn.Module, cfg: TrainConfig, info: DistInfo, bf16: bool) -> tuple[nn.Module, nn.Module]:
    """Move to the device and apply checkpointing, compilation and the parallel strategy.

    Returns (train_module, bare_model). Call `train_module(**batch)` in training; use
    `bare_model` for config, layers and parameters (under FSDP2 the two are the same object).
    """
    strategy = cfg.parallel.strategy
    if info.world_size > 1 and strategy == "none":
        raise ConfigError(
            f"{info.world_size} processes were started but parallel.strategy is none; "
            "set parallel.strategy=ddp or fsdp2 (or start a single process)"
        )
    if strategy != "none":
        ensure_process_group(info)  # FSDP2 and DDP in one plain `python` process: a group of one
    model.to(info.device)
    if cfg.optimizer.bf16_weight_copy and bf16:  # (precision auto in fp32, on a CPU: no casts to save, none kept)
        # before compile: the graphs read them as buffers (with bf16_grads, as inputs that get gradients)
        attach_weight_copies(model, torch.bfloat16, grads=cfg.optimizer.bf16_grads)
    apply_residual_dtype(model, residual_dtype(cfg, bf16))
    apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing, cfg.trainer.activation_checkpointing_layers)
    whole_model_ddp = cfg.compile and cfg.compile_scope == "model" and strategy == "ddp"
    if cfg.compile and not whole_model_ddp:
        apply_compile(model, cfg.compile_mode, cfg.trainer.activation_memory_budget, cfg.compile_scope,
                      cfg.compile_loss_head)
    if strategy == "fsdp2":
        apply_fsdp2(model, info, bf16=bf16, reshard_after_forward=cfg.parallel.reshard_after_forward,
                    blocks_per_unit=cfg.parallel.fsdp_blocks_per_unit)
        return model, model
    if strategy == "ddp":
        ddp = apply_ddp(model, info, cfg.parallel.ddp_bucket_cap_mb)
        if whole_model_ddp:
            # Compiling the DDP wrapper lets Dynamo split the graph at DDP's gradient buckets, so
            # each bucket's all-reduce starts while backward goes on (one graph would finish all
            # gradients at its very end).
            apply_compile(ddp, cfg.compile_mode, cfg.trainer.activation_memory_budget, "model", cfg.compile_loss_head)
        return ddp, model
    return model, model
