"""The development samples in data/ are small and load through their tasks without a skipped row."""

import logging
import os

import pytest

from src.dataset import TokenizerConfig, build_dataloader, build_tokenizer

from .helpers import data_cfg

TOK = build_tokenizer(TokenizerConfig())
SAMPLES = [("pretrain", "data/openwebtext_subset.jsonl", {}), ("sft", "data/alpaca_data.json", {"format": "alpaca"}),
           ("sft", "data/chat_messages.jsonl", {"format": "messages"}), ("dpo", "data/dpo_preferences.jsonl", {})]


@pytest.mark.parametrize("task, path, extra", SAMPLES)
def test_sample_loads_cleanly(task, path, extra, caplog):
    assert os.path.getsize(path) < 100_000  # development samples only (data/README.md)
    cfg = data_cfg(type="local", path=path, val_fraction=0.1 if task == "pretrain" else 0.0, prefetch=0, **extra)
    with caplog.at_level(logging.WARNING):
        loader = build_dataloader(task, cfg, TOK, batch_size=2, seq_len=1024, split="train", rank=0, world_size=1,
                                  seed=0, pin_memory=False)
        next(iter(loader))
    assert "skipping" not in caplog.text and "truncated" not in caplog.text
