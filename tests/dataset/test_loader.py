"""The loader as the trainer uses it: batches feed the model; prefetch errors surface; pinned memory."""

import pytest
import torch

from src.dataset import TokenizerConfig, build_dataloader, build_tokenizer
from src.dataset.loader import DataLoader
from src.models import AutoModelForCausalLM
from src.models.components.dispatch import KernelConfig

from .helpers import data_cfg, texts, write_jsonl

TOK = build_tokenizer(TokenizerConfig())


class Failing:
    """A batch source whose third batch raises (a corrupt row deep in a stream, say)."""

    finite, num_batches = False, None

    def __init__(self):
        self.i = 0

    def next_batch(self):
        self.i += 1
        if self.i == 3:
            raise ValueError("row 3 is broken")
        return {"input_ids": torch.zeros(1, 2, dtype=torch.int64).numpy()}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]

    def reset(self):
        self.i = 0


def test_prefetch_thread_errors_reach_the_training_loop():
    it = iter(DataLoader(Failing(), pin_memory=False, prefetch=2))
    next(it), next(it)
    with pytest.raises(ValueError, match="row 3 is broken"):
        next(it)


def test_new_iter_supersedes_the_old_one(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts(40)])
    loader = build_dataloader("pretrain", data_cfg(type="local", path=path), TOK, batch_size=2, seq_len=8,
                              split="train", rank=0, world_size=1, seed=0, pin_memory=False)
    old = iter(loader)
    next(old)
    new = iter(loader)
    next(new)
    with pytest.raises(RuntimeError, match="superseded"):
        next(old)


@pytest.mark.parametrize("task", ["pretrain", "sft"])
def test_batches_feed_the_model(tmp_path, task):
    if task == "pretrain":
        path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts(40)])
        cfg = data_cfg(type="local", path=path, document_aware=True)
    else:
        path = write_jsonl(tmp_path / "s.jsonl", [{"instruction": f"Task {i}", "output": "done"} for i in range(8)])
        cfg = data_cfg(type="local", path=path, packing=True, document_aware=True)
    loader = build_dataloader(task, cfg, TOK, batch_size=2, seq_len=192, split="train", rank=0, world_size=1, seed=0,
                              pin_memory=False)
    batch = next(iter(loader))
    model = AutoModelForCausalLM.from_config("configs/model/qwen2_tiny.yaml", kernels=KernelConfig.reference())
    assert TOK.vocab_size <= model.config.vocab_size
    out = model(batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
    assert torch.isfinite(out.loss) and out.loss.item() > 0


@pytest.mark.gpu
def test_pinned_batches_on_gpu(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts(40)])
    loader = build_dataloader("pretrain", data_cfg(type="local", path=path), TOK, batch_size=2, seq_len=8,
                              split="train", rank=0, world_size=1, seed=0, pin_memory=True)
    batch = next(iter(loader))
    assert all(t.is_pinned() and t.device.type == "cpu" for t in batch.values())
    on_gpu = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
    torch.cuda.synchronize()
    assert torch.equal(on_gpu["input_ids"].cpu(), batch["input_ids"])
