"""The ready configs for real data sources load and check cleanly (no network: nothing is read)."""

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

from src.trainer.config import load_config
from tests.models.hf_helpers import tiny_hf_qwen2

REAL = {
    "configs/train/pretrain_fineweb.yaml": ("pretrain", "streaming"),
    "configs/train/pretrain_fineweb_qwen2_0.5b.yaml": ("pretrain", "streaming"),
    "configs/train/pretrain_openwebtext_shards.yaml": ("pretrain", "shards"),
    "configs/train/sft_alpaca_qwen2.yaml": ("sft", "streaming"),
    "configs/train/dpo_ultrafeedback_qwen2.yaml": ("dpo", "streaming"),
}


@pytest.mark.parametrize("path", sorted(REAL))
def test_real_source_config_loads(path, tmp_path):
    task, data_type = REAL[path]
    overrides = []
    if "init_from" in yaml.safe_load(open(path)):  # a downloaded checkpoint: stand in a tiny one of the same family
        _, hf_dir = tiny_hf_qwen2(tmp_path)
        overrides.append(f"init_from={hf_dir}")
    cfg = load_config(path, overrides, task=task)
    assert cfg.data.type == data_type
    assert cfg.trainer.max_steps or cfg.trainer.max_tokens
    if data_type == "shards":
        assert cfg.data.source_config().type == "streaming"  # what the prepare step reads


def test_the_12_gib_qwen2_config_is_the_measured_row():
    """configs/train/pretrain_fineweb_qwen2_0.5b.yaml is what benchmarks/throughput.py measured as
    `... +bf16 moments swiglu=fused_linear_recompute +bf16 weight copy linear=tuned`: the same kernels,
    compile and optimizer state, so the numbers quoted in its header stay its own."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import throughput

    cfg = load_config("configs/train/pretrain_fineweb_qwen2_0.5b.yaml", [], task="pretrain")
    row = {v.name: v for v in throughput.our_variants("qwen2", "none")}[
        "optimized +whole-model +CUDA graphs +bf16 moments swiglu=fused_linear_recompute +bf16 weight copy linear=tuned"]
    kernels = {k: v for k, v in dataclasses.asdict(cfg.kernels).items() if k in row.kernels}
    assert kernels == row.kernels
    assert (cfg.compile, cfg.compile_scope, cfg.compile_mode) == (True, row.compile_scope, row.compile_mode)
    assert cfg.optimizer.state_dtype == row.optimizer_state == "bfloat16"
    assert cfg.optimizer.bf16_weight_copy and row.weight_copy
    assert cfg.trainer.residual_dtype == row.residual_dtype
    assert cfg.trainer.activation_checkpointing == "none" and cfg.trainer.grad_accum_steps == 1
    assert (cfg.trainer.micro_batch_size, cfg.trainer.seq_len) == (4, 2048)


@pytest.mark.parametrize("path", ["configs/train/pretrain.yaml", "configs/train/pretrain_fineweb.yaml",
                                  "configs/train/pretrain_openwebtext_shards.yaml"])
def test_the_gpt2_pretrain_configs_are_the_fastest_measured_row(path):
    """The GPT-2 pretrain files run what benchmarks/throughput.py measured fastest,
    `optimized +whole-model +CUDA graphs +bf16 weight copy`: its kernels, compile scope and mode, residual stream; and
    the FSDP2 line their headers give loads."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import throughput

    cfg = load_config(path, [], task="pretrain")
    row = {v.name: v for v in throughput.our_variants("gpt2", "none")}["optimized +whole-model +CUDA graphs +bf16 weight copy"]
    kernels = {k: v for k, v in dataclasses.asdict(cfg.kernels).items() if k in row.kernels}
    assert kernels == row.kernels
    assert (cfg.compile, cfg.compile_scope, cfg.compile_mode) == (True, row.compile_scope, row.compile_mode)
    assert cfg.trainer.residual_dtype == row.residual_dtype
    assert cfg.optimizer.bf16_weight_copy == row.weight_copy
    header = open(path).read()
    assert "--set parallel.strategy=ddp" in header and "--set compile_scope=blocks --set compile_mode=default" in header
    assert "--set optimizer.bf16_weight_copy=false" in header
    fsdp2 = load_config(path, ["parallel.strategy=fsdp2", "compile_scope=blocks", "compile_mode=default",
                               "optimizer.bf16_weight_copy=false"], task="pretrain")
    assert (fsdp2.parallel.strategy, fsdp2.compile_scope, fsdp2.cuda_graphs) == ("fsdp2", "blocks", False)
