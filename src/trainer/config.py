"""The train config: one YAML file describes one complete job (configs/train/*.yaml).

    cfg = load_config("configs/train/pretrain.yaml", ["trainer.max_steps=50"])

`load_config` reads the YAML, applies `--set key.sub=value` overrides, builds the dataclasses
strictly (an unknown key names the closest valid one), loads the model YAML named by
`model_config_path`, and checks the combinations that cannot work. All of that happens before
any GPU work, so a typo costs seconds, not a queue slot. Defaults live here and only here.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from src.dataset.base import DataConfig
from src.models import KernelConfig, load_model_config
from src.models.dpo import DPOConfig
from src.utils.config import ConfigError, apply_overrides, from_dict, read_yaml


@dataclass
class TrainerConfig:
    """The loop: batch shape, budgets, precision, cadence of evaluation and logging."""

    micro_batch_size: int = 8  # sequences per rank per micro-step
    grad_accum_steps: int = 1  # micro-steps per optimizer step
    seq_len: int = 256
    # Budgets: training stops at the first one reached; at least one of max_steps / max_tokens.
    max_steps: int | None = None
    max_tokens: int | None = None  # tokens seen, summed over ranks
    max_time_minutes: float | None = None  # per invocation; a pause: it always saves a checkpoint
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on the CPU
    # The residual stream under bf16 autocast. fp32: autocast's own (the fp32 embeddings' output is
    # carried through every residual add, as nanoGPT does). bf16: cast once after the embeddings, as
    # llm.c and Megatron-LM do: every norm and residual add then moves half the bytes (+5.4%
    # gpt_125m, +2.4% Qwen2-0.5B tokens/s on an H100; the loss after 200 steps +0.60% / +0.20%).
    # The weights stay fp32. Under FSDP2's bf16 parameters the stream is bf16 either way.
    residual_dtype: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # How many transformer blocks activation_checkpointing applies to, from the first (null: all).
    # Between none and all, memory and time fall in steps of one block's activations: the way to
    # fill a memory budget exactly (Megatron-LM's --recompute-num-layers). In a model's forward all
    # blocks' activations are alive at once, so which blocks makes no difference to the peak.
    activation_checkpointing_layers: int | None = None
    # With compile: true, the share of the compiled blocks' activations to keep (1.0: what runs
    # fastest; lower: the compiler recomputes the cheapest ops in backward to stay under it, e.g.
    # 0.5 keeps half). An alternative to activation_checkpointing, not a complement.
    activation_memory_budget: float = 1.0
    eval_every: int = 0  # optimizer steps between evaluations (0: never)
    eval_batches: int = 20  # validation batches per evaluation and rank (the val split may be shorter)
    seed: int = 1337
    # A step whose loss or gradient norm is NaN/Inf is skipped (no update) and counted; this many
    # in a row stops training with a checkpoint.
    max_nonfinite_steps: int = 5
    # > 0: Python's automatic garbage collection is off while training and the young generations
    # are collected every this many steps instead, at the same step on every rank (an automatic
    # full collection lands on a random step of a random rank and stalls the others). 0 (default):
    # automatic collection, which measured no slower on one GPU.
    gc_every: int = 0

    def __post_init__(self):
        for name in ("micro_batch_size", "grad_accum_steps", "seq_len", "eval_batches", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"trainer.{name} must be >= 1 (or left out), got {value}")
        minutes = self.max_time_minutes
        if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
            raise ConfigError(f"trainer.max_time_minutes must be a finite number > 0 (or left out: no time budget), "
                              f"got {self.max_time_minutes}")
        if self.max_steps is None and self.max_tokens is None:
            raise ConfigError("set trainer.max_steps or trainer.max_tokens: the LR schedule needs a length "
                              "(trainer.max_time_minutes may stop earlier)")
        if self.eval_every < 0:
            raise ConfigError(f"trainer.eval_every must be >= 0 (0 disables evaluation), got {self.eval_every}")
        if not 0.0 <= self.activation_memory_budget <= 1.0:
            raise ConfigError(f"trainer.activation_memory_budget must be in [0, 1], got {self.activation_memory_budget}")
        if self.activation_memory_budget < 1.0 and self.activation_checkpointing != "none":
            raise ConfigError("trainer.activation_memory_budget and trainer.activation_checkpointing both decide what "
                              "to recompute; set one of them (activation_checkpointing: none, or budget 1.0)")
        if self.activation_checkpointing_layers is not None:
            if self.activation_checkpointing_layers < 0:
                raise ConfigError("trainer.activation_checkpointing_layers must be >= 0 (or left out for every "
                                  f"block), got {self.activation_checkpointing_layers}")
            if self.activation_checkpointing == "none":
                raise ConfigError("trainer.activation_checkpointing_layers says how many blocks to checkpoint; set "
                                  "trainer.activation_checkpointing to full or selective (or leave the layers out)")
        if self.gc_every < 0:
            raise ConfigError(f"trainer.gc_every must be >= 0 (0 keeps Python's automatic collection), got {self.gc_every}")
        if self.residual_dtype == "bf16" and self.precision == "fp32":
            raise ConfigError("trainer.residual_dtype=bf16 needs bf16 autocast; set trainer.precision to bf16 or auto "
                              "(or residual_dtype to fp32)")


@dataclass
class OptimizerConfig:
    """AdamW; weight decay applies to matrices only (not norms, biases, embeddings)."""

    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping (the norm is still logged)
    # auto: our Triton AdamW (kernels/adamw.py, the clip coefficient applied inside the update;
    # under FSDP2 on each rank's shards) on CUDA unless `fused` is set; torch: torch.optim.AdamW.
    implementation: Literal["auto", "torch", "triton"] = "auto"
    fused: bool | None = None  # torch's AdamW: None = fused on CUDA, foreach on the CPU
    # exp_avg and exp_avg_sq: bfloat16 halves them (4 bytes per parameter less), stored with
    # stochastic rounding by our Triton AdamW (implementation auto on CUDA, or triton)
    state_dtype: Literal["float32", "bfloat16"] = "float32"
    # Keep a bf16 copy of every linear layer's weight (the LM head's included), rewritten by each
    # update: under bf16 autocast the matmuls read it instead of casting the fp32 weights in every
    # forward and backward. The same math (the copy is the cast), 2 bytes per weight more memory.
    # Single GPU or DDP (FSDP2 casts when it gathers); our AdamW writes the copies in its update,
    # torch's AdamW is followed by a copy pass.
    bf16_weight_copy: bool = False
    # With bf16_weight_copy: the weight gradients of the linear layers (not the LM head or a tied
    # embedding) land in the copies in bf16, as the bf16 GEMMs compute them (the values of
    # kernels.linear: torch), instead of in fp32: 6 bytes per weight less traffic per step (GEMM
    # store, gradient norm, update) and 2 bytes less memory. Our AdamW only; one process, no
    # gradient accumulation (bf16 sums over micro-batches would round at every add).
    bf16_grads: bool = False

    def __post_init__(self):
        # `finite and in range`: a NaN fails every comparison, so a check like `lr <= 0` lets it through.
        for name, value in (("lr", self.lr), ("eps", self.eps)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"optimizer.{name} must be a finite number > 0, got {value}")
        for name, value in (("weight_decay", self.weight_decay), ("grad_clip", self.grad_clip)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"optimizer.{name} must be a finite number >= 0, got {value}")
        if self.implementation == "triton" and self.fused is not None:
            raise ConfigError("optimizer.fused chooses between torch's AdamW kernels; it does not apply to "
                              "optimizer.implementation=triton (remove one of them)")
        if self.state_dtype == "bfloat16" and (self.implementation == "torch" or self.fused is not None):
            raise ConfigError("optimizer.state_dtype=bfloat16 needs our Triton AdamW (stochastic rounding of the moments); "
                              "torch's AdamW would keep bf16 moments rounded to nearest, where small updates vanish. "
                              "Use optimizer.implementation: triton (or auto without optimizer.fused), or state_dtype: float32")
        if self.bf16_grads and not self.bf16_weight_copy:
            raise ConfigError("optimizer.bf16_grads puts the weight gradients in the bf16 weight copies; set "
                              "optimizer.bf16_weight_copy: true as well, or drop bf16_grads")
        if self.bf16_grads and (self.implementation == "torch" or self.fused is not None):
            raise ConfigError("optimizer.bf16_grads needs our Triton AdamW, which reads the gradients from the bf16 "
                              "copies; use optimizer.implementation: triton (or auto without optimizer.fused), or drop "
                              "bf16_grads")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers [beta1, beta2], each in [0, 1), "
                              f"got {list(self.betas)}")


@dataclass
class ScheduleConfig:
    """Learning rate over steps: linear warmup, then cosine to min_lr, or warmup-stable-decay."""

    type: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr: float = 3e-5
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays linearly to min_lr

    def __post_init__(self):
        if self.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise ConfigError(f"schedule.min_lr must be a finite number >= 0, got {self.min_lr}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}")


@dataclass
class CheckpointConfig:
    every: int = 0  # optimizer steps between checkpoints (0: only at stops: the end, signals, time, until_step)
    keep_last: int = 3
    resume: str | None = None  # auto (the newest in the run's checkpoints/, if any) or a checkpoint path
    save_final: bool = True  # at the end of a completed run (max_steps / max_tokens); other stops always save
    export_hf: bool = True  # write <run_dir>/hf (safetensors + config.json) at the end

    def __post_init__(self):
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0 (0: only at the end), got {self.every}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class LoggingConfig:
    log_every: int = 10
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "trainer"
    peak_flops: float | None = None  # per device, for MFU; default from a table by device name

    def __post_init__(self):
        if self.log_every < 1:
            raise ConfigError(f"logging.log_every must be >= 1, got {self.log_every}")
        if self.peak_flops is not None and not (math.isfinite(self.peak_flops) and self.peak_flops > 0):
            raise ConfigError(f"logging.peak_flops must be a finite number > 0 (one device's FLOP/s, e.g. 989.4e12), "
                              f"or left out for the table by device name; got {self.peak_flops}")


DDP_BUCKET_CAP_MB = 25.0  # torch's DistributedDataParallel default


@dataclass
class ParallelConfig:
    strategy: Literal["none", "ddp", "fsdp2"] = "none"
    # fsdp2: free each block's gathered parameters after forward (ZeRO-3), but the last block's;
    # the root's (embeddings, final norm, head) stay gathered until backward, which needs them first
    reshard_after_forward: bool = True
    # fsdp2: consecutive blocks per all-gather / reduce-scatter unit. FSDP2's hooks cost host time
    # per unit, so fewer, larger units make a host-bound step faster and each collective larger,
    # for the gathered parameters of more blocks alive at once (benchmarks/README.md, "FSDP2 units").
    fsdp_blocks_per_unit: int = 1
    # ddp: gradients all-reduced in buckets of this many MB (torch's default, 25). Under
    # compile_scope: model Dynamo splits the graph at every bucket (benchmarks/README.md).
    ddp_bucket_cap_mb: float = DDP_BUCKET_CAP_MB


@dataclass
class TrainConfig:
    model_config_path: str | None = None  # a model YAML (configs/model/*.yaml)
    init_from: str | None = None  # a Hugging Face checkpoint directory or one of our checkpoints
    data: DataConfig | None = None
    kernels: KernelConfig = field(default_factory=KernelConfig)
    compile: bool = False
    # default: Inductor kernels, launched from Python every step. reduce-overhead: the same kernels
    # replayed as CUDA graphs (one per block and direction), for steps whose GPU work is shorter
    # than their launch time (small batches or models); single GPU or DDP, not FSDP2 (with
    # gradient accumulation the trainer keeps persistent .grad buffers).
    # max-autotune(-no-cudagraphs): Inductor also times Triton templates against cuBLAS for each
    # matmul shape and keeps the fastest (minutes more compile).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"] = "default"
    # blocks: each transformer block (and the loss head) is its own compiled graph: compile time
    # flat in depth, and FSDP2 hooks each block. model: the whole forward is one graph, so
    # Inductor also fuses across block boundaries (a block's last residual add with the next
    # block's norm, the final norm, the loss head); single GPU or DDP, not FSDP2.
    compile_scope: Literal["blocks", "model"] = "blocks"
    # auto: the loss head (LM head + loss) is compiled, except with `kernels.cross_entropy: triton`,
    # whose backward writes the logits' gradient over the logits in place: a compiled graph
    # functionalizes that mutation, which could copy the (tokens, vocab) logits, so that head runs
    # eagerly between the graphs. always: compile it too (with compile_scope: model the whole step
    # is then one graph, and the tied-embedding pass applies to its gradient); measure it first.
    compile_loss_head: Literal["auto", "always"] = "auto"
    run_name: str = "run"
    output_dir: str = "runs"  # the run directory is output_dir/run_name
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=1000))
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dpo: DPOConfig | None = None  # train_dpo only: beta, loss_type, label_smoothing, reference, disable_dropout
    # Filled by load_config from model_config_path (or init_from); not a YAML key.
    model_config: Any = field(init=False, default=None)

    def __post_init__(self):
        if self.schedule.min_lr > self.optimizer.lr:
            raise ConfigError(f"schedule.min_lr ({self.schedule.min_lr}) is above optimizer.lr ({self.optimizer.lr}); "
                              "lower schedule.min_lr")
        if self.trainer.activation_memory_budget < 1.0 and not self.compile:
            raise ConfigError("trainer.activation_memory_budget is applied by torch.compile's partitioner; set "
                              "compile: true, or use trainer.activation_checkpointing without compile")
        if self.compile_loss_head != "auto" and not self.compile:
            raise ConfigError(f"compile_loss_head={self.compile_loss_head} chooses what torch.compile compiles; set "
                              "compile: true as well, or leave compile_loss_head at auto")
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(f"compile_mode={self.compile_mode} applies to compiled blocks; set compile: true as well, "
                              "or compile_mode: default to run without compile (--set compile_mode=default)")
        if self.parallel.strategy == "fsdp2" and (self.cuda_graphs or self.compile_scope == "model"):
            # one message for both settings, which the GPT-2 pretrain files set together
            problems, fixes = [], []
            if self.cuda_graphs:
                problems.append(f"compile_mode={self.compile_mode} (CUDA graphs) does not work with FSDP2's per-block "
                                "all-gathers (default and max-autotune-no-cudagraphs do)")
                fixes.append(("compile_mode", "default"))
            if self.compile_scope == "model":
                problems.append("compile_scope=model does not work with FSDP2, which gathers parameters block by "
                                "block between compiled graphs")
                fixes.append(("compile_scope", "blocks"))
            raise ConfigError("; ".join(problems) + "; set " + " and ".join(f"{k}: {v}" for k, v in fixes)
                              + " (" + " ".join(f"--set {k}={v}" for k, v in fixes) + "), or parallel.strategy ddp / none")
        if self.compile_scope != "blocks" and not self.compile:
            raise ConfigError(f"compile_scope={self.compile_scope} says what torch.compile compiles; set compile: true "
                              "as well, or compile_scope: blocks to run without compile (--set compile_scope=blocks)")
        if not (math.isfinite(self.parallel.ddp_bucket_cap_mb) and self.parallel.ddp_bucket_cap_mb > 0):
            raise ConfigError(f"parallel.ddp_bucket_cap_mb must be positive (and finite), "
                              f"got {self.parallel.ddp_bucket_cap_mb}")
        if self.parallel.ddp_bucket_cap_mb != DDP_BUCKET_CAP_MB and self.parallel.strategy != "ddp":
            raise ConfigError(f"parallel.ddp_bucket_cap_mb ({self.parallel.ddp_bucket_cap_mb}) sizes DDP's gradient "
                              f"buckets; strategy {self.parallel.strategy!r} has none: set parallel.strategy: ddp or "
                              f"leave it at {DDP_BUCKET_CAP_MB:g}")
        if self.optimizer.bf16_weight_copy and self.trainer.precision == "fp32":
            raise ConfigError("optimizer.bf16_weight_copy stands in for bf16 autocast's casts of the weights, and "
                              "trainer.precision is fp32; set trainer.precision: bf16 (or auto on CUDA), or drop "
                              "bf16_weight_copy")
        if self.optimizer.bf16_weight_copy and self.parallel.strategy == "fsdp2":
            raise ConfigError("optimizer.bf16_weight_copy does not apply under FSDP2, whose mixed precision already "
                              "gathers the weights in bf16; drop it, or use parallel.strategy ddp / none")
        if self.optimizer.bf16_grads and self.parallel.strategy != "none":
            raise ConfigError(f"optimizer.bf16_grads keeps the gradients in the weight copies, which "
                              f"parallel.strategy={self.parallel.strategy} does not reduce over ranks; drop bf16_grads, "
                              "or train in one process (parallel.strategy: none)")
        if self.optimizer.bf16_grads and self.trainer.grad_accum_steps > 1:
            raise ConfigError(f"optimizer.bf16_grads would sum the {self.trainer.grad_accum_steps} micro-batches' "
                              "gradients in bf16, rounding at every add; drop bf16_grads, or set "
                              "trainer.grad_accum_steps: 1 (a larger trainer.micro_batch_size instead)")
        if self.parallel.fsdp_blocks_per_unit < 1:
            raise ConfigError(f"parallel.fsdp_blocks_per_unit must be >= 1, got {self.parallel.fsdp_blocks_per_unit}")
        if self.parallel.fsdp_blocks_per_unit != 1 and self.parallel.strategy != "fsdp2":
            raise ConfigError(f"parallel.fsdp_blocks_per_unit ({self.parallel.fsdp_blocks_per_unit}) groups FSDP2's "
                              f"units; strategy {self.parallel.strategy!r} has none: set parallel.strategy: fsdp2 "
                              "or leave it at 1")
        if self.checkpoint.resume is not None and self.checkpoint.resume != "auto" and self.init_from is not None:
            raise ConfigError("checkpoint.resume continues a run and init_from starts a new one; set only one of them")

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compile mode replays the compiled graphs as CUDA graphs."""
        return self.compile_mode in ("reduce-overhead", "max-autotune")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.run_name)


def is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load_config(
    path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), task: str | None = None,
    resume: str | None = None,
) -> TrainConfig:
    """Read and check a train YAML (plus `key.sub=value` overrides) and the model config it names.
    `task` (pretrain | sft | dpo) checks the blocks that belong to one task. `resume` (the command
    line's --resume: auto or a checkpoint path) sets checkpoint.resume as given: unlike a --set
    value it is not read as YAML, which would cut a path at ' #' or turn 'a: b' into a mapping."""
    where = os.fspath(path)
    data = apply_overrides(read_yaml(where), list(overrides))
    if resume is not None:
        checkpoint = data.setdefault("checkpoint", {})
        if not isinstance(checkpoint, dict):
            raise ConfigError(f"{where}: 'checkpoint' holds {checkpoint!r}, not a mapping")
        checkpoint["resume"] = resume
    cfg = from_dict(TrainConfig, data, where=where)
    if cfg.data is None:
        raise ConfigError(f"{where}: missing the 'data:' block (type, path, tokenizer); see configs/train/pretrain.yaml")
    if task is not None and task != "dpo" and cfg.dpo is not None:
        raise ConfigError(f"{where}: the 'dpo:' block applies to src.train_dpo only; remove it for {task}")
    if task is not None:  # fields of the data block that this task does not read, before any model is built
        try:
            cfg.data.check_task(task)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
    if task == "dpo" and cfg.dpo is None:
        cfg.dpo = DPOConfig()
    if task == "dpo" and cfg.compile_scope == "model":
        raise ConfigError(f"{where}: compile_scope=model compiles one causal LM's forward; DPO runs a policy and a "
                          "reference, compiled per block: set compile_scope: blocks")
    cfg.model_config = resolve_model_config(cfg, where)
    check_combinations(cfg, where)
    return cfg


def resolve_model_config(cfg: TrainConfig, where: str):
    """The model's shape: the model YAML, or the config.json of a Hugging Face `init_from`."""
    from src.models import MODEL_FAMILIES
    from src.models.modeling_utils import read_hf_config

    if cfg.init_from is not None and not os.path.exists(cfg.init_from):
        raise ConfigError(f"{where}: init_from '{cfg.init_from}' does not exist (a Hugging Face directory with "
                          "config.json, or a checkpoint directory of ours)")
    if cfg.init_from is not None and is_hf_dir(cfg.init_from):
        hf = read_hf_config(cfg.init_from)
        family = hf.get("model_type")
        if family not in MODEL_FAMILIES:
            raise ConfigError(f"{where}: init_from '{cfg.init_from}' holds a '{family}' model; "
                              f"supported: {sorted(MODEL_FAMILIES)}")
        hf_config = MODEL_FAMILIES[family][0].from_hf_config(hf, source=os.path.join(cfg.init_from, "config.json"))
        if cfg.model_config_path is not None:
            own = load_model_config(cfg.model_config_path)
            if not same_model(own, hf_config):
                raise ConfigError(f"{where}: model_config_path '{cfg.model_config_path}' describes another model than "
                                  f"init_from '{cfg.init_from}'; remove model_config_path (the checkpoint's "
                                  "config.json gives the shape)")
        return hf_config
    if cfg.model_config_path is None:
        raise ConfigError(f"{where}: set model_config_path (a model YAML such as configs/model/gpt_125m.yaml)"
                          + (" ; init_from names one of our checkpoints, which needs it" if cfg.init_from else ""))
    return load_model_config(cfg.model_config_path)


# The end-token ids are no part of a model's shape: a model YAML without them takes the training
# tokenizer's, which its export and checkpoints then name (`same_model`, checkpoint.check_model_matches).
TOKEN_IDS = ("bos_token_id", "eos_token_id")


def same_model(a, b) -> bool:
    """Whether two model configs describe one model: compared as the Hugging Face config.json each
    exports, where a YAML's shorthands (Qwen2's ffn_multiplier, GPT-2's `dropout` for its three
    rates) and the export's explicit values (intermediate_size, embd_pdrop, ...) read the same."""
    if a == b:
        return True
    try:
        exported = [a.to_hf_config(), b.to_hf_config()]
    except ValueError:  # a model Hugging Face's format cannot hold (e.g. Qwen2 without qkv biases)
        return False
    shape_a, shape_b = ({k: v for k, v in hf.items() if k not in TOKEN_IDS} for hf in exported)
    return shape_a == shape_b


def tokens_per_step(cfg: TrainConfig, world_size: int) -> int:
    """The tokens of one optimizer step over all ranks, the unit trainer.max_tokens is counted in: a
    DPO row is two sequences (chosen and rejected, each padded to seq_len), and the trainer counts
    both, as the model reads both."""
    t = cfg.trainer
    sequences_per_row = 2 if cfg.dpo is not None else 1
    return t.micro_batch_size * sequences_per_row * t.seq_len * t.grad_accum_steps * world_size


def run_length(cfg: TrainConfig, world_size: int, step: int = 0, tokens: int = 0) -> int:
    """The run's length in optimizer steps: trainer.max_steps, or fewer when trainer.max_tokens comes
    first. A resumed run passes the step and tokens it stands at: the tokens still to train are
    divided by this run's tokens per step, which may differ from the saving run's (other ranks or
    batch), so that the run ends at max_tokens whatever it resumed from."""
    t = cfg.trainer
    steps = [t.max_steps] if t.max_steps is not None else []
    if t.max_tokens is not None:
        steps.append(step + math.ceil(max(0, t.max_tokens - tokens) / tokens_per_step(cfg, world_size)))
    return min(steps)


def check_warmup(cfg: TrainConfig, world_size: int, where: str) -> None:
    """A cosine or wsd schedule must end its warmup before the run ends."""
    t, warmup = cfg.trainer, cfg.schedule.warmup_steps
    length = run_length(cfg, world_size)
    if cfg.schedule.type == "constant" or warmup < length:
        return
    if length == t.max_steps:
        raise ConfigError(f"{where}: schedule.warmup_steps ({warmup}) must be below trainer.max_steps ({t.max_steps})")
    pairs = " x 2 (a DPO pair)" if cfg.dpo is not None else ""
    raise ConfigError(f"{where}: schedule.warmup_steps ({warmup}) must be below the run's length, {length} step(s) "
                      f"(trainer.max_tokens {t.max_tokens} at {tokens_per_step(cfg, world_size)} tokens per step: "
                      f"micro_batch_size{pairs} x seq_len x grad_accum_steps x {world_size} rank(s)); lower "
                      "schedule.warmup_steps or raise trainer.max_tokens")


def check_combinations(cfg: TrainConfig, where: str) -> None:
    t = cfg.trainer
    block_size = getattr(cfg.model_config, "block_size", None)
    if block_size is not None and t.seq_len > block_size and cfg.model_config.model_family == "gpt2":
        raise ConfigError(f"{where}: trainer.seq_len ({t.seq_len}) exceeds the model's block_size ({block_size}), "
                          "the length of GPT-2's learned position table; lower trainer.seq_len")
    # With one process: a max_tokens run is longest there (more ranks take more tokens per step),
    # so this is the check that holds everywhere; the Trainer repeats it with its number of ranks.
    check_warmup(cfg, world_size=1, where=where)
    if t.eval_every and cfg.data is not None and not cfg.data.val_fraction and not cfg.data.val_documents \
            and cfg.data.type != "shards":
        raise ConfigError(f"{where}: trainer.eval_every={t.eval_every} needs a validation split: set "
                          "data.val_fraction (local) or data.val_documents (streaming), or trainer.eval_every=0")
