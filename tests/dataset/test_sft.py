"""SFT: loss only on response tokens (checked token by token), packing, truncation policy, bad rows."""

import json
import logging

import numpy as np
import pytest
import torch

from src.dataset import IGNORE_INDEX, DataError, TokenizerConfig, build_dataloader, build_tokenizer
from src.dataset.sft import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, sft_batches

from .helpers import NO_SYSTEM_TEMPLATE, collect, data_cfg, hf_dir_with_chat_template, write_jsonl

TOK = build_tokenizer(TokenizerConfig())


def loader(path, split="train", batch_size=1, seq_len=256, rank=0, world_size=1, seed=0, **kw):
    cfg = data_cfg(type="local", path=str(path), prefetch=0, **kw)
    return build_dataloader("sft", cfg, TOK, batch_size=batch_size, seq_len=seq_len, split=split, rank=rank,
                            world_size=world_size, seed=seed, pin_memory=False)


def expected_pairs(prompt_ids, response_ids):
    """Shifted (input, label) pairs for prompt + response: labels only where the target is a response token."""
    ids = prompt_ids + response_ids
    flags = [False] * len(prompt_ids) + [True] * len(response_ids)
    return ids[:-1], [t if f else IGNORE_INDEX for t, f in zip(ids[1:], flags[1:])]


def test_alpaca_masks_token_by_token(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"}]
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(rows))
    batches = collect(loader(path, seq_len=300), 2)
    got = {TOK.decode([t for t in b["labels"][0].tolist() if t != IGNORE_INDEX]): b for b in batches}
    assert set(got) == {"5<|endoftext|>", "Hi!<|endoftext|>"}
    for row in rows:
        template = ALPACA_PROMPT_WITH_INPUT if row["input"] else ALPACA_PROMPT
        prompt = TOK.encode(template.format(**row))
        inputs, labels = expected_pairs(prompt, TOK.encode(row["output"]) + [TOK.eos_id])
        b = got[row["output"] + "<|endoftext|>"]
        n = len(inputs)
        assert b["input_ids"][0, :n].tolist() == inputs
        assert b["labels"][0, :n].tolist() == labels
        assert (b["input_ids"][0, n:] == TOK.pad_id).all() and (b["labels"][0, n:] == IGNORE_INDEX).all()


def test_messages_mask_only_assistant_turns(tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
            {"role": "assistant", "content": "Rome."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    (b,) = collect(loader(path), 1)
    inp, lab = b["input_ids"][0].tolist(), b["labels"][0].tolist()
    for t, (x, y) in enumerate(zip(inp, lab)):
        if y != IGNORE_INDEX:
            assert inp[t + 1] == y if t + 1 < len(inp) else True
    learned = "".join(TOK.decode([y]) for y in lab if y != IGNORE_INDEX)
    assert learned == "Paris.<|im_end|>Rome.<|im_end|>"
    # The exact token-level layout is tested in test_tokenizer.py::test_chatml_mask_token_by_token;
    # here: every learned token is the next input token, and no user / system text is learned.
    full = TOK.decode([x for x in inp if x != TOK.pad_id])
    assert full.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_packing_keeps_document_boundaries(tmp_path):
    rows = [{"instruction": f"Task {i}", "output": "x" * (i + 1)} for i in range(12)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    packed = loader(path, seq_len=256, batch_size=2, packing=True, document_aware=True)
    (b,) = collect(packed, 1)
    for inp, lab, pos, doc in zip(b["input_ids"], b["labels"], b["position_ids"], b["document_ids"]):
        assert doc.max() >= 1  # several examples in a row
        for d in doc.unique().tolist():
            seg = (doc == d).nonzero().flatten()
            assert pos[seg].tolist() == list(range(len(seg)))  # positions restart per example
            first = seg[0].item()
            if lab[seg].ne(IGNORE_INDEX).any():  # a real example: it begins with the prompt
                assert TOK.decode(inp[first : first + 11].tolist()) == "Below is an"
    # Unpacked, the same rows each fill one row.
    assert len(collect(loader(path, seq_len=256), 12)) == 12


def test_packed_ranks_stay_in_step_and_disjoint(tmp_path):
    rows = [{"instruction": f"Task {i}", "output": "y" * (i % 5 + 1)} for i in range(40)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    seen = []
    counts = []
    for rank in range(2):
        ld = loader(path, seq_len=200, batch_size=1, packing=True, rank=rank, world_size=2)
        counts.append(ld.source.num_batches)
        for b in collect(ld, ld.source.num_batches):
            seen += [s for s in TOK.decode(b["input_ids"][0].tolist()).split("### Instruction:\n")[1:]]
    assert counts[0] == counts[1]
    tasks = [s.split("\n")[0] for s in seen]
    assert len(tasks) == len(set(tasks))


def test_truncation_policy_is_applied_and_logged(tmp_path, caplog):
    rows = [{"instruction": "Short.", "output": "ok"}, {"instruction": "Long.", "output": "z" * 500}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with caplog.at_level(logging.INFO):
        ld = loader(path, seq_len=160, batch_size=2)
    assert "1 truncated to seq_len=160" in caplog.text
    (b,) = collect(ld, 1)
    long_row = [i for i in range(2) if (b["labels"][i] == ord("z")).sum() > 0][0]
    assert (b["labels"][long_row] != IGNORE_INDEX).all().item() is False  # prompt still masked
    assert b["labels"][long_row, -1].item() == ord("z")  # cut on the right: the row is full
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ld = loader(path, seq_len=160, overlong="skip")
    assert ld.source.num_items == 1 and "longer than seq_len=160" in caplog.text


def test_prompt_longer_than_context_is_skipped(tmp_path, caplog):
    rows = [{"instruction": "q" * 400, "output": "a"}, {"instruction": "fine", "output": "b"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ld = loader(path, seq_len=200)
    assert ld.source.num_items == 1 and "prompt fills all seq_len=200" in caplog.text


def test_bad_rows(tmp_path, caplog):
    rows = [{"instruction": "ok", "output": "fine"}, {"instruction": "no output"}, {"instruction": "", "output": "x"},
            {"instruction": "x", "output": 3}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ld = loader(path)
    assert ld.source.num_items == 1
    for reason in ("no 'output' field", "empty 'instruction'", "'output' is int"):
        assert reason in caplog.text
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user"}]}, {"messages": [{"role": "user", "content": "q"}]}])
    with pytest.raises(DataError, match="none of the 2 rows is usable.*content"):
        loader(chat)
    unknown = write_jsonl(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="cannot tell the format.*data.format"):
        loader(unknown)


def test_val_split_and_resume(tmp_path):
    rows = [{"instruction": f"Task {i}", "output": f"Answer {i}"} for i in range(60)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    val = loader(path, split="val", val_fraction=0.2, batch_size=2)
    train = loader(path, val_fraction=0.2, batch_size=2)
    assert val.source.num_items + train.source.num_items == 60
    reference = collect(loader(path, val_fraction=0.2, batch_size=2), 30)
    it = iter(train)
    for _ in range(25):
        next(it)
    resumed = loader(path, val_fraction=0.2, batch_size=2)
    resumed.load_state_dict(train.state_dict())
    for a, b in zip(reference[25:], collect(resumed, 5)):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_chat_template_error_is_a_counted_skip_naming_the_row(tmp_path, caplog):
    pytest.importorskip("transformers")
    hf_dir = hf_dir_with_chat_template(tmp_path, NO_SYSTEM_TEMPLATE)
    tok = build_tokenizer(TokenizerConfig(type="huggingface", path=hf_dir))
    ok = {"messages": [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "beta"}]}
    refused = {"messages": [{"role": "system", "content": "gamma"}] + ok["messages"]}
    path = write_jsonl(tmp_path / "chat.jsonl", [ok, ok, refused, ok])
    cfg = data_cfg(type="local", path=path, prefetch=0)
    with caplog.at_level(logging.WARNING):
        src = sft_batches(cfg, tok, batch_size=1, seq_len=32, split="train", rank=0, world_size=1, seed=0)
    assert src.num_items == 3
    assert "chat.jsonl:3: the chat template of" in caplog.text and "System role not supported" in caplog.text
    assert "used 3 of 4 rows" in caplog.text


def test_packed_batches_are_always_full(tmp_path):
    # Packed plans differ per epoch: with seed 6 these 12 examples pack into 10, 9, 10 and 11 rows.
    rng = np.random.default_rng(0)
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o" * int(rng.integers(1, 250))}
                                              for _ in range(12)])
    cfg = data_cfg(type="local", path=path, packing=True, prefetch=0)

    def source(batch_size):
        return sft_batches(cfg, TOK, batch_size=batch_size, seq_len=400, split="train", rank=0, world_size=1, seed=6)

    assert [len(source(1).plan(e)) for e in range(4)] == [10, 9, 10, 11]
    nine = source(9)  # one full batch per epoch; the leftover packed rows of an epoch are not read
    assert [nine.next_batch()["input_ids"].shape[0] for _ in range(4)] == [9, 9, 9, 9] and nine.epoch == 3
    resumed = source(9)
    resumed.load_state_dict(nine.state_dict())
    assert np.array_equal(resumed.next_batch()["input_ids"], nine.next_batch()["input_ids"])
    ten = source(10)  # epoch 1 cannot fill one batch: an error naming the fix, never a short batch
    assert ten.next_batch()["input_ids"].shape[0] == 10
    with pytest.raises(DataError, match="9 rows per rank in epoch 1, fewer than batch_size=10.*more data, a smaller"):
        ten.next_batch()


def test_an_empty_split_says_so(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Task", "output": "Answer"}])  # row 0 is validation
    with pytest.raises(DataError, match="train split is empty: all 1 rows fell into the other split.*val_fraction"):
        loader(path, val_fraction=0.5)


def test_streaming_max_documents_counts_training_rows_after_the_held_out_ones():
    """As streaming pretraining reads them: the first val_documents rows are validation, then
    max_documents training rows (before, SFT and DPO counted the held-out rows in max_documents, so
    max_documents <= val_documents left no training rows)."""
    from src.dataset.sft import read_split_rows

    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    cfg = data_cfg(type="streaming", path="local/generator", val_documents=5, max_documents=4)
    train, _ = read_split_rows(cfg, "train", opener=lambda epoch: iter(records))
    val, _ = read_split_rows(cfg, "val", opener=lambda epoch: iter(records))
    assert [r.record["instruction"] for r in val] == [f"q{i}" for i in range(5)]
    assert [r.record["instruction"] for r in train] == [f"q{i}" for i in range(5, 9)]
