"""Sharded, atomic, resumable checkpoints, and the Hugging Face export of the final model.

A checkpoint is a directory `<run_dir>/checkpoints/step_00001000/` holding

    .metadata, __*_*.distcp    model and optimizer state, sharded by torch.distributed.checkpoint
                               (each rank writes its own shards; loading reshards, so a
                               checkpoint of 2 ranks resumes on 1 or on 8)
    rank_00000.pt ...          per rank: the data-loader position, the RNG states and the GEMM
                               kernels picked by timing (kernels.gemm_picks_state)
    meta.json                  step, tokens seen, the LR schedule, world size, the train and
                               model configs, the metrics-run id (written last)

Writes go to `.tmp_step_00001000/`, which rank 0 renames into place once every rank has
finished and meta.json is on disk: a crash mid-save leaves a `.tmp_*` directory that is never
read (and is removed by the next save), so the last complete checkpoint stays the newest.

The checkpoints of a run directory are one line of training, ranked by step: a start without
--resume moves an earlier run's checkpoints (and metrics.jsonl) into `checkpoints/superseded/`,
and a resume from an older checkpoint moves the newer ones there (kept, never deleted), out of the
way of rotation and of `--resume auto`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from src.utils.config import to_dict
from src.utils.distributed import DistInfo, barrier, broadcast_object

from .config import TOKEN_IDS

FORMAT_VERSION = 1
META_NAME = "meta.json"
PREFIX = "step_"
TMP_PREFIX = ".tmp_"
SUPERSEDED = "superseded"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def rank_file_name(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """Complete checkpoints (renamed into place, with meta.json), oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if name.startswith(PREFIX) and os.path.isfile(os.path.join(path, META_NAME)):
            try:
                found.append((int(name[len(PREFIX):]), path))
            except ValueError:
                continue
    return [path for _, path in sorted(found)]


def read_meta(path: str) -> dict[str, Any]:
    meta_file = os.path.join(path, META_NAME)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist; give a step_* directory or --resume auto")
    if not os.path.isfile(meta_file):
        raise CheckpointError(
            f"'{path}' is not a complete checkpoint (no {META_NAME}); it may be an interrupted save or another "
            "kind of directory. Give a step_* directory under <run_dir>/checkpoints, or --resume auto"
        )
    with open(meta_file, encoding="utf-8") as f:
        return json.load(f)


def check_model_matches(meta: dict[str, Any], model_config: Any, path: str) -> None:
    """A checkpoint of another model shape is an error naming the fields that differ. The special
    token ids are no part of the shape (they follow the tokenizer when a model YAML leaves them out)."""
    saved = meta.get("model_config", {})
    current = json.loads(json.dumps(to_dict(model_config), default=_json_default))  # as meta.json holds it
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k) and k not in TOKEN_IDS]
    if diffs:
        raise CheckpointError(
            f"checkpoint '{path}' holds another model than this config describes ({'; '.join(diffs)}). "
            "Point model_config_path at the model the checkpoint was trained with, or start a new run_name"
        )


@contextlib.contextmanager
def _gradients_set_aside(optimizer: torch.optim.Optimizer):
    """torch's get_state_dict / set_state_dict give an optimizer without state its state (an lr-0
    step on zero gradients) only when no parameter has a `.grad`. The trainer's persistent gradient
    buffers (CUDA graphs with accumulation) would make them skip that, and a load then found no
    state to load into and left AdamW's moments empty. The buffers are put back unchanged after."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield
    finally:
        for p, grad in zip(params, grads):
            p.grad = grad


@contextlib.contextmanager
def _single_process_ok():
    """DCP warns that it assumes a single process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    def __init__(self, ckpt_dir: str, info: DistInfo, keep_last: int):
        self.ckpt_dir = ckpt_dir
        self.info = info
        self.keep_last = keep_last

    def latest(self) -> str | None:
        found = list_checkpoints(self.ckpt_dir)
        return found[-1] if found else None

    def set_aside_newer_than(self, step: int) -> tuple[list[str], str | None]:
        """Move this run's checkpoints of later steps than `step` (the one just resumed from) into
        `superseded/<time>_resumed_at_step_N/` (rank 0; a collective). They belong to the line of
        training the resume abandons: left in place they would outrank the new checkpoints in
        rotation (which would delete the new ones) and in --resume auto. Returns (their names, the
        folder) on rank 0."""
        return self._set_aside(lambda s: s > step, f"resumed_at_{step_dir_name(step)}")

    def set_aside_earlier_run(self, run_dir: str) -> tuple[list[str], str | None]:
        """A new run (no resume) in a run directory that holds an earlier run's checkpoints: those,
        and its metrics.jsonl, move into `superseded/<time>_before_a_new_run/` (kept, never deleted),
        so that the new run's checkpoints are not ranked with them by rotation and --resume auto, nor
        its rows appended to theirs. Returns (the names moved, the folder) on rank 0."""
        moved, folder = self._set_aside(lambda s: True, "before_a_new_run")
        metrics = os.path.join(run_dir, "metrics.jsonl")
        if self.info.is_rank0 and folder is not None and os.path.isfile(metrics):
            os.rename(metrics, os.path.join(folder, "metrics.jsonl"))
            moved.append("metrics.jsonl")
        barrier(self.info)
        return moved, folder

    def _set_aside(self, which_steps, label: str) -> tuple[list[str], str | None]:
        moved, folder = [], None
        if self.info.is_rank0:
            chosen = [path for path in list_checkpoints(self.ckpt_dir)
                      if which_steps(int(os.path.basename(path)[len(PREFIX):]))]
            if chosen:
                folder = self._new_superseded_folder(label)
                for path in chosen:
                    os.rename(path, os.path.join(folder, os.path.basename(path)))
                    moved.append(os.path.basename(path))
                _fsync_dir(self.ckpt_dir)
        barrier(self.info)
        return moved, folder

    def _new_superseded_folder(self, label: str) -> str:
        """`superseded/<time>_<label>[_k]/`: a new folder each time, so nothing set aside earlier is
        ever overwritten."""
        base = os.path.join(self.ckpt_dir, SUPERSEDED, f"{time.strftime('%Y%m%d-%H%M%S')}_{label}")
        folder, k = base, 1
        while True:
            try:
                os.makedirs(folder)
                return folder
            except FileExistsError:
                k += 1
                folder = f"{base}_{k}"

    # -- save ----------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        meta: dict[str, Any],
        rank_state: dict[str, Any],
    ) -> str:
        """Write checkpoint `step` (a collective: every rank calls it). Returns its path."""
        info = self.info
        final = os.path.join(self.ckpt_dir, step_dir_name(step))
        tmp = os.path.join(self.ckpt_dir, TMP_PREFIX + step_dir_name(step))
        if info.is_rank0:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            for name in os.listdir(self.ckpt_dir):  # leftovers of interrupted saves
                if name.startswith(TMP_PREFIX):
                    shutil.rmtree(os.path.join(self.ckpt_dir, name), ignore_errors=True)
            os.makedirs(tmp)
        barrier(info)

        with _gradients_set_aside(optimizer):
            model_sd, optim_sd = get_state_dict(model, optimizer)
        with _single_process_ok():
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp)
        torch.save(rank_state, os.path.join(tmp, rank_file_name(info.rank)))
        barrier(info)

        if info.is_rank0:
            meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": info.world_size,
                    "saved_at": time.time(), **meta}
            meta_file = os.path.join(tmp, META_NAME)
            with open(meta_file, "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=2, default=_json_default)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if os.path.exists(final):  # the same step saved again (e.g. at the end after a periodic save)
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.ckpt_dir)
            # keep_last: this one and the newest others. It is left out of the ranking, which goes by
            # step: a checkpoint of a later step than this one must never make rotation delete it.
            others = [path for path in list_checkpoints(self.ckpt_dir) if path != final]
            for old in others[: max(0, len(others) - (self.keep_last - 1))]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(info)
        return final

    # -- load ----------------------------------------------------------------------------------

    def resolve(self, resume: str | None) -> str | None:
        """`auto`: the newest complete checkpoint of this run, or None; a path: that checkpoint;
        None: a new run (see `set_aside_earlier_run`)."""
        if resume is None:
            return None
        if resume == "auto":
            path = self.latest()
        else:
            path = resume
            read_meta(path)  # a clear error for a missing or incomplete directory
        # Every rank must load the same checkpoint, even if a save lands while they look.
        return broadcast_object(self.info, path)

    def load(
        self, path: str, model: nn.Module, optimizer: torch.optim.Optimizer, model_config: Any
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Load model and optimizer in place; returns (meta, this rank's state or None).

        The rank state (data position, RNG) is returned only when the world size is unchanged:
        with another number of ranks the data order cannot continue exactly.
        """
        meta = read_meta(path)
        check_model_matches(meta, model_config, path)
        # The run's own optimizer settings, to put back after the load: torch's load_state_dict
        # takes every group setting from the checkpoint. Its implementation flags (fused, foreach)
        # then belong to whichever AdamW saved it: torch's fused step crashed on the flags of our
        # Triton AdamW or of torch's foreach one. And a changed betas / eps / weight_decay in the
        # config would be ignored without a word.
        # (The learning rate is the checkpoint's: the schedule sets it before every step anyway.)
        settings = [{k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
                    for group in optimizer.param_groups]
        with _gradients_set_aside(optimizer):
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optimizer": optim_sd}
            with _single_process_ok():
                dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        changed = sorted({k for group, own in zip(optimizer.param_groups, settings) for k in ("betas", "eps",
                          "weight_decay") if k in own and group.get(k) != own[k]})
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
        if changed and self.info.is_rank0:
            print(f"warning: {path}: optimizer {', '.join(changed)} differ from this run's config; the config's "
                  "apply from here on", flush=True)
        rank_state = None
        rank_file = os.path.join(path, rank_file_name(self.info.rank))
        if meta.get("world_size") == self.info.world_size and os.path.isfile(rank_file):
            # Our own file: RNG states hold numpy tuples, which the weights-only loader refuses.
            rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        return meta, rank_state


def load_model_weights(path: str, model: nn.Module, model_config: Any) -> dict[str, Any]:
    """Only the model weights of one of our checkpoints (for `init_from`): a new run starts from them.
    A DPO checkpoint holds a policy and its reference (`policy.*`, `reference.*`): the policy's are
    loaded, the model its meta describes."""
    meta = read_meta(path)
    check_model_matches(meta, model_config, path)
    prefix = "policy." if (meta.get("config") or {}).get("dpo") is not None else ""
    model_sd = get_model_state_dict(model)
    state = {"model": {prefix + name: tensor for name, tensor in model_sd.items()}}
    with _single_process_ok():
        dcp.load(state, checkpoint_id=path)  # in place, into the model's own tensors
    set_model_state_dict(model, {name[len(prefix):]: tensor for name, tensor in state["model"].items()})
    return meta


def export_hf(model: nn.Module, bare_model: nn.Module, path: str, info: DistInfo, sharded: bool) -> None:
    """Write `path` in Hugging Face format (config.json + safetensors), on rank 0.

    Under FSDP2 the full state dict is gathered to rank 0's CPU first (a collective) and put into
    an unsharded copy of the model, whose `save_pretrained` writes the files. A wrapper with a
    `policy` (DPO) exports the policy.
    """
    if not sharded:
        if info.is_rank0:
            bare_model.save_pretrained(path)
        barrier(info)
        return
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if info.is_rank0:
        from src.models import KernelConfig

        target, prefix = (bare_model.policy, "policy.") if hasattr(bare_model, "policy") else (bare_model, "")
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        copy = type(target)(target.config, kernels=KernelConfig.reference())
        copy.load_state_dict_strict(state, source="the gathered training state")
        copy.save_pretrained(path)
    barrier(info)


def _json_default(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return to_dict(value)
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} to {META_NAME}")
