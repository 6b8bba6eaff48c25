"""Train configs load strictly: errors name the key and the fix, before anything is built."""

from __future__ import annotations

import pytest
import yaml

from src.trainer.config import OptimizerConfig, TrainConfig, check_warmup, load_config, run_length, tokens_per_step
from src.utils.config import ConfigError

BASE = {
    "model_config_path": "configs/model/gpt2_tiny.yaml",
    "data": {"type": "local", "path": "data/openwebtext_subset.jsonl", "tokenizer": {"type": "byte"}},
    "trainer": {"max_steps": 10, "seq_len": 64},
    "schedule": {"warmup_steps": 2},
}


def write(tmp_path, data, name="train.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["pretrain", "pretrain_cpu", "sft", "dpo"])
def test_shipped_configs_load(name):
    cfg = load_config(f"configs/train/{name}.yaml", task="pretrain" if name.startswith("pretrain") else name)
    assert isinstance(cfg, TrainConfig) and cfg.model_config is not None


def test_overrides_apply_and_are_typed(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["trainer.max_steps=7", "optimizer.lr=1e-3", "compile=true"])
    assert cfg.trainer.max_steps == 7 and cfg.optimizer.lr == 1e-3 and cfg.compile is True
    assert cfg.model_config.n_layer == 2 and cfg.run_dir.endswith("run")


def test_unknown_key_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trainer.max_step'. Did you mean 'max_steps'"):
        load_config(write(tmp_path, BASE), ["trainer.max_step=5"])
    with pytest.raises(ConfigError, match=r"unknown key 'optimiser'. Did you mean 'optimizer'"):
        load_config(write(tmp_path, {**BASE, "optimiser": {"lr": 1.0}}))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'trainer.micro_batch_size': expected an integer, got 'eight'"):
        load_config(write(tmp_path, BASE), ["trainer.micro_batch_size=eight"])
    with pytest.raises(ConfigError, match=r"'parallel.strategy': 'fsdp' is not one of .* Did you mean 'fsdp2'"):
        load_config(write(tmp_path, BASE), ["parallel.strategy=fsdp"])


def test_missing_model_yaml_lists_what_exists(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model config not found: 'configs/model/gpt_9b.yaml'.*gpt_125m.yaml"):
        load_config(write(tmp_path, {**BASE, "model_config_path": "configs/model/gpt_9b.yaml"}))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.max_steps=null"], "set trainer.max_steps or trainer.max_tokens"),
        (["trainer.seq_len=4096"], r"seq_len \(4096\) exceeds the model's block_size \(128\)"),
        (["schedule.warmup_steps=10"], r"warmup_steps \(10\) must be below trainer.max_steps \(10\)"),
        (["schedule.min_lr=1.0"], r"min_lr \(1.0\) is above optimizer.lr"),
        (["trainer.eval_every=5"], "needs a validation split: set data.val_fraction"),
        (["init_from=nowhere/at/all"], "init_from 'nowhere/at/all' does not exist"),
        (["trainer.grad_accum_steps=0"], "trainer.grad_accum_steps must be >= 1"),
        (["compile_mode=reduce-overhead"], "applies to compiled blocks; set compile: true"),
        (["compile=true", "compile_mode=reduce-overhead", "parallel.strategy=fsdp2"], "does not work with FSDP2"),
        (["compile=true", "compile_mode=max-autotune", "parallel.strategy=fsdp2"], "does not work with FSDP2"),
        (["compile=true", "compile_mode=fastest"], "compile_mode"),
        (["optimizer.implementation=triton", "optimizer.fused=true"],
         "does not apply to optimizer.implementation=triton"),
        (["optimizer.implementation=cuda"], "optimizer.implementation"),
        (["optimizer.state_dtype=bfloat16", "optimizer.implementation=torch"], "needs our Triton AdamW"),
        (["optimizer.state_dtype=bfloat16", "optimizer.fused=true"], "needs our Triton AdamW"),
        (["optimizer.state_dtype=fp16"], "optimizer.state_dtype"),
        (["compile_scope=model"], "says what torch.compile compiles; set compile: true"),
        (["compile=true", "compile_scope=model", "parallel.strategy=fsdp2"], "compile_scope=model does not work with FSDP2"),
        (["compile=true", "compile_scope=model", "compile_mode=reduce-overhead", "parallel.strategy=fsdp2"],
         r"set compile_mode: default and compile_scope: blocks \(--set compile_mode=default --set compile_scope=blocks\)"),
        (["compile=true", "compile_scope=layers"], "compile_scope"),
        (["compile_loss_head=always"], "compile_loss_head=always chooses what torch.compile compiles; set compile: true"),
        (["compile=true", "compile_loss_head=never"], "compile_loss_head"),
        (["trainer.activation_memory_budget=0.5"], "applied by torch.compile's partitioner; set compile: true"),
        (["trainer.activation_memory_budget=1.5"], r"activation_memory_budget must be in \[0, 1\]"),
        (["compile=true", "trainer.activation_memory_budget=0.5", "trainer.activation_checkpointing=full"],
         "set one of them"),
        (["trainer.activation_checkpointing_layers=4"], "set trainer.activation_checkpointing to full or selective"),
        (["trainer.activation_checkpointing=selective", "trainer.activation_checkpointing_layers=-1"],
         "activation_checkpointing_layers must be >= 0"),
        # a token budget of 2 steps (1000 tokens at 8 x 64 per step) with a warmup of 2
        (["trainer.max_steps=null", "trainer.max_tokens=1000"],
         r"warmup_steps \(2\) must be below the run's length, 2 step\(s\) \(trainer.max_tokens 1000 at 512 tokens "),
        (["trainer.max_tokens=1000"], r"warmup_steps \(2\) must be below the run's length, 2 step\(s\)"),
        (["optimizer.betas=[0.9]"], r"key 'optimizer.betas': expected a list of 2 items \(float, float\), got 1"),
        (["optimizer.betas=[0.9, 0.95, 0.99]"], r"key 'optimizer.betas': expected a list of 2 items"),
        (["optimizer.lr=nan"], r"optimizer.lr must be a finite number > 0, got nan"),
        (["optimizer.lr=inf"], r"optimizer.lr must be a finite number > 0, got inf"),
        (["optimizer.grad_clip=nan"], r"optimizer.grad_clip must be a finite number >= 0, got nan"),
        (["optimizer.eps=inf"], r"optimizer.eps must be a finite number > 0, got inf"),
        (["schedule.min_lr=nan"], r"schedule.min_lr must be a finite number >= 0, got nan"),
        (["trainer.max_time_minutes=nan"], r"trainer.max_time_minutes must be a finite number > 0"),
        (["logging.peak_flops=-1"], r"logging.peak_flops must be a finite number > 0"),
        (["logging.peak_flops=inf"], r"logging.peak_flops must be a finite number > 0"),
        (["parallel.strategy=ddp", "parallel.ddp_bucket_cap_mb=inf"], "ddp_bucket_cap_mb must be positive"),
    ],
)
def test_impossible_combinations(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, BASE), overrides)


def test_dpo_block_belongs_to_dpo(tmp_path):
    data = {**BASE, "dpo": {"beta": 0.2}}
    with pytest.raises(ConfigError, match="applies to src.train_dpo only"):
        load_config(write(tmp_path, data), task="pretrain")
    assert load_config(write(tmp_path, data), task="dpo").dpo.beta == 0.2
    assert load_config(write(tmp_path, BASE), task="dpo").dpo.loss_type == "sigmoid"
    with pytest.raises(ConfigError, match="DPO runs a policy and a reference, compiled per block"):
        load_config(write(tmp_path, BASE), ["compile=true", "compile_scope=model"], task="dpo")


def test_data_fields_of_another_task_are_refused_when_the_config_loads(tmp_path):
    """Refused with the config's path before any model or data is built, not at the data loader."""
    with pytest.raises(ConfigError, match=r"train\.yaml: data\.format applies to sft only"):
        load_config(write(tmp_path, BASE), ["data.format=messages"], task="pretrain")
    with pytest.raises(ConfigError, match="data.overlong applies to sft and dpo"):
        load_config(write(tmp_path, BASE), ["data.overlong=skip"], task="pretrain")
    assert load_config(write(tmp_path, BASE), ["data.overlong=skip"], task="dpo").data.overlong == "skip"


def test_a_dpo_step_counts_both_sequences_of_each_pair(tmp_path):
    """The trainer counts the tokens of chosen and rejected (batch_tokens reads every *input_ids):
    the budget's tokens per step must count both too, or a resumed max_tokens run would end at half
    its tokens."""
    budget = ["trainer.max_steps=null", "trainer.max_tokens=2560", "trainer.micro_batch_size=2"]
    pretrain = load_config(write(tmp_path, BASE), budget, task="pretrain")
    dpo = load_config(write(tmp_path, BASE), budget, task="dpo")
    assert tokens_per_step(dpo, 1) == 2 * tokens_per_step(pretrain, 1) == 256
    assert run_length(dpo, 1) == 10 and run_length(pretrain, 1) == 20
    assert run_length(dpo, 1, step=4, tokens=4 * 256) == 10  # resumed: the same end


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_a_model_yaml_matches_its_own_hugging_face_export(tmp_path, family):
    """The YAML's shorthands (ffn_multiplier, one `dropout`) against the export's explicit values
    (intermediate_size, three rates) are one model, not 'another model'; a real difference is."""
    import json

    from src.models import load_model_config

    yaml_path = f"configs/model/{family}_tiny.yaml"
    export = tmp_path / "hf"
    export.mkdir()
    hf = load_model_config(yaml_path).to_hf_config()
    hf["bos_token_id"] = hf["eos_token_id"] = 256  # as a run's export names its tokenizer's end token
    (export / "config.json").write_text(json.dumps(hf))
    data = {**BASE, "model_config_path": yaml_path, "init_from": str(export)}
    assert load_config(write(tmp_path, data)).model_config.n_embd == load_model_config(yaml_path).n_embd
    other = "configs/model/gpt2_tiny.yaml" if family == "qwen2" else "configs/model/qwen2_tiny.yaml"
    with pytest.raises(ConfigError, match="describes another model"):
        load_config(write(tmp_path, {**data, "model_config_path": other}))


def test_missing_data_block(tmp_path):
    with pytest.raises(ConfigError, match="missing the 'data:' block"):
        load_config(write(tmp_path, {k: v for k, v in BASE.items() if k != "data"}))


def test_warmup_against_a_token_budget_counts_the_ranks(tmp_path):
    """load_config checks one process's run, the longest a max_tokens budget gives (4 steps of 512
    tokens here); the Trainer checks again with its ranks, 4 of which make it 1 step."""
    cfg = load_config(write(tmp_path, BASE), ["trainer.max_steps=null", "trainer.max_tokens=2048"])
    check_warmup(cfg, world_size=1, where="train.yaml")
    with pytest.raises(ConfigError, match=r"run's length, 1 step\(s\) .*2048 tokens per step: .* x 4 rank\(s\)"):
        check_warmup(cfg, world_size=4, where="train.yaml")


def test_betas_built_in_python_need_two_values():
    with pytest.raises(ConfigError, match=r"optimizer.betas must be two numbers \[beta1, beta2\], each in \[0, 1\)"):
        OptimizerConfig(betas=(0.9,))
