"""The ready configs for real data sources load and check cleanly (no network: nothing is read)."""

import pytest

from src.trainer.config import load_config
from tests.models.hf_helpers import tiny_hf_qwen2

REAL = {
    "configs/train/pretrain_fineweb.yaml": ("pretrain", "streaming"),
    "configs/train/pretrain_openwebtext_shards.yaml": ("pretrain", "shards"),
    "configs/train/sft_alpaca_qwen2.yaml": ("sft", "streaming"),
    "configs/train/dpo_ultrafeedback_qwen2.yaml": ("dpo", "streaming"),
}


@pytest.mark.parametrize("path", sorted(REAL))
def test_real_source_config_loads(path, tmp_path):
    task, data_type = REAL[path]
    overrides = []
    if "qwen2" in path:  # init_from names a downloaded checkpoint: stand in a tiny one of the same family
        _, hf_dir = tiny_hf_qwen2(tmp_path)
        overrides.append(f"init_from={hf_dir}")
    cfg = load_config(path, overrides, task=task)
    assert cfg.data.type == data_type
    assert cfg.trainer.max_steps or cfg.trainer.max_tokens
    if data_type == "shards":
        assert cfg.data.source_config().type == "streaming"  # what the prepare step reads
