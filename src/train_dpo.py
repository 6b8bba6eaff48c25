"""Direct Preference Optimization: the policy (from `init_from`, usually an SFT model) against a
frozen copy of itself; the loss lives in `src.models.dpo.DPOModel`.

    python -m src.train_dpo --config configs/train/dpo.yaml [--set dpo.beta=0.1] [--resume auto|PATH]
"""

from __future__ import annotations

from src.dataset.base import build_tokenizer
from src.models.dpo import DPOModel
from src.trainer import Trainer
from src.trainer.launch import build_loaders, build_model, check_paths, config_from_args, parse_args
from src.utils.config import ConfigError
from src.utils.distributed import init_distributed, shutdown_distributed


def main(argv: list[str] | None = None) -> str:
    cfg = config_from_args("dpo", parse_args("dpo", argv))
    if cfg.dpo.reference != "live":
        raise ConfigError("dpo.reference: precomputed needs one finite pass over the train split to precompute the "
                          "reference log-probs, which src.train_dpo does not run yet; use dpo.reference=live")
    check_paths(cfg)
    info = init_distributed(cfg.trainer.device)
    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
        train_loader, val_loader = build_loaders("dpo", cfg, tokenizer, info)
        model = DPOModel(build_model(cfg, tokenizer), config=cfg.dpo)
        return Trainer(cfg, model, train_loader, val_loader, info).fit()
    finally:
        shutdown_distributed(info)


if __name__ == "__main__":
    main()
