"""Small builders shared by the data tests: files, configs, offline tokenizers."""

from __future__ import annotations

import json
import os

import numpy as np

from src.dataset.base import DataConfig
from src.utils.config import from_dict

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def texts(n: int, seed: int = 0) -> list[str]:
    """n documents of varied length (5 to 60 words), deterministic; random hex words make every
    window of a few tokens unique, so tests can identify windows by their content."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(5, 61))
        out.append(" ".join(f"{int(x):06x}" for x in rng.integers(0, 16**6, k)))
    return out


def write_jsonl(path, records) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def data_cfg(**kw) -> DataConfig:
    return from_dict(DataConfig, kw, where="test data block")


def word_level_tokenizer_json(path, vocab_size: int) -> str:
    """A real `tokenizers` file: whitespace words, one id per known word, any vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1}
    for i, w in enumerate(WORDS):
        vocab[w] = 2 + i
    i = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"w{i}"] = i
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return str(path)


def collect(loader, n: int) -> list[dict]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


def hf_dir_with_chat_template(path, template: str) -> str:
    """A Hugging Face tokenizer directory (word-level, EOS `<|endoftext|>`) with its own Jinja chat template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer_json = word_level_tokenizer_json(os.path.join(str(path), "tokenizer_src.json"), 64)
    hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_json, eos_token="<|endoftext|>", unk_token="[UNK]")
    hf.chat_template = template
    hf.save_pretrained(os.path.join(str(path), "hf_dir"))
    return os.path.join(str(path), "hf_dir")


# A template that refuses the system role, as several real ones do (raise_exception -> jinja TemplateError).
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{{ m['role'] }} {{ m['content'] }} {% if m['role'] == 'assistant' %}<|endoftext|> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}"
)
