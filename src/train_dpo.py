"""Direct Preference Optimization: the policy (from `init_from`, usually an SFT model) against a
frozen reference, its own starting point; the loss lives in `src.models.dpo.DPOModel`.

    python -m src.train_dpo --config configs/train/dpo.yaml [--set dpo.beta=0.1] [--resume auto|PATH]

`dpo.reference: live` keeps a frozen copy of the policy in memory and runs it on every batch.
`dpo.reference: precomputed` runs the reference once over every pair of each split before
training, stores the log-probs in `<run_dir>/reference_logps_<split>.safetensors` (reused by later
starts and resumes; a stale file is an error), and trains without a reference model in memory.
"""

from __future__ import annotations

from src.dataset.base import build_tokenizer
from src.models.dpo import DPOModel
from src.trainer import Trainer
from src.trainer.launch import (
    build_loaders,
    build_model,
    check_paths,
    config_from_args,
    parse_args,
    run_main,
    with_reference_logps,
)
from src.utils.distributed import init_distributed, shutdown_distributed


def main(argv: list[str] | None = None) -> str:
    cfg = config_from_args("dpo", parse_args("dpo", argv))
    check_paths(cfg)
    info = init_distributed(cfg.trainer.device)
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        train_loader, val_loader = build_loaders("dpo", cfg, tokenizer, info)
        if cfg.dpo.reference == "precomputed":
            train_loader, val_loader = with_reference_logps(cfg, tokenizer, train_loader, val_loader, info)
        model = DPOModel(build_model(cfg, tokenizer), config=cfg.dpo)
        return Trainer(cfg, model, train_loader, val_loader, info).fit()
    finally:
        shutdown_distributed(info)


if __name__ == "__main__":
    run_main("dpo", main)
