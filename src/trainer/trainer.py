"""The generic training engine: the same loop for pretraining, SFT and DPO.

The trainer never knows the task: a batch is a dict of CPU tensors, and `model(**batch).loss`
is the loss. What it owns is everything around that call:

- gradient accumulation over `grad_accum_steps` micro-batches, with the gradient all-reduce
  (DDP `no_sync`) or reduce-scatter (FSDP2 `set_requires_gradient_sync`) only on the last one;
  the loss is normalised over the whole step and all ranks (each micro-batch weighted by its
  supervised tokens), so accumulation and data parallelism give the loss of one large batch;
- bf16: autocast (single device, DDP) or FSDP2's MixedPrecisionPolicy (bf16 parameters in
  compute, fp32 gradient reduction); fp32 on the CPU;
- clipping, the optimizer and the LR schedule; a step with a NaN/Inf gradient norm is skipped
  (no update) and counted, and too many in a row stop the run with a checkpoint;
- evaluation, logging and checkpoints every N steps; step / token / time budgets; SIGTERM,
  SIGINT and the time budget save a checkpoint and stop cleanly; the final model is exported in
  HF format.

Host syncs (`.item()`) happen only at logging, evaluation and checkpoint steps, so the CPU runs
ahead of the GPU through every other step. Stop decisions that must agree across ranks (time
budget, signals) travel over a CPU gloo group, which never waits for the GPU.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import signal
import time
from typing import Any, Iterable

import torch
from torch import nn

from kernels import gemm_picks_state, restore_gemm_picks
from src.models.components import gradient_copies, refresh_weight_copies, weight_copies
from src.utils.config import to_dict
from src.utils.distributed import DistInfo, all_reduce_sum, any_rank, broadcast_object, min_over_ranks, sum_over_ranks
from src.utils.logger import MetricsLogger
from src.utils.misc import format_count, new_run_id, peak_flops, rng_state, seed_everything, set_rng_state

from .checkpoint import CheckpointManager, export_hf
from .config import TrainConfig, check_warmup, run_length, tokens_per_step
from .optimizer import (
    LRSchedule, TritonAdamW, build_optimizer, clip_coefficient, clip_grads_, gradient_of, set_lr, total_grad_norm,
)
from .parallelize import prepare_model

IGNORE_INDEX = -100


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def supervised_count(batch: dict[str, torch.Tensor]) -> int:
    """The weight of a micro-batch in the step's loss: its supervised tokens (labels != -100), or,
    for batches without `labels` (e.g. preference pairs), its number of rows. Computed on the
    CPU tensors the loader yields, so it costs no device sync."""
    labels = batch.get("labels")
    if labels is not None:
        return int((labels != IGNORE_INDEX).sum())
    return int(next(iter(batch.values())).shape[0])


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the model reads in this batch (every `*input_ids` tensor, padding included)."""
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        train_loader: Iterable[dict[str, torch.Tensor]],
        val_loader: Iterable[dict[str, torch.Tensor]] | None,
        info: DistInfo,
    ):
        self.cfg = cfg
        self.info = info
        self.device = info.device
        t = cfg.trainer
        if info.world_size > 1:  # load_config checked one process's run, the longest a max_tokens budget gives
            check_warmup(cfg, info.world_size, where="train config")
        self.bf16 = resolve_precision(t.precision, info.device) == "bf16"
        self.sharded = cfg.parallel.strategy == "fsdp2"
        self.model, self.bare = prepare_model(model, cfg, info, bf16=self.bf16)
        # The loop reads only the loss: a causal LM is asked for no logits, which frees them after
        # backward instead of at the end of the step, and keeps a compiled in-place loss head (the
        # Triton cross-entropy writes the logits' gradient over them) from returning its buffer.
        self.forward_kwargs = {"return_logits": False} if hasattr(self.bare, "lm_output") else {}
        # {weight: bf16 copy} (optimizer.bf16_weight_copy): our AdamW writes them with its update;
        # after torch's AdamW, or a checkpoint load, they are copied from the weights.
        self.weight_copies = weight_copies(self.bare)
        # {weight: copy} of the weights whose gradients land in their copies in bf16 (optimizer.bf16_grads)
        self.gradient_copies = gradient_copies(self.bare)
        self.optimizer = build_optimizer(self.bare, cfg.optimizer, self.device, weight_copies=self.weight_copies,
                                         gradient_copies=self.gradient_copies)
        # Optimizers that read `found_inf` on the device (no host sync to skip a non-finite step);
        # ours also takes the clip coefficient as `grad_scale` instead of a clipping pass.
        self.scales_grads = isinstance(self.optimizer, TritonAdamW)
        self.fused_optimizer = self.scales_grads or bool(self.optimizer.defaults.get("fused"))
        # The copies torch's AdamW leaves stale: those of the weights it updates (a frozen weight's
        # copy, e.g. DPO's live reference, stays right from the start).
        self.copies_to_refresh = {} if self.scales_grads else {
            weight: copy for weight, copy in self.weight_copies.items() if weight.requires_grad}
        # CUDA graphs replay into memory their pool owns. A gradient that a backward graph returns
        # would become a parameter's .grad and be overwritten by the next micro-batch's replay
        # (seen on an H100). Gradient buffers allocated once and zeroed after each step make
        # autograd add every micro-batch's gradient into them in place instead.
        self.persistent_grads = cfg.cuda_graphs and t.grad_accum_steps > 1
        if self.persistent_grads:
            for p in self.bare.parameters():
                if p.requires_grad:
                    p.grad = torch.zeros_like(p)
        self.train_loader = train_loader
        self.val_loader = val_loader

        self.nominal_tokens_per_step = tokens_per_step(cfg, info.world_size)
        self.flops_per_token = self.bare.flops_per_token(t.seq_len)
        self.peak_flops = peak_flops(self.device, cfg.logging.peak_flops)

        # Progress. Counters the step updates live on the device (read only when logging).
        self.step = 0
        self.tokens = 0
        self.skipped = torch.zeros((), dtype=torch.long, device=self.device)
        self.nonfinite_in_row = torch.zeros((), dtype=torch.long, device=self.device)
        # The longest streak of non-finite steps since the last log, which compares it with the
        # limit: a streak that ended between two logs must stop the training too.
        self.longest_nonfinite = torch.zeros((), dtype=torch.long, device=self.device)
        self.nonfinite_streak = 0  # the streak that stopped the training (read at a log)
        self.history: list[dict[str, Any]] = []  # every logged row (train and val), on every rank
        self._last_saved_step = -1
        self._signal: int | None = None

        self.ckpt = CheckpointManager(os.path.join(cfg.run_dir, "checkpoints"), info, cfg.checkpoint.keep_last)
        seed_everything(t.seed + info.rank)  # dropout differs across ranks; model init happened before
        meta, resumed_from = self._resume(cfg.checkpoint.resume)  # meta: {} for a new run
        # The run's length once the checkpoint says where the run stands: a max_tokens budget
        # counts the tokens still to train at this run's tokens per step, which may differ from
        # the saving run's.
        self.total_steps = run_length(cfg, info.world_size, self.step, self.tokens)
        self.schedule = LRSchedule(cfg.schedule, cfg.optimizer.lr, self.total_steps)
        saved_total = meta.get("schedule", {}).get("total_steps")
        if saved_total is not None and saved_total != self.total_steps and info.is_rank0:
            print(f"warning: the checkpoint's LR schedule spans {saved_total} steps, this run {self.total_steps}; "
                  "the learning rate continues on the new schedule", flush=True)
        self.run_id = broadcast_object(info, meta.get("run_id") or new_run_id())
        self.logger = MetricsLogger(
            cfg.run_dir,
            info.is_rank0,
            self.run_id,
            wandb_mode=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            run_name=cfg.run_name,
            config=to_dict(cfg),
        )
        n_params = self.bare.num_parameters()
        compiled = "off" if not cfg.compile else cfg.compile_mode
        if cfg.compile and cfg.compile_scope == "model":
            compiled += ", whole model"
        if cfg.compile and cfg.trainer.activation_memory_budget < 1.0:
            compiled += f", memory budget {cfg.trainer.activation_memory_budget:g}"
        precision = "bf16" if self.bf16 else "fp32"
        if self.bf16 and cfg.trainer.residual_dtype == "bf16":
            precision += ", bf16 residual stream"
        if self.weight_copies:
            precision += f", bf16 copies of {len(self.weight_copies)} weights"
        if self.gradient_copies:
            precision += f" ({len(self.gradient_copies)} with bf16 gradients)"
        self.logger.info(
            f"model {type(self.bare).__name__} {format_count(n_params)} parameters | {info.world_size} x {self.device.type} | "
            f"strategy {cfg.parallel.strategy} | {precision} | compile {compiled} | "
            f"{self.total_steps} steps x {self.nominal_tokens_per_step} tokens | run {cfg.run_dir} (id {self.run_id})"
        )
        if cfg.optimizer.bf16_weight_copy and not self.weight_copies:
            self.logger.info(f"optimizer.bf16_weight_copy is off for this run: it computes in fp32 (trainer.precision "
                             f"{t.precision} on {self.device.type}), with no bf16 casts of the weights to replace")
        if resumed_from:
            self.logger.info(f"resumed from {resumed_from} at step {self.step} ({self.tokens} tokens)")

    # -- resume --------------------------------------------------------------------------------

    def _resume(self, resume: str | None) -> tuple[dict[str, Any], str | None]:
        """Load the checkpoint `resume` names, if any: returns (its meta, its path), or ({}, None)."""
        path = self.ckpt.resolve(resume)
        if path is None:
            moved, folder = self.ckpt.set_aside_earlier_run(self.cfg.run_dir)
            if moved:  # rank 0 only
                print(f"{self.cfg.run_dir} held an earlier run and this one starts without --resume: moved "
                      f"{', '.join(moved)} to {folder} (kept there; --resume auto would have continued it)", flush=True)
            return {}, None
        meta, rank_state = self.ckpt.load(path, self.model, self.optimizer, self.bare.config)
        refresh_weight_copies(self.weight_copies)  # the loaded weights, not the initial ones
        self.step = int(meta["step"])
        self.tokens = int(meta["tokens"])
        self.skipped.fill_(int(meta.get("skipped_steps", 0)))
        moved, folder = self.ckpt.set_aside_newer_than(self.step)
        if moved:  # rank 0 only
            print(f"{path} (step {self.step}) is older than this run's newest checkpoint: moved {', '.join(moved)} "
                  f"to {folder} (kept there, out of rotation and --resume auto)", flush=True)
        if rank_state is not None:
            if rank_state.get("data") is not None and hasattr(self.train_loader, "load_state_dict"):
                self.train_loader.load_state_dict(rank_state["data"])
            set_rng_state(rank_state["rng"])
            self._restore_gemm_picks(rank_state.get("gemm_picks"), path)
        elif self.info.is_rank0:
            print(f"warning: {path} was written by {meta.get('world_size')} rank(s), this run has "
                  f"{self.info.world_size}: model and optimizer resume exactly, the data order restarts", flush=True)
        self._last_saved_step = self.step
        return meta, path

    def _restore_gemm_picks(self, state: dict | None, path: str) -> None:
        """The GEMM kernels the saved run chose by timing (`kernels.linear: tuned`, cuBLASLt's
        epilogue GEMMs), so that this run computes in the same summation order. Without them (a
        checkpoint of an older version) or with unreadable ones, the GEMMs are timed again: the run
        goes on, possibly on other kernels than the saved run's, equal to rounding."""
        if state is None:
            return
        try:
            restore_gemm_picks(state)
        except ValueError as e:
            print(f"warning: rank {self.info.rank}: {path}: the GEMM picks are not usable ({e}); the GEMMs are "
                  "timed again, so results may differ from the saved run's in the last bits", flush=True)

    # -- one optimizer step --------------------------------------------------------------------

    def _autocast(self):
        if self.bf16 and not self.sharded:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _grad_sync(self, sync: bool):
        """Reduce gradients across ranks only on the last micro-step of a step."""
        if self.sharded:
            self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if not sync and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Forward/backward over the micro-batches, clip, update. Returns device tensors
        (this rank's share of the step loss, the gradient norm, whether the step was applied).
        Metrics a model returns beside its loss (`output.metrics`, e.g. DPO rewards) are averaged
        the same way into `self.step_metrics`."""
        counts = [supervised_count(b) for b in batches]  # host-side: the batches are still on the CPU
        # Supervised tokens of the whole step over all ranks, summed on the host (gloo): building a
        # CUDA tensor from a Python number here would synchronise the GPU once per step.
        total = sum_over_ranks(self.info, float(sum(counts)))
        # Gradient reduction averages over ranks, hence world_size: sum of weights over ranks = world_size.
        scale = self.info.world_size / max(total, 1.0)
        step_loss = torch.zeros((), device=self.device)
        self.step_metrics: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            weight = counts[i] * scale
            with self._grad_sync(last):
                with self._autocast():
                    output = self.model(**self._to_device(batch), **self.forward_kwargs)
                weighted = output.loss.float() * weight
                weighted.backward()
            step_loss += weighted.detach()
            for name, value in (getattr(output, "metrics", None) or {}).items():
                self.step_metrics[name] = self.step_metrics.get(name, 0.0) + value.detach().float() * weight

        max_norm = self.cfg.optimizer.grad_clip if self.cfg.optimizer.grad_clip > 0 else float("inf")
        grads = [g for g in map(self.gradient_of, self.bare.parameters()) if g is not None]
        grad_norm = total_grad_norm(grads)  # FSDP2: from the local shards, one all-reduce
        if self.scales_grads:  # multiplied in as the optimizer reads the gradients
            self.optimizer.grad_scale = clip_coefficient(max_norm, grad_norm)
        elif max_norm != float("inf"):
            clip_grads_(grads, max_norm, grad_norm)
        finite = torch.isfinite(grad_norm)  # the same on every rank: gradients are reduced
        if self.fused_optimizer:
            # The fused kernel skips the whole update (and the step count) when found_inf != 0,
            # on the device: no sync.
            self.optimizer.found_inf = (~finite).float()
            self.optimizer.step()
        elif bool(finite):  # the multi-tensor path has no found_inf; on the CPU this read is free
            self.optimizer.step()
        refresh_weight_copies(self.copies_to_refresh)  # torch's AdamW does not write the bf16 copies
        self.optimizer.zero_grad(set_to_none=not self.persistent_grads)  # TritonAdamW: the copies' gradients too
        self.skipped += (~finite).long()
        self.nonfinite_in_row = torch.where(finite, torch.zeros_like(self.nonfinite_in_row), self.nonfinite_in_row + 1)
        self.longest_nonfinite = torch.maximum(self.longest_nonfinite, self.nonfinite_in_row)
        return torch.where(finite, step_loss, torch.zeros_like(step_loss)), grad_norm, finite

    def gradient_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """`p`'s gradient: in its bf16 copy under optimizer.bf16_grads, else `p.grad`."""
        return gradient_of(p, self.gradient_copies)

    # -- the loop ------------------------------------------------------------------------------

    def _next_batch(self) -> dict[str, torch.Tensor]:
        try:
            return next(self._data_iter)
        except StopIteration:  # a finite train loader: start its next pass
            self._data_iter = iter(self.train_loader)
            return next(self._data_iter)

    def _on_signal(self, signum, frame):
        # A second Ctrl-C (SIGINT) stops now, without a checkpoint. A repeated SIGTERM does not:
        # launchers send it more than once (a scheduler signals torchrun and its workers, and torchrun
        # forwards its own to every worker), and exiting on the second would lose the checkpoint
        # the first one asked for.
        if self._signal is not None and signum == signal.SIGINT:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self._signal is None:
            self._signal = signum

    def _stop_reason(self, until_step: int | None, started: float) -> str | None:
        t = self.cfg.trainer
        if self.step >= self.total_steps:
            return "max_tokens" if t.max_steps is None or self.step < t.max_steps else "max_steps"
        if until_step is not None and self.step >= until_step:
            return "until_step"
        out_of_time = t.max_time_minutes is not None and time.time() - started >= 60 * t.max_time_minutes
        if any_rank(self.info, out_of_time or self._signal is not None):
            # The signal of whichever rank got one (the largest number), so that every rank logs it.
            signum = -min_over_ranks(self.info, -(self._signal or 0))
            if signum:
                self._signal = signum
            return "signal" if signum else "max_time"
        return None

    def fit(self, until_step: int | None = None) -> str:
        """Train until a budget is reached (or `until_step`, which stops early with a checkpoint,
        keeping the schedule of the full run). Returns why training stopped."""
        handlers = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                handlers[sig] = signal.signal(sig, self._on_signal)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        gc_every = self.cfg.trainer.gc_every
        if gc_every:
            gc.collect()
            gc.disable()  # collected every gc_every steps in the loop instead
        try:
            try:
                reason = self._loop(until_step)
            finally:
                if gc_every:
                    gc.enable()
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)
            self._finish(reason)
        finally:  # also when training raises: metrics.jsonl closed and the wandb run finished
            self.logger.close()
        return reason

    def _loop(self, until_step: int | None) -> str:
        t, log_every = self.cfg.trainer, self.cfg.logging.log_every
        self.model.train()
        self._data_iter = iter(self.train_loader)
        started = time.time()
        window = {"loss": torch.zeros((), device=self.device), "applied": torch.zeros((), device=self.device),
                  "metrics": {}, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
        grad_norm = torch.zeros((), device=self.device)
        while True:
            reason = self._stop_reason(until_step, started)
            if reason is not None:
                if window["steps"] and self._log(window, grad_norm):
                    return "nonfinite"
                return reason
            batches = [self._next_batch() for _ in range(t.grad_accum_steps)]
            set_lr(self.optimizer, self.schedule.lr_at(self.step))
            step_loss, grad_norm, applied = self.train_step(batches)
            step_tokens = sum(batch_tokens(b) for b in batches) * self.info.world_size
            self.step += 1
            self.tokens += step_tokens
            window["loss"] += step_loss
            for name, value in self.step_metrics.items():
                window["metrics"][name] = window["metrics"].get(name, 0.0) + torch.where(applied, value, 0.0)
            window["applied"] += applied.float()
            window["steps"] += 1
            window["tokens"] += step_tokens

            if t.gc_every and self.step % t.gc_every == 0:
                gc.collect(1)  # the young generations only: milliseconds, at the same step on every rank
            if self.step % log_every == 0:
                if self._log(window, grad_norm):
                    return "nonfinite"
            if t.eval_every and self.step % t.eval_every == 0:
                self._off_the_clock(window, self.evaluate)
            if self.cfg.checkpoint.every and self.step % self.cfg.checkpoint.every == 0:
                self._off_the_clock(window, self.save_checkpoint)

    def _off_the_clock(self, window: dict[str, Any], work) -> None:
        """Run `work` (an evaluation, a checkpoint) outside the logging window's time, so that its
        tokens/s, MFU and ETA measure training only."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the training steps queued so far belong to the window
        start = time.perf_counter()
        work()
        window["t0"] += time.perf_counter() - start

    def _log(self, window: dict[str, Any], grad_norm: torch.Tensor) -> bool:
        """Write the progress line for the window since the last log; True when a streak of
        non-finite steps in it reached the limit."""
        names = sorted(window["metrics"])
        sums = all_reduce_sum(self.info, torch.stack([window["loss"]] + [window["metrics"][n] for n in names]))
        # The host syncs of this logging step (`applied` is the same on every rank).
        sums, applied = sums.tolist(), window["applied"].item()
        loss_sum = sums[0]
        now = time.perf_counter()
        dt = max(now - window["t0"], 1e-9)
        tokens_per_s = window["tokens"] / dt
        metrics = {
            "loss": loss_sum / self.info.world_size / applied if applied else float("nan"),
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s,
            "tokens": float(self.tokens),
            "max_steps": float(self.total_steps),
            "skipped_steps": float(self.skipped),
            "eta_s": (self.total_steps - self.step) * dt / window["steps"],
        }
        for name, value in zip(names, sums[1:]):
            metrics[name] = value / self.info.world_size / applied if applied else float("nan")
        if self.peak_flops:
            metrics["mfu"] = tokens_per_s * self.flops_per_token / (self.peak_flops * self.info.world_size)
        if self.device.type == "cuda":
            metrics["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.logger.log_metrics(self.step, metrics, prefix="train")
        self.history.append({"step": self.step, "split": "train", **metrics})
        window.update(loss=torch.zeros_like(window["loss"]), applied=torch.zeros_like(window["applied"]),
                      metrics={}, steps=0, tokens=0, t0=time.perf_counter())
        longest = int(self.longest_nonfinite)
        self.longest_nonfinite = self.nonfinite_in_row.clone()  # a streak still going on counts in the next window
        if longest >= self.cfg.trainer.max_nonfinite_steps:
            self.nonfinite_streak = longest
            return True
        return False

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over up to `eval_batches` validation batches (the same batches every time)."""
        if self.val_loader is None:
            return None
        n = self.cfg.trainer.eval_batches
        if hasattr(self.val_loader, "__len__"):
            n = min(n, len(self.val_loader))
        n = min_over_ranks(self.info, n)  # every rank runs the same number of forwards (FSDP2 collectives)
        self.model.eval()
        sums = torch.zeros(2, device=self.device)  # (weighted loss, weight)
        for _, batch in zip(range(n), iter(self.val_loader)):
            count = supervised_count(batch)
            with self._autocast():
                loss = self.model(**self._to_device(batch), **self.forward_kwargs).loss
            sums[0] += loss.float() * count
            sums[1] += count
        self.model.train()
        all_reduce_sum(self.info, sums)
        loss_sum, weight = sums.tolist()
        val_loss = loss_sum / weight if weight else float("nan")
        metrics = {"loss": val_loss, "batches": float(n)}
        if self.cfg.dpo is None:  # a perplexity of the LM loss; DPO's loss is no log-likelihood
            metrics["ppl"] = math.exp(min(val_loss, 50.0))
        self.logger.log_metrics(self.step, metrics, prefix="val")
        self.history.append({"step": self.step, "split": "val", **metrics})
        return val_loss

    # -- checkpoints and the end of the run -----------------------------------------------------

    def save_checkpoint(self) -> str:
        meta = {
            "tokens": self.tokens,
            "skipped_steps": int(self.skipped),
            "schedule": self.schedule.state_dict(),
            "run_id": self.run_id,
            "config": to_dict(self.cfg),
            "model_config": to_dict(self.bare.config),
        }
        data_state = self.train_loader.state_dict() if hasattr(self.train_loader, "state_dict") else None
        rank_state = {"data": data_state, "rng": rng_state(), "gemm_picks": gemm_picks_state()}
        path = self.ckpt.save(self.step, self.model, self.optimizer, meta, rank_state)
        self._last_saved_step = self.step
        self.logger.info(f"saved checkpoint {path}")
        return path

    def _finish(self, reason: str) -> None:
        # checkpoint.save_final applies to a completed run only. A time budget is a pause, like a
        # signal: without its checkpoint the work since the last one would be lost.
        completed = reason in ("max_steps", "max_tokens")
        if self.step != self._last_saved_step and (not completed or self.cfg.checkpoint.save_final):
            self.save_checkpoint()
        if reason == "nonfinite":
            raise FloatingPointError(
                f"stopped at step {self.step}: {self.nonfinite_streak} steps in a row had a NaN/Inf loss or "
                f"gradient norm (trainer.max_nonfinite_steps={self.cfg.trainer.max_nonfinite_steps}). A checkpoint "
                "of the last good weights was saved; lower optimizer.lr, raise schedule.warmup_steps or check the data"
            )
        if reason == "signal":
            self.logger.info(f"stopped by signal {self._signal} at step {self.step}; continue with --resume auto")
            return
        if reason == "until_step":
            return
        if reason == "max_time":
            self.logger.info(f"stopped: trainer.max_time_minutes reached at step {self.step} ({self.tokens} tokens); "
                             "continue with --resume auto")
        else:
            self.logger.info(f"done: {reason} at step {self.step} ({self.tokens} tokens)")
        if self.cfg.checkpoint.export_hf:
            path = os.path.join(self.cfg.run_dir, "hf")
            export_hf(self.model, self.bare, path, self.info, sharded=self.sharded)
            self.logger.info(f"exported the model in Hugging Face format to {path}")
