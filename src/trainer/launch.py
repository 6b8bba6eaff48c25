"""What the three entry points share: the command line, and building the model and the loaders;
for DPO with `dpo.reference: precomputed`, the reference log-probabilities pass.

    python -m src.train_pretrain --config configs/train/pretrain.yaml --set trainer.max_steps=100 --resume auto
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable

import torch

from src.dataset.base import Tokenizer, build_dataloader
from src.dataset.loader import to_tensors
from src.dataset.sources import DataError
from src.models import AutoModelForCausalLM, CausalLM
from src.models.dpo import ReferenceLogpsLoader, load_reference_logps, precompute_reference_logps
from src.utils.config import ConfigError, to_dict
from src.utils.distributed import DistInfo, broadcast_object
from src.utils.misc import seed_everything

from src.models.components.dispatch import check_kernels

from .checkpoint import CheckpointError, load_model_weights
from .config import TrainConfig, is_hf_dir, load_config


def parse_args(task: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m src.train_{task}", description=f"{task} a causal LM")
    parser.add_argument("--config", required=True, help=f"a train YAML, e.g. configs/train/{task}.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override one config value (repeatable), e.g. --set trainer.max_steps=100")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest checkpoint of this run (auto) or from a checkpoint directory")
    return parser.parse_args(argv)


def run_main(task: str, main: Callable[[], str]) -> None:
    """The command line's `main()`: a configuration mistake (a `ConfigError`: an unknown key, an
    impossible combination, a missing data path, a kernel or device this machine lacks), unusable
    data (a `DataError`: nothing usable in a file, too little for one batch, stale shards) or an
    unusable checkpoint (a `CheckpointError`: a missing --resume path, another model's checkpoint)
    ends the run with one line that names it and exit status 2, as argparse does, instead of a
    traceback. Anything else raises as usual."""
    try:
        main()
    except (ConfigError, DataError, CheckpointError) as error:
        print(f"python -m src.train_{task}: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def config_from_args(task: str, args: argparse.Namespace) -> TrainConfig:
    if not os.path.isfile(args.config):
        raise ConfigError(f"--config '{args.config}': no such file (relative paths start at {os.getcwd()}); "
                          f"give a train YAML such as configs/train/{task}.yaml")
    # --resume is a path (or auto), passed as typed: as a --set value it would be read as YAML
    cfg = load_config(args.config, args.overrides, task=task, resume=args.resume)
    check_kernels(cfg.kernels, cfg.model_config.model_family)  # a kernel this machine cannot run: refused first
    return cfg


def build_model(cfg: TrainConfig, tokenizer: Tokenizer) -> CausalLM:
    """The model from `init_from` (a Hugging Face directory or one of our checkpoints) or from the
    model YAML, on the CPU in fp32 (master weights); the Trainer moves and prepares it. Seeded, so
    that every rank builds the same initial weights."""
    if tokenizer.vocab_size > cfg.model_config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{cfg.model_config.vocab_size}; choose a model config with vocab_size >= {tokenizer.vocab_size}"
        )
    seed_everything(cfg.trainer.seed)
    if cfg.init_from is not None and is_hf_dir(cfg.init_from):
        return AutoModelForCausalLM.from_pretrained(cfg.init_from, kernels=cfg.kernels, dtype=torch.float32)
    if cfg.model_config.eos_token_id is None:  # a model YAML without one: the tokenizer it trains with decides
        cfg.model_config.bos_token_id = cfg.model_config.eos_token_id = tokenizer.eos_id
    model = AutoModelForCausalLM.from_config(cfg.model_config, kernels=cfg.kernels)
    if cfg.init_from is not None:
        load_model_weights(cfg.init_from, model, cfg.model_config)
    return model


def build_loaders(task: str, cfg: TrainConfig, tokenizer: Tokenizer, info: DistInfo):
    """The train loader, and the val loader when evaluation is on."""
    t = cfg.trainer
    common = dict(batch_size=t.micro_batch_size, seq_len=t.seq_len, rank=info.rank, world_size=info.world_size,
                  seed=t.seed, pin_memory=info.device.type == "cuda")
    train = build_dataloader(task, cfg.data, tokenizer, split="train", **common)
    val = build_dataloader(task, cfg.data, tokenizer, split="val", **common) if t.eval_every else None
    return train, val


def check_paths(cfg: TrainConfig) -> None:
    """A local data path that does not exist is an error before anything is built."""
    import glob

    if cfg.data.type in ("local", "shards") and not glob.glob(cfg.data.path):
        raise ConfigError(f"data.path '{cfg.data.path}' does not exist (relative paths start at the repository root: "
                          f"{os.getcwd()})")


# ----------------------------------------------------------------------------------------------
# DPO with `dpo.reference: precomputed`
#
# <run_dir>/reference_logps_<split>.safetensors holds {"chosen", "rejected", "example_ids"} (N,) for
# every pair of the split, and in its metadata the fingerprint of what produced it. Rank 0 decides
# whether each file is usable, missing or stale; a missing one is computed once by all ranks (each
# takes a contiguous block of the pairs, `DPOBatches.in_order`), gathered, and written by rank 0;
# every rank then holds the whole table in memory (all-gathered after a computation, broadcast by
# rank 0 after a read), so only rank 0 touches the file and nodes need not share the run directory.

REFERENCE_FORMAT = "dpo_reference_logps"


def reference_logps_path(cfg: TrainConfig, split: str) -> str:
    return os.path.join(cfg.run_dir, f"reference_logps_{split}.safetensors")


def reference_fingerprint(cfg: TrainConfig, split: str, num_pairs: int) -> dict:
    """What the stored log-probs depend on: the reference weights (the policy's starting point), the
    rows and how they are tokenized and truncated. Kernels and precision are left out: they change
    the values only by rounding."""
    d = cfg.data
    if cfg.init_from is not None:
        init = {"path": cfg.init_from, "files": _files_identity(cfg.init_from)}
    else:  # the policy starts from a seeded random init (build_model), and so does the reference
        init = {"random init": to_dict(cfg.model_config), "trainer.seed": cfg.trainer.seed}
    data = {"type": d.type, "path": d.path, "subset": d.subset, "split": d.split, "columns": dict(d.columns),
            "max_documents": d.max_documents, "val_fraction": d.val_fraction, "val_documents": d.val_documents,
            "overlong": d.overlong}
    return {"init": init, "data": data, "tokenizer": to_dict(d.tokenizer), "seq_len": cfg.trainer.seq_len,
            "split": split, "num_pairs": num_pairs}


def _files_identity(path: str) -> list[list]:
    """[name, size, mtime_ns] of the files of a checkpoint directory (or of one file): the weights
    behind a path, without reading them. An SFT run redone into the same directory writes new files,
    so its new weights no longer match log-probs computed from the old ones. (A copy that does not
    keep modification times reads as changed too: the stale-file error then asks for a recompute.)"""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, name) for name in os.listdir(path) if os.path.isfile(os.path.join(path, name)))
    return [[os.path.basename(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files]


def _fingerprint_diffs(saved: dict, now: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    return [f"{k}: stored {saved.get(k)!r}, now {v!r}" for k, v in now.items()
            if k not in ignore and saved.get(k) != v]


def _check_reference_file(path: str, fingerprint: dict, resuming_from_path: bool) -> str:
    """'ok', 'missing', or the error message for a file that must not be used (rank 0 only)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        if resuming_from_path:
            return (f"--resume from a checkpoint with dpo.reference: precomputed needs the reference log-probs of the "
                    f"original run at {path} (the reference is the run's starting model, which the checkpoint does not "
                    "hold); copy reference_logps_*.safetensors from the original run directory there")
        return "missing"
    fix = f"delete {path} to recompute it from the current settings (or restore the settings it was made with)"
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # a truncated or foreign file
        return f"{path} is not a readable safetensors file ({e}); {fix}"
    if meta.get("format") != REFERENCE_FORMAT or "fingerprint" not in meta:
        return f"{path} holds no reference log-prob fingerprint (not written by src.train_dpo); {fix}"
    # An explicit --resume PATH has no init_from (config rule), but the file records the run's start.
    diffs = _fingerprint_diffs(json.loads(meta["fingerprint"]), fingerprint, ("init",) if resuming_from_path else ())
    if diffs:
        return f"{path} is stale: it was computed for another setup ({'; '.join(diffs)}); {fix}"
    return "ok"


def _save_reference_table(table: dict[str, torch.Tensor], path: str, fingerprint: dict) -> None:
    """Written beside the run's checkpoints, through a temporary file renamed into place."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in table.items()}, tmp,
              metadata={"format": REFERENCE_FORMAT, "fingerprint": json.dumps(fingerprint, sort_keys=True)})
    os.replace(tmp, path)


def _reference_precision(cfg: TrainConfig, reference: CausalLM, info: DistInfo):
    """The precision the live reference would run in: bf16 autocast on CUDA (trainer.precision
    auto), with the residual stream trainer.residual_dtype asks for."""
    from .parallelize import apply_residual_dtype, residual_dtype
    from .trainer import resolve_precision

    bf16 = resolve_precision(cfg.trainer.precision, info.device) == "bf16"
    apply_residual_dtype(reference, residual_dtype(cfg, bf16))
    if bf16:
        return torch.autocast(info.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _compute_split(cfg: TrainConfig, reference: CausalLM, source, info: DistInfo) -> dict[str, torch.Tensor]:
    """This rank's block of the split through the reference, gathered over ranks: the whole table."""
    batches = (to_tensors(b, pin=False) for b in
               source.in_order(cfg.trainer.micro_batch_size, rank=info.rank, world_size=info.world_size))
    with _reference_precision(cfg, reference, info):
        table = precompute_reference_logps(reference, batches, chunk_size=cfg.dpo.chunk_size, device=info.device)
    if info.distributed:
        import torch.distributed as dist

        parts = [None] * info.world_size
        dist.all_gather_object(parts, table, group=info.control_group)
        table = {k: torch.cat([part[k] for part in parts]) for k in table}
    return table


def with_reference_logps(cfg: TrainConfig, tokenizer: Tokenizer, train_loader, val_loader, info: DistInfo):
    """The DPO train / val loaders wrapped in `ReferenceLogpsLoader`, from the stored reference
    log-probs of each split, computed first (reference model built like the policy, then freed)
    when missing. A stale file is an error naming the fix; loader state passes through the wrapper."""
    log = print if info.is_rank0 else (lambda *a, **k: None)
    resuming_from_path = cfg.checkpoint.resume not in (None, "auto")
    loaders = {"train": train_loader, "val": val_loader}
    splits = {}  # split -> (source, path, fingerprint, status)
    for split, loader in loaders.items():
        if loader is None:
            continue
        source = loader.source
        path = reference_logps_path(cfg, split)
        fingerprint = reference_fingerprint(cfg, split, source.num_items)
        status = _check_reference_file(path, fingerprint, resuming_from_path) if info.is_rank0 else None
        status = broadcast_object(info, status)
        if status not in ("ok", "missing"):
            raise ConfigError(status)
        splits[split] = (source, path, fingerprint, status)

    tables = {}
    missing = [split for split, (*_, status) in splits.items() if status == "missing"]
    if missing:
        reference = build_model(cfg, tokenizer).to(info.device)  # seeded: the policy's starting weights
        for split in missing:
            source, path, fingerprint, _ = splits[split]
            started = time.time()
            tables[split] = _compute_split(cfg, reference, source, info)
            if info.is_rank0:
                _save_reference_table(tables[split], path, fingerprint)
            log(f"dpo: reference log-probs of {source.num_items} {split} pairs computed in "
                f"{time.time() - started:.1f}s over {info.world_size} rank(s), saved to {path}", flush=True)
        del reference
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
    for split, (source, path, fingerprint, status) in splits.items():
        if status == "ok":
            table = None
            if info.is_rank0:
                table = load_reference_logps(path)
                log(f"dpo: reusing the reference log-probs of {source.num_items} {split} pairs from {path}", flush=True)
            tables[split] = broadcast_object(info, table)
        ids = tables[split]["example_ids"]
        if not torch.equal(ids.sort().values, torch.arange(source.num_items)):
            raise ConfigError(f"{path} does not hold exactly one entry per {split} pair (0..{source.num_items - 1}); "
                              f"delete it to recompute it")
    return tuple(ReferenceLogpsLoader(loader, tables[split]) if loader is not None else None
                 for split, loader in loaders.items())
