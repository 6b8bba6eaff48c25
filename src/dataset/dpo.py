"""Preference data for DPO: a prompt, a chosen and a rejected completion per row.

Row forms:

    strings:  {"prompt": str, "chosen": str, "rejected": str}
              plain concatenation prompt + completion + EOS (no template).
    messages: {"prompt": str | [messages], "chosen": [messages] | str, "rejected": [messages] | str}
              rendered with the chat template; a string prompt becomes one user message, a string
              completion one assistant message. Completions that repeat the prompt messages first
              (the full-conversation form) are accepted; without a `prompt` field the prompt is
              the messages that chosen and rejected share.

Batches: `chosen_input_ids`, `chosen_labels`, `rejected_input_ids`, `rejected_labels`, each
(B, T), labels shifted and -100 on the prompt and the padding, and `example_ids` (B,): the index
of each pair among the usable pairs of its split (0..N-1, bad rows skipped), the same whatever the
shuffle, epoch or rank. Both sequences of a pair start with the same prompt tokens.

`DPOBatches.in_order()` is one finite, unshuffled pass over every pair of a split (the last batch
may be short), split into contiguous per-rank blocks: the pass that precomputes reference
log-probabilities (`src.trainer.launch.with_reference_logps`), matched back by `example_ids`.

Bad rows are counted, logged skips: missing fields, an empty chosen or rejected completion,
chosen equal to rejected (no preference to learn), an empty prompt (no token before the
completion, so its first token could not be learned), and a prompt that leaves no room for a
completion token within seq_len (whatever `data.overlong` says). Longer pairs are truncated
on the right or skipped by `data.overlong`.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np

from .base import DataConfig
from .sampling import EpochBatches
from .sft import SkipRow, pad_rows, read_split_rows, shift_and_fit
from .sources import DataError, Row, SkipLog, StreamOpener, require_some
from .tokenizer import ChatTemplateError, Message, Tokenizer, check_messages, tokenize_chat

Pair = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]  # (chosen, rejected) (inputs, labels)


def _as_messages(value: Any, key: str, role: str) -> list[Message]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    try:
        return check_messages(value, f"'{key}'")
    except ValueError as e:
        raise SkipRow(str(e)) from None


def _completion_text(messages: Sequence[Message]) -> str:
    return "".join(m["content"] for m in messages if m["role"] == "assistant")


def encode_pair(record: dict, tokenizer: Tokenizer) -> tuple[tuple[list[int], list[bool]], tuple[list[int], list[bool]]]:
    """(ids, trainable) of the chosen and of the rejected sequence, sharing the prompt tokens."""
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise SkipRow(f"no '{key}' field (has: {', '.join(sorted(record)[:8])}; rename with data.columns)")
    prompt, chosen, rejected = record.get("prompt"), record["chosen"], record["rejected"]
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        for key, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise SkipRow(f"empty '{key}'")
        if chosen == rejected:
            raise SkipRow("chosen equals rejected")
        prompt_ids = tokenizer.encode(prompt)
        if not prompt_ids:  # the first completion token would be no position's target (labels are shifted)
            raise SkipRow("empty prompt")
        out = []
        for completion in (chosen, rejected):
            completion_ids = tokenizer.encode(completion) + [tokenizer.eos_id]
            out.append((prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)))
        return out[0], out[1]
    chosen_msgs = _as_messages(chosen, "chosen", "assistant")
    rejected_msgs = _as_messages(rejected, "rejected", "assistant")
    if prompt is None:
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise SkipRow("no 'prompt' field, and string completions carry no prompt")
        shared = 0
        while shared < min(len(chosen_msgs), len(rejected_msgs)) and chosen_msgs[shared] == rejected_msgs[shared]:
            shared += 1
        prompt_msgs = chosen_msgs[:shared]
    else:
        prompt_msgs = _as_messages(prompt, "prompt", "user")
    if not prompt_msgs:
        raise SkipRow("empty prompt")
    completions = []
    for key, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
        if msgs[: len(prompt_msgs)] == prompt_msgs:  # full-conversation form: strip the repeated prompt
            msgs = msgs[len(prompt_msgs) :]
        if not _completion_text(msgs).strip():
            raise SkipRow(f"empty '{key}' (no assistant content after the prompt)")
        completions.append(msgs)
    if completions[0] == completions[1]:
        raise SkipRow("chosen equals rejected")
    encoded = [tokenize_chat(tokenizer, prompt_msgs + c, trainable_from=len(prompt_msgs)) for c in completions]
    return encoded[0], encoded[1]


def build_pairs(rows: Sequence[Row], tokenizer: Tokenizer, seq_len: int, overlong: str, what: str) -> list[Pair]:
    skips = SkipLog(what)
    if not rows:
        raise DataError(f"{what}: no rows")
    pairs = []
    for row in rows:
        # Truncations are noted per pair, and only for pairs kept: the summary counts rows.
        fitted = SkipLog(what)
        try:
            chosen, rejected = encode_pair(row.record, tokenizer)
            pairs.append((shift_and_fit(*chosen, seq_len, overlong, fitted),
                          shift_and_fit(*rejected, seq_len, overlong, fitted)))
        except (SkipRow, ChatTemplateError) as e:  # a template refusing one conversation skips that row
            skips.skip(str(e), row.where)
            continue
        if fitted.notes:
            skips.note(f"with a completion truncated to seq_len={seq_len} (data.overlong: truncate)")
    require_some(len(pairs), len(rows), skips, what)
    skips.log_summary(len(rows))
    return pairs


class DPOBatches(EpochBatches):
    def __init__(self, pairs: list[Pair], *, seq_len: int, pad_id: int, **kw):
        self.pairs, self.seq_len, self.pad_id = pairs, seq_len, pad_id
        super().__init__(kind="dpo", num_items=len(pairs), **kw)

    def make_batch(self, rows):
        chosen = pad_rows([[self.pairs[i][0]] for i in rows], self.seq_len, self.pad_id, False)
        rejected = pad_rows([[self.pairs[i][1]] for i in rows], self.seq_len, self.pad_id, False)
        return {"chosen_input_ids": chosen["input_ids"], "chosen_labels": chosen["labels"],
                "rejected_input_ids": rejected["input_ids"], "rejected_labels": rejected["labels"],
                "example_ids": np.asarray(rows, dtype=np.int64)}  # (B,) indices into self.pairs

    def in_order(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Every pair of the split once, in index order, `batch_size` at a time (the last batch may be
        shorter): rank r of world_size gets the contiguous block [r * N // W, (r + 1) * N // W), so the
        ranks together cover all N pairs exactly once (no remainder dropped, unlike the training
        plans). Deterministic and independent of the loader's position."""
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"in_order needs batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, "
                             f"{rank}, {world_size}")
        start, stop = rank * self.num_items // world_size, (rank + 1) * self.num_items // world_size
        for b in range(start, stop, batch_size):
            yield self.make_batch(np.arange(b, min(b + batch_size, stop)))


def load_prompts(cfg: DataConfig, tokenizer: Tokenizer, split: str = "train",
                 opener: StreamOpener | None = None) -> list[list[int]]:
    """Token ids of every row's `prompt`, ready for generation: the prompt source of online RL (PPO).

    A string prompt is encoded as is; a message list is rendered with the chat template and the
    assistant generation prompt. Rows without a usable prompt are counted skips."""
    what = f"prompts {split} ({cfg.path})"
    rows, _ = read_split_rows(cfg, split, opener)
    skips, prompts = SkipLog(what), []
    for row in rows:
        prompt = row.record.get("prompt")
        try:
            if isinstance(prompt, str) and prompt.strip():
                prompts.append(tokenizer.encode(prompt))
            elif isinstance(prompt, list):
                prompts.append(tokenize_chat(tokenizer, _as_messages(prompt, "prompt", "user"),
                                             add_generation_prompt=True)[0])
            else:
                raise SkipRow("no non-empty 'prompt' (a string or a message list)")
        except (SkipRow, ChatTemplateError) as e:
            skips.skip(str(e), row.where)
    require_some(len(prompts), len(rows), skips, what)
    skips.log_summary(len(rows))
    return prompts


def dpo_batches(cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, seq_len: int, split: str, rank: int,
                world_size: int, seed: int, opener: StreamOpener | None = None):
    """The DPO batch source for `build_dataloader`."""
    what = f"dpo {split} data ({cfg.path})"
    rows, _ = read_split_rows(cfg, split, opener)
    pairs = build_pairs(rows, tokenizer, seq_len, cfg.overlong, what)
    return DPOBatches(pairs, seq_len=seq_len, pad_id=tokenizer.pad_id, batch_size=batch_size, split=split, rank=rank,
                      world_size=world_size, seed=seed, what=what, identity={"path": cfg.path, "seq_len": seq_len})
