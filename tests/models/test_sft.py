"""SFT: only response tokens carry gradient, and a tiny model fine-tuned through the real data
loader and Trainer learns held-out examples of two synthetic instruction tasks."""

import itertools
import json

import numpy as np
import pytest
import torch

from src.dataset import DataConfig, build_dataloader, build_tokenizer, tokenize_chat
from src.dataset.sft import shift_and_fit
from src.dataset.sources import SkipLog
from src.models import AutoModelForCausalLM, KernelConfig
from src.trainer.config import (
    CheckpointConfig,
    LoggingConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainConfig,
    TrainerConfig,
)
from src.trainer.trainer import Trainer
from src.utils.distributed import DistInfo

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
SEQ_LEN = 40
LETTERS = "abcdef"
TASKS = {"copy": lambda s: s, "flip": lambda s: s[::-1]}  # names of one length: prompts align for generate


def instruction_rows() -> list[dict]:
    """Every 3-letter string over LETTERS, once per task, as a chat `messages` row."""
    rows = []
    for task, solve in TASKS.items():
        for letters in itertools.product(LETTERS, repeat=3):
            text = "".join(letters)
            rows.append({"messages": [
                {"role": "user", "content": f"{task}: {text}"},
                {"role": "assistant", "content": solve(text)},
            ]})
    return rows


def tiny_model(vocab_size: int, n_embd: int = 64):
    config = dict(model_family="qwen2", n_layer=2, n_head=4, num_kv_heads=2, n_embd=n_embd,
                  intermediate_size=2 * n_embd, vocab_size=vocab_size, block_size=64)
    return AutoModelForCausalLM.from_config(config, kernels=KernelConfig.reference())


@pytest.fixture
def tokenizer():
    return build_tokenizer(DataConfig(type="local", path="unused.jsonl").tokenizer)


# ----------------------------------------------------------------------------------------------
# Gradients come only from the response


def encode_example(tokenizer, row, label_source_ids=None):
    """(inputs, labels) as the SFT dataset builds them. `label_source_ids` replaces the token ids the
    labels are read from (the inputs stay those of the row): a way to perturb labels alone."""
    ids, trainable = tokenize_chat(tokenizer, row["messages"])
    inputs, _ = shift_and_fit(ids, trainable, SEQ_LEN, "truncate", SkipLog("test"))
    source = ids if label_source_ids is None else label_source_ids
    _, labels = shift_and_fit(source, trainable, SEQ_LEN, "truncate", SkipLog("test"))
    return torch.as_tensor(inputs)[None], torch.as_tensor(labels)[None], np.asarray(trainable)


def grads_of(model, inputs, labels):
    model.zero_grad(set_to_none=True)
    out = model(inputs, labels=labels, return_logits=True)
    out.logits.retain_grad()
    out.loss.backward()
    return [p.grad.clone() for p in model.parameters()], out.logits.grad[0]  # (T, V)


def test_gradients_flow_only_from_response_tokens(tokenizer):
    row = instruction_rows()[7]
    model = tiny_model(tokenizer.vocab_size)
    inputs, labels, trainable = encode_example(tokenizer, row)
    response = labels[0] != -100
    # The dataset supervises exactly the assistant's answer and its end marker.
    assert tokenizer.decode(labels[0][response].tolist()) == row["messages"][1]["content"] + "<|im_end|>"
    base_grads, logit_grads = grads_of(model, inputs, labels)
    # d loss / d logits is exactly zero at every prompt position, non-zero at every response position.
    assert torch.count_nonzero(logit_grads[~response]) == 0
    assert bool((logit_grads[response].abs().sum(-1) > 0).all())

    ids, _ = tokenize_chat(tokenizer, row["messages"])
    rng = np.random.default_rng(0)
    prompt_perturbed = np.where(trainable, ids, rng.integers(0, 256, len(ids)))  # prompt labels changed
    assert (prompt_perturbed != np.asarray(ids)).sum() > 10
    _, labels_p, _ = encode_example(tokenizer, row, prompt_perturbed)
    grads_p, _ = grads_of(model, inputs, labels_p)
    for got, want in zip(grads_p, base_grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)

    response_perturbed = np.array(ids)
    first_answer = int(np.flatnonzero(trainable)[0])
    response_perturbed[first_answer] = (response_perturbed[first_answer] + 1) % 256  # one response label changed
    _, labels_r, _ = encode_example(tokenizer, row, response_perturbed)
    grads_r, _ = grads_of(model, inputs, labels_r)
    assert max((g - w).abs().max().item() for g, w in zip(grads_r, base_grads)) > 1e-4


# ----------------------------------------------------------------------------------------------
# Fine-tuning improves held-out exact match


def exact_match(model, tokenizer, rows) -> float:
    """Greedy answers to the user turn, compared with the expected answer and its end marker."""
    prompts = torch.tensor([tokenize_chat(tokenizer, r["messages"][:1], add_generation_prompt=True)[0] for r in rows])
    out = model.generate(prompts, max_new_tokens=4)
    answers = [tokenizer.decode(row) for row in out[:, prompts.shape[1]:].tolist()]
    return sum(a == r["messages"][1]["content"] + "<|im_end|>" for a, r in zip(answers, rows)) / len(rows)


def test_sft_improves_held_out_exact_match(tmp_path, tokenizer):
    rows = instruction_rows()
    path = tmp_path / "instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = DataConfig(type="local", path=str(path), format="messages", val_fraction=0.2, prefetch=0)
    loaders = {
        split: build_dataloader("sft", data, tokenizer, batch_size=32, seq_len=SEQ_LEN, split=split, rank=0,
                                world_size=1, seed=0, pin_memory=False)
        for split in ("train", "val")
    }
    # The held-out rows are the val split's: recover them through their encoded inputs.
    val_inputs = {tuple(r.tolist()) for b in loaders["val"] for r in b["input_ids"]}
    encoded = [tuple(tokenize_chat(tokenizer, r["messages"])[0][:-1]) for r in rows]
    held_out = [r for r, e in zip(rows, encoded) if e + (tokenizer.pad_id,) * (SEQ_LEN - len(e)) in val_inputs]
    assert 40 <= len(held_out) <= 130 and {r["messages"][0]["content"][:4] for r in held_out} == set(TASKS)

    torch.manual_seed(0)
    model = tiny_model(tokenizer.vocab_size)
    before = exact_match(model, tokenizer, held_out)
    cfg = TrainConfig(
        run_name="sft",
        output_dir=str(tmp_path),
        trainer=TrainerConfig(micro_batch_size=32, seq_len=SEQ_LEN, max_steps=150, device="cpu", eval_every=150,
                              eval_batches=4),
        optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.0, grad_clip=1.0),
        schedule=ScheduleConfig(type="constant", warmup_steps=5),
        checkpoint=CheckpointConfig(every=0, save_final=False, export_hf=False),
        logging=LoggingConfig(log_every=50),
    )
    trainer = Trainer(cfg, model, loaders["train"], loaders["val"], CPU)
    trainer.fit()
    after = exact_match(model, tokenizer, held_out)
    val_losses = [h["loss"] for h in trainer.history if h["split"] == "val"]
    assert val_losses and val_losses[-1] < 0.3
    assert before == 0.0 and after >= 0.8, (before, after)
