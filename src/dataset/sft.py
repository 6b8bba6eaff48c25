"""Supervised fine-tuning data: Alpaca rows and chat `messages`, loss only on the response.

Row formats (`data.format`, auto = decided from the first row's keys and logged):

    alpaca:   {"instruction": str, "input": str (optional), "output": str}
              rendered with the Stanford Alpaca prompt; the model learns `output` + EOS.
    messages: {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
              rendered with the tokenizer's chat template (ChatML by default); the model learns
              every assistant message's content and its end marker, nothing else.

Batches: `input_ids` (B, T) and `labels` (B, T), shifted (labels[:, t] is the target of position
t; -100 on prompt tokens and padding). Unpacked, a row holds one example padded with pad_id. With
`data.packing: true`, consecutive examples fill a row (an example is never split) and, with
`data.document_aware: true`, `position_ids` / `document_ids` mark where each one starts.

Truncation policy (`data.overlong`): an example longer than seq_len + 1 tokens is cut on the right
(`truncate`, the default: the prompt is kept, the end of the response is lost) or dropped
(`skip`). Both are counted and logged; an example left without any response token is dropped.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any, Sequence

import numpy as np

from .base import IGNORE_INDEX, DataConfig
from .sampling import EpochBatches, epoch_permutation, rank_slice
from .sources import DataError, Row, SkipLog, StreamOpener, is_validation, iter_rows, require_some
from .tokenizer import ChatTemplateError, Tokenizer, check_messages, tokenize_chat

logger = logging.getLogger(__name__)

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class SkipRow(Exception):
    """A row that cannot become an example; the message is the reason counted in the SkipLog."""


# ----------------------------------------------------------------------------------------------
# Reading rows (shared with DPO)


def read_split_rows(cfg: DataConfig, split: str, opener: StreamOpener | None = None) -> tuple[list[Row], int]:
    """All rows of one split, in source order, and how many rows the source had in that range.

    local: `data.val_fraction` of the rows by a fixed hash; streaming: the first `data.val_documents`
    rows are the validation split, the rest the training split (read fully into memory: SFT and
    preference sets are small next to pretraining corpora).
    """
    rows = iter_rows(cfg.source_with_held_out(), opener=opener)
    if cfg.type == "streaming":
        if split == "val" and cfg.val_documents == 0:
            raise DataError("the val split of type: streaming needs data.val_documents > 0")
        out = list(islice(rows, cfg.val_documents)) if split == "val" else list(islice(rows, cfg.val_documents, None))
        if split == "train" and not out and cfg.val_documents:
            raise DataError(f"data ({cfg.path}): the train split is empty: the stream has no rows after the first "
                            f"data.val_documents={cfg.val_documents}; lower data.val_documents or use more data")
        return out, len(out)
    if split == "val" and cfg.val_fraction == 0:
        raise DataError("the val split of type: local needs data.val_fraction > 0")
    want_val = split == "val"
    out, total = [], 0
    for r in rows:
        total += 1
        if is_validation(r.index, cfg.val_fraction) == want_val:
            out.append(r)
    if total and not out:  # not "no rows": the rows exist, the fixed hash put them all on the other side
        raise DataError(f"data ({cfg.path}): the {split} split is empty: all {total} rows fell into the other split "
                        f"(data.val_fraction={cfg.val_fraction}); use more rows or another data.val_fraction")
    return out, len(out)


def shift_and_fit(ids: Sequence[int], trainable: Sequence[bool], seq_len: int, overlong: str, skips: SkipLog):
    """Token ids + per-token "learn this" flags -> shifted (inputs, labels) of at most seq_len.

    Raises SkipRow when the policy drops the example or nothing is left to learn."""
    ids = np.asarray(ids, dtype=np.int64)
    trainable = np.asarray(trainable, dtype=bool)
    if len(ids) < 2:
        raise SkipRow("fewer than 2 tokens")
    inputs = ids[:-1]
    labels = np.where(trainable[1:], ids[1:], IGNORE_INDEX)
    if len(inputs) > seq_len:
        if overlong == "skip":
            raise SkipRow(f"longer than seq_len={seq_len} (data.overlong: skip)")
        inputs, labels = inputs[:seq_len], labels[:seq_len]
        skips.note(f"truncated to seq_len={seq_len} (data.overlong: truncate)")
    if not (labels != IGNORE_INDEX).any():
        raise SkipRow(f"the prompt fills all seq_len={seq_len} positions, no response token is left")
    return inputs, labels


def nonempty_string(record: dict, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise SkipRow(f"no '{key}' field (has: {', '.join(sorted(record)[:8])}; rename with data.columns)")
        return ""
    if not isinstance(value, str):
        raise SkipRow(f"'{key}' is {type(value).__name__}, not a string")
    if required and not value.strip():
        raise SkipRow(f"empty '{key}'")
    return value


# ----------------------------------------------------------------------------------------------
# Examples


def detect_format(rows: Sequence[Row], fmt: str, what: str) -> str:
    if fmt != "auto":
        return fmt
    first = rows[0].record
    if "messages" in first:
        chosen = "messages"
    elif "instruction" in first and "output" in first:
        chosen = "alpaca"
    else:
        raise DataError(f"{what}: cannot tell the format from the first row ({rows[0].where}, keys: "
                        f"{', '.join(sorted(first)[:8])}); expected 'messages' or 'instruction' + 'output': "
                        "set data.format or rename columns with data.columns")
    logger.info("%s: data.format auto -> %s (from the keys of %s)", what, chosen, rows[0].where)
    return chosen


def encode_alpaca(record: dict, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    instruction = nonempty_string(record, "instruction")
    context = nonempty_string(record, "input", required=False)
    output = nonempty_string(record, "output")
    template = ALPACA_PROMPT_WITH_INPUT if context.strip() else ALPACA_PROMPT
    prompt = tokenizer.encode(template.format(instruction=instruction, input=context))
    response = tokenizer.encode(output) + [tokenizer.eos_id]
    return prompt + response, [False] * len(prompt) + [True] * len(response)


def encode_messages(record: dict, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    try:
        messages = check_messages(record.get("messages"), "'messages'")
    except ValueError as e:
        raise SkipRow(str(e)) from None
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise SkipRow("no non-empty assistant message to learn")
    return tokenize_chat(tokenizer, messages)


def build_sft_examples(rows: Sequence[Row], fmt: str, tokenizer: Tokenizer, seq_len: int, overlong: str,
                       what: str) -> list[tuple[np.ndarray, np.ndarray]]:
    skips = SkipLog(what)
    if not rows:
        raise DataError(f"{what}: no rows")
    fmt = detect_format(rows, fmt, what)
    encode = encode_alpaca if fmt == "alpaca" else encode_messages
    examples = []
    for row in rows:
        try:
            ids, trainable = encode(row.record, tokenizer)
            examples.append(shift_and_fit(ids, trainable, seq_len, overlong, skips))
        except (SkipRow, ChatTemplateError) as e:  # a template refusing one conversation skips that row
            skips.skip(str(e), row.where)
    require_some(len(examples), len(rows), skips, what)
    skips.log_summary(len(rows))
    return examples


# ----------------------------------------------------------------------------------------------
# Batches


def pad_rows(pieces: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], seq_len: int, pad_id: int,
             document_aware: bool) -> dict[str, np.ndarray]:
    """Rows built from one or more (inputs, labels) pieces each, padded to seq_len."""
    B = len(pieces)
    input_ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    labels = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    if document_aware:
        position_ids = np.zeros((B, seq_len), dtype=np.int64)
        document_ids = np.zeros((B, seq_len), dtype=np.int64)
    for b, row in enumerate(pieces):
        t = 0
        for d, (inp, lab) in enumerate(row):
            n = len(inp)
            input_ids[b, t : t + n] = inp
            labels[b, t : t + n] = lab
            if document_aware:
                position_ids[b, t : t + n] = np.arange(n)
                document_ids[b, t : t + n] = d
            t += n
        if document_aware and t < seq_len:  # the padding is a document of its own
            position_ids[b, t:] = np.arange(seq_len - t)
            document_ids[b, t:] = len(row)
    batch = {"input_ids": input_ids, "labels": labels}
    if document_aware:
        batch["position_ids"] = position_ids
        batch["document_ids"] = document_ids
    return batch


class SFTBatches(EpochBatches):
    """One example per row, padded."""

    def __init__(self, examples, *, seq_len: int, pad_id: int, **kw):
        self.examples, self.seq_len, self.pad_id = examples, seq_len, pad_id
        super().__init__(kind="sft", num_items=len(examples), **kw)

    def make_batch(self, rows):
        return pad_rows([[self.examples[i]] for i in rows], self.seq_len, self.pad_id, False)


def greedy_pack(order: Sequence[int], lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    """Consecutive examples fill a row until the next one does not fit; examples are never split."""
    rows, current, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if current and used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    if current:
        rows.append(current)
    return rows


class PackedSFTBatches(EpochBatches):
    """Several examples per row. Every rank packs its share; all ranks keep the smallest row count
    (each can compute the others' packing from the lengths), so they stay in step."""

    def __init__(self, examples, *, seq_len: int, pad_id: int, document_aware: bool, **kw):
        self.examples, self.seq_len, self.pad_id, self.document_aware = examples, seq_len, pad_id, document_aware
        self.lengths = np.array([len(inp) for inp, _ in examples], dtype=np.int64)
        super().__init__(kind="sft_packed", num_items=len(examples), **kw)

    def plan(self, epoch: int):
        order = epoch_permutation(self.num_items, self.seed, epoch) if not self.finite else np.arange(self.num_items)
        mine = greedy_pack(rank_slice(order, self.rank, self.world_size), self.lengths, self.seq_len)
        fewest = min(len(greedy_pack(rank_slice(order, r, self.world_size), self.lengths, self.seq_len))
                     for r in range(self.world_size))
        return mine[:fewest]

    def make_batch(self, rows):
        pieces = [[self.examples[i] for i in row] for row in rows]
        return pad_rows(pieces, self.seq_len, self.pad_id, self.document_aware)


def sft_batches(cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, seq_len: int, split: str, rank: int,
                world_size: int, seed: int, opener: StreamOpener | None = None):
    """The SFT batch source for `build_dataloader`."""
    what = f"sft {split} data ({cfg.path})"
    rows, _ = read_split_rows(cfg, split, opener)
    examples = build_sft_examples(rows, cfg.format, tokenizer, seq_len, cfg.overlong, what)
    kw: dict[str, Any] = dict(seq_len=seq_len, pad_id=tokenizer.pad_id, batch_size=batch_size, split=split, rank=rank,
                              world_size=world_size, seed=seed, what=what,
                              identity={"path": cfg.path, "seq_len": seq_len, "packing": cfg.packing})
    if cfg.packing:
        return PackedSFTBatches(examples, document_aware=cfg.document_aware, **kw)
    return SFTBatches(examples, **kw)
