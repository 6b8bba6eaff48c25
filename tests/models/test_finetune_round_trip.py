"""A Hugging Face checkpoint in, a Hugging Face checkpoint out: a random-initialised `transformers`
model saved to disk, loaded here, fine-tuned for a few SFT steps, exported with `save_pretrained`,
loads back in `transformers` with logits equal to ours."""

import pytest
import torch
import transformers

from src.models import AutoModelForCausalLM, KernelConfig

from .hf_helpers import tiny_hf_gpt2, tiny_hf_qwen2

ATOL = 1e-4


def sft_batch(vocab_size: int, generator: torch.Generator, batch: int = 4, seq_len: int = 24):
    """Random token rows; the first 8 positions are the prompt (label -100), the rest supervised."""
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    labels = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    labels[:, :8] = -100
    return input_ids, labels


def fine_tune(model, steps: int = 3, lr: float = 1e-2):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        input_ids, labels = sft_batch(model.config.vocab_size, g)
        loss = model(input_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), losses


@pytest.mark.parametrize(
    "family,overrides",
    [("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}), ("gpt2", {})],
    ids=["qwen2", "qwen2-tied", "gpt2"],
)
def test_hf_checkpoint_fine_tuned_and_exported_loads_in_transformers(tmp_path, family, overrides):
    make = tiny_hf_qwen2 if family == "qwen2" else tiny_hf_gpt2
    original, path = make(tmp_path, **overrides)
    ours = AutoModelForCausalLM.from_pretrained(path, kernels=KernelConfig.reference())
    probe = torch.randint(0, ours.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(probe).logits, original(probe).logits, atol=ATOL, rtol=0)

    ours, losses = fine_tune(ours)
    assert all(torch.isfinite(torch.tensor(losses)))
    out_dir = tmp_path / "exported"
    ours.save_pretrained(out_dir)

    exported = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
    assert type(exported) is type(original)
    assert exported.config.tie_word_embeddings == original.config.tie_word_embeddings
    with torch.no_grad():
        mine = ours(probe).logits
        theirs = exported(probe).logits
        before = original(probe).logits
    torch.testing.assert_close(theirs, mine, atol=ATOL, rtol=0)
    # Fine-tuning really moved the weights, so the equality above is about the exported update.
    assert (theirs - before).abs().max() > 100 * ATOL
    # And it loads back here too, identical to the model that was saved.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, kernels=KernelConfig.reference()).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe).logits, mine, atol=0, rtol=0)


def test_entry_points_hf_to_sft_to_dpo_to_hf(tmp_path):
    """The real workflow through the CLI entry points: a Hugging Face Qwen2 directory -> src.train_sft
    (init_from) -> its export -> src.train_dpo (init_from the SFT export) -> an export that
    `transformers` loads, with the logits of our model read from the same files."""
    from src import train_dpo, train_sft

    original, path = tiny_hf_qwen2(tmp_path, vocab_size=259, max_position_embeddings=256)  # byte tokenizer vocabulary
    common = [
        "--set", "model_config_path=null", "--set", f"output_dir={tmp_path / 'runs'}",
        "--set", "trainer.device=cpu", "--set", "trainer.max_steps=3", "--set", "trainer.micro_batch_size=2",
        "--set", "trainer.seq_len=256", "--set", "trainer.eval_every=0", "--set", "checkpoint.every=0",
        "--set", "checkpoint.save_final=false", "--set", "logging.log_every=1", "--set", "data.prefetch=0",
        "--set", "schedule.warmup_steps=0", "--set", "data.overlong=truncate",
    ]
    assert train_sft.main(["--config", "configs/train/sft.yaml", "--set", f"init_from={path}", *common]) == "max_steps"
    sft_export = tmp_path / "runs" / "sft" / "hf"
    assert train_dpo.main(["--config", "configs/train/dpo.yaml", "--set", f"init_from={sft_export}", *common]) == "max_steps"
    dpo_export = tmp_path / "runs" / "dpo" / "hf"

    probe = torch.randint(0, 259, (2, 19), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name, directory in (("sft", sft_export), ("dpo", dpo_export)):
        theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
        ours = AutoModelForCausalLM.from_pretrained(directory, kernels=KernelConfig.reference()).eval()
        with torch.no_grad():
            logits[name] = theirs(probe).logits
            torch.testing.assert_close(ours(probe).logits, logits[name], atol=ATOL, rtol=0)
    with torch.no_grad():
        before = original(probe).logits
    # Each stage changed the weights it handed on.
    assert (logits["sft"] - before).abs().max() > 10 * ATOL
    assert (logits["dpo"] - logits["sft"]).abs().max() > 10 * ATOL
