"""Pretraining: next-token prediction on packed windows of text.

    python -m src.train_pretrain --config configs/train/pretrain.yaml [--set key.sub=value ...] [--resume auto|PATH]
    torchrun --nproc_per_node=8 -m src.train_pretrain --config configs/train/pretrain.yaml --set parallel.strategy=ddp
"""

from __future__ import annotations

from src.dataset.base import build_tokenizer
from src.trainer import Trainer
from src.trainer.launch import build_loaders, build_model, check_paths, config_from_args, parse_args, run_main
from src.utils.distributed import init_distributed, shutdown_distributed


def main(argv: list[str] | None = None) -> str:
    cfg = config_from_args("pretrain", parse_args("pretrain", argv))
    check_paths(cfg)
    info = init_distributed(cfg.trainer.device)
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        train_loader, val_loader = build_loaders("pretrain", cfg, tokenizer, info)
        model = build_model(cfg, tokenizer)
        return Trainer(cfg, model, train_loader, val_loader, info).fit()
    finally:
        shutdown_distributed(info)


if __name__ == "__main__":
    run_main("pretrain", main)
