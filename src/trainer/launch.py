"""What the three entry points share: the command line, and building the model and the loaders.

    python -m src.train_pretrain --config configs/train/pretrain.yaml --set trainer.max_steps=100 --resume auto
"""

from __future__ import annotations

import argparse
import os

import torch

from src.dataset.base import Tokenizer, build_dataloader
from src.models import AutoModelForCausalLM, CausalLM
from src.utils.config import ConfigError
from src.utils.distributed import DistInfo
from src.utils.misc import seed_everything

from .checkpoint import load_model_weights
from .config import TrainConfig, is_hf_dir, load_config


def parse_args(task: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m src.train_{task}", description=f"{task} a causal LM")
    parser.add_argument("--config", required=True, help=f"a train YAML, e.g. configs/train/{task}.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override one config value (repeatable), e.g. --set trainer.max_steps=100")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest checkpoint of this run (auto) or from a checkpoint directory")
    return parser.parse_args(argv)


def config_from_args(task: str, args: argparse.Namespace) -> TrainConfig:
    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    return load_config(args.config, overrides, task=task)


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
