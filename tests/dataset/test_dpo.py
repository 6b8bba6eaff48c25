"""DPO: shared prompt, masks on the completions only, strings and message lists, bad rows."""

import logging

import numpy as np
import pytest
import torch

from src.dataset import IGNORE_INDEX, DataError, TokenizerConfig, build_dataloader, build_tokenizer

from src.dataset.dpo import load_prompts
from src.dataset.loader import to_tensors

from .helpers import NO_SYSTEM_TEMPLATE, collect, data_cfg, hf_dir_with_chat_template, write_jsonl

TOK = build_tokenizer(TokenizerConfig())
KEYS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def loader(path, seq_len=64, batch_size=1, split="train", rank=0, world_size=1, **kw):
    cfg = data_cfg(type="local", path=str(path), prefetch=0, **kw)
    return build_dataloader("dpo", cfg, TOK, batch_size=batch_size, seq_len=seq_len, split=split, rank=rank,
                            world_size=world_size, seed=0, pin_memory=False)


def learned(labels):
    return TOK.decode([t for t in labels.tolist() if t != IGNORE_INDEX])


def test_string_pairs_token_by_token(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}])
    (b,) = collect(loader(path), 1)
    assert set(b) == set(KEYS) | {"example_ids"} and all(b[k].shape == (1, 64) for k in KEYS)
    assert b["example_ids"].tolist() == [0] and b["example_ids"].dtype == torch.int64
    prompt = TOK.encode("Q: 2+2?\nA:")
    for side, completion in (("chosen", " 4"), ("rejected", " 5")):
        ids = prompt + TOK.encode(completion) + [TOK.eos_id]
        n = len(ids) - 1
        assert b[f"{side}_input_ids"][0, :n].tolist() == ids[:-1]
        want = [IGNORE_INDEX] * (len(prompt) - 1) + ids[len(prompt) :]
        assert b[f"{side}_labels"][0, :n].tolist() == want
        assert (b[f"{side}_labels"][0, n:] == IGNORE_INDEX).all()
        assert (b[f"{side}_input_ids"][0, n:] == TOK.pad_id).all()
    assert b["chosen_input_ids"][0, : len(prompt)].tolist() == b["rejected_input_ids"][0, : len(prompt)].tolist()


def test_message_lists_and_full_conversation_form(tmp_path):
    user = {"role": "user", "content": "Name a color."}
    rows = [
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "No."}]},
        {"prompt": "Name a color.", "chosen": "Blue.", "rejected": [{"role": "assistant", "content": "No."}]},
        {"chosen": [user, {"role": "assistant", "content": "Blue."}],  # no prompt: the shared prefix
         "rejected": [user, {"role": "assistant", "content": "No."}]},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    batches = collect(loader(path, seq_len=96), 3)
    first = batches[0]
    for b in batches:  # the three forms give the same tokens
        for k in KEYS:
            assert b[k].tolist() == first[k].tolist()
    assert learned(first["chosen_labels"][0]) == "Blue.<|im_end|>"
    assert learned(first["rejected_labels"][0]) == "No.<|im_end|>"
    assert TOK.decode(first["chosen_input_ids"][0].tolist()).startswith("<|im_start|>user\nName a color.<|im_end|>")


def test_multi_turn_prompt_is_never_learned(tmp_path):
    prompt = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
              {"role": "user", "content": "Joke?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": "Knock knock.", "rejected": "No."}])
    (b,) = collect(loader(path, seq_len=128), 1)
    assert learned(b["chosen_labels"][0]) == "Knock knock.<|im_end|>"


def test_bad_rows_are_counted_skips(tmp_path, caplog):
    long_prompt = "p" * 100
    rows = [
        {"prompt": "fine", "chosen": "yes", "rejected": "no"},
        {"prompt": "x", "chosen": "", "rejected": "no"},
        {"prompt": "x", "chosen": "same", "rejected": "same"},
        {"prompt": long_prompt, "chosen": "yes", "rejected": "no"},
        {"prompt": "x", "rejected": "no"},
        {"prompt": "x", "chosen": [{"role": "assistant"}], "rejected": "no"},
        {"chosen": "a", "rejected": "b"},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ld = loader(path, seq_len=32)
    assert ld.source.num_items == 1
    for reason in ("empty 'chosen'", "chosen equals rejected", "prompt fills all seq_len=32", "no 'chosen' field",
                   "needs string 'role' and 'content'", "no 'prompt' field", "used 1 of 7 rows"):
        assert reason in caplog.text, reason
    nothing = write_jsonl(tmp_path / "n.jsonl", rows[1:])
    with pytest.raises(DataError, match="none of the 6 rows is usable"):
        loader(nothing, seq_len=32)


def test_empty_string_prompt_is_a_counted_skip(tmp_path, caplog):
    # Without a prompt token, the first completion token would be no position's target.
    rows = [{"prompt": "", "chosen": "yes", "rejected": "no"}, {"prompt": "q", "chosen": "yes", "rejected": "no"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ld = loader(path)
    assert ld.source.num_items == 1
    assert "p.jsonl:1: empty prompt" in caplog.text and "used 1 of 2 rows (1 empty prompt)" in caplog.text


def test_chat_template_error_is_a_counted_skip(tmp_path, caplog):
    pytest.importorskip("transformers")
    hf_dir = hf_dir_with_chat_template(tmp_path, NO_SYSTEM_TEMPLATE)
    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=hf_dir))
    good = {"prompt": "alpha", "chosen": "beta", "rejected": "gamma"}
    refused = dict(good, prompt=[{"role": "system", "content": "delta"}, {"role": "user", "content": "alpha"}])
    path = write_jsonl(tmp_path / "p.jsonl", [good, refused, good])
    cfg = data_cfg(type="local", path=path, prefetch=0)
    with caplog.at_level(logging.WARNING):
        ld = build_dataloader("dpo", cfg, tok, batch_size=1, seq_len=32, split="train", rank=0, world_size=1, seed=0,
                              pin_memory=False)
        prompts = load_prompts(cfg, tok)
    assert ld.source.num_items == 2 and len(prompts) == 2
    assert "p.jsonl:2: the chat template of" in caplog.text and "System role not supported" in caplog.text


def test_long_completions_follow_the_policy(tmp_path, caplog):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "c" * 100, "rejected": "r"},
                                              {"prompt": "q", "chosen": "c", "rejected": "r"}])
    (b,) = collect(loader(path, seq_len=16, batch_size=2), 1)
    assert b["chosen_input_ids"].shape == (2, 16)
    with caplog.at_level(logging.WARNING):
        assert loader(path, seq_len=16, overlong="skip").source.num_items == 1
    assert "longer than seq_len=16" in caplog.text


def test_truncations_are_counted_per_kept_pair(tmp_path, caplog):
    """Both completions too long: one pair truncated, not two (the summary counts rows); a skipped
    pair (chosen == rejected) counts as skipped only."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "c" * 100, "rejected": "r" * 100},
                                              {"prompt": "q", "chosen": "c" * 100, "rejected": "c" * 100},
                                              {"prompt": "q", "chosen": "c", "rejected": "r"}])
    with caplog.at_level(logging.WARNING):
        loader(path, seq_len=16)
    assert "used 2 of 3 rows" in caplog.text
    assert "1 with a completion truncated to seq_len=16" in caplog.text


def test_prompt_source_for_online_rl(tmp_path):
    from src.dataset.dpo import load_prompts

    rows = [{"prompt": "Tell me a joke."}, {"prompt": [{"role": "user", "content": "Hi"}]}, {"prompt": ""}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    prompts = load_prompts(data_cfg(type="local", path=str(path)), TOK)
    assert prompts[0] == TOK.encode("Tell me a joke.")
    assert TOK.decode(prompts[1]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert len(prompts) == 2


def distinct_pairs(tmp_path, n=11):
    rows = [{"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]
    rows.insert(3, {"prompt": "x", "chosen": "", "rejected": "no"})  # a skipped row: ids count usable pairs
    return write_jsonl(tmp_path / "p.jsonl", rows)


def pair_of(batch, b):
    return TOK.decode([t for t in batch["chosen_input_ids"][b].tolist() if t != TOK.pad_id])


def test_example_ids_name_the_pair_whatever_the_shuffle_and_rank(tmp_path):
    from src.dataset.sampling import epoch_permutation, rank_slice

    path = distinct_pairs(tmp_path)
    per_rank = {}
    for rank in range(2):
        ld = loader(path, batch_size=2, rank=rank, world_size=2)
        assert ld.source.num_items == 11
        ids = []
        for batch in collect(ld, 4):  # 5 pairs per rank, batch 2: two batches per epoch, so two epochs
            for b, i in enumerate(batch["example_ids"].tolist()):
                assert pair_of(batch, b) == f"q{i}yes {i}"  # the index among the usable pairs (skip excluded)
                ids.append(i)
        want = [rank_slice(epoch_permutation(11, 0, epoch), rank, 2)[:4].tolist() for epoch in (0, 1)]
        assert ids == want[0] + want[1]
        per_rank[rank] = ids
    assert not set(per_rank[0][:4]) & set(per_rank[1][:4])  # ranks read disjoint pairs in an epoch
    assert per_rank[0][:4] != per_rank[0][4:] and per_rank[0] != sorted(per_rank[0])  # really shuffled


def test_in_order_covers_every_pair_once_over_ranks(tmp_path):
    path = distinct_pairs(tmp_path)
    for split_loader in (loader(path, batch_size=2), loader(path, batch_size=4, split="val", val_fraction=0.5)):
        source = split_loader.source
        for world_size in (1, 2, 3):
            ids = []
            for rank in range(world_size):
                for batch in source.in_order(4, rank=rank, world_size=world_size):
                    batch = to_tensors(batch, pin=False)
                    assert 1 <= len(batch["example_ids"]) <= 4
                    ids += batch["example_ids"].tolist()
                    for b, i in enumerate(batch["example_ids"].tolist()):  # the same rows as the training batches
                        want = source.make_batch(np.array([i]))
                        assert batch["chosen_labels"][b].tolist() == want["chosen_labels"][0].tolist()
            assert ids == list(range(source.num_items))  # contiguous blocks, in order, none dropped
        assert source.epoch == 0 and source.batch == 0  # the pass does not move the loader
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        next(source.in_order(4, rank=2, world_size=2))
