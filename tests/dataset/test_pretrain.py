"""Pretraining batches over shards: windows, order, rank disjointness, exact resume, documents."""

import numpy as np
import pytest
import torch

from src.dataset import DataError, TokenizerConfig, build_dataloader, build_tokenizer, cu_seqlens_from_document_ids
from src.dataset.pretrain import make_lm_batch, prepare

from .helpers import collect, data_cfg, texts, write_jsonl

TOK = build_tokenizer(TokenizerConfig())
T = 16


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    src = write_jsonl(tmp / "c.jsonl", [{"text": t} for t in texts(200)])
    out = tmp / "shards"
    prepare(data_cfg(type="shards", path=str(out), source={"type": "local", "path": src}, val_fraction=0.1,
                     shard_size=4000), str(out), progress=False)
    return str(out)


def make(shard_dir, split="train", rank=0, world_size=1, seed=0, batch_size=4, prefetch=2, **kw):
    cfg = data_cfg(type="shards", path=shard_dir, prefetch=prefetch, **kw)
    return build_dataloader("pretrain", cfg, TOK, batch_size=batch_size, seq_len=T, split=split, rank=rank,
                            world_size=world_size, seed=seed, pin_memory=True)


def windows_of(batches):
    """Each row as (input_ids + last label): the full window of T + 1 tokens."""
    return [tuple(torch.cat([b["input_ids"][i], b["labels"][i, -1:]]).tolist())
            for b in batches for i in range(len(b["input_ids"]))]


def all_windows(shard_dir, split="train"):
    loader = make(shard_dir, split=split)
    src = loader.source
    return {tuple(int(x) for x in s.tokens[w * T : w * T + T + 1]) for s in src.shards
            for w in range((len(s.tokens) - 1) // T)}


def test_labels_are_shifted_inputs(shard_dir):
    (b,) = collect(make(shard_dir), 1)
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (4, T)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])


def test_one_epoch_reads_every_window_once(shard_dir):
    loader = make(shard_dir, batch_size=1)
    n = loader.source.num_batches
    got = windows_of(collect(loader, n))
    assert len(set(got)) == len(got) == n
    assert set(got) == all_windows(shard_dir)


def test_order_is_deterministic_and_seeded(shard_dir):
    a = windows_of(collect(make(shard_dir, seed=1), 6))
    b = windows_of(collect(make(shard_dir, seed=1, prefetch=0), 6))
    c = windows_of(collect(make(shard_dir, seed=2), 6))
    assert a == b and a != c


def test_ranks_read_disjoint_windows(shard_dir):
    per_rank = []
    for rank in range(3):
        loader = make(shard_dir, rank=rank, world_size=3, batch_size=2)
        per_rank.append(windows_of(collect(loader, loader.source.num_batches)))
    assert len({len(w) for w in per_rank}) == 1  # ranks stay in step
    flat = [w for ws in per_rank for w in ws]
    assert len(flat) == len(set(flat))


def test_epochs_repeat_in_a_new_order(shard_dir):
    loader = make(shard_dir, batch_size=1)
    n = loader.source.num_batches
    batches = collect(loader, 2 * n + 1)
    first, second = windows_of(batches[:n]), windows_of(batches[n : 2 * n])
    assert set(first) == set(second) and first != second
    assert loader.state_dict()["epoch"] == 2


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_continues_with_the_next_unseen_batch(shard_dir, prefetch):
    reference = windows_of(collect(make(shard_dir, rank=1, world_size=2, prefetch=prefetch), 30))
    loader = make(shard_dir, rank=1, world_size=2, prefetch=prefetch)
    it = iter(loader)
    seen = [next(it) for _ in range(13)]  # crosses an epoch boundary on the way
    state = loader.state_dict()
    assert state["batch"] + state["epoch"] * loader.source.num_batches == 13
    resumed = make(shard_dir, rank=1, world_size=2, prefetch=prefetch)
    resumed.load_state_dict(state)
    assert windows_of(seen) + windows_of(collect(resumed, 17)) == reference


def test_resume_with_other_setup_is_refused(shard_dir):
    state = make(shard_dir).state_dict()
    with pytest.raises(DataError, match="world_size: saved 1, now 2"):
        make(shard_dir, world_size=2).load_state_dict(state)


def test_val_is_one_finite_pass(shard_dir):
    loader = make(shard_dir, split="val", batch_size=2)
    first, second = windows_of(list(loader)), windows_of(list(loader))
    assert first == second and len(first) == 2 * len(loader) > 0
    with pytest.raises(TypeError, match="forever"):
        len(make(shard_dir))


def test_too_little_data_is_clear(shard_dir):
    with pytest.raises(DataError, match="fewer than batch_size"):
        make(shard_dir, split="val", batch_size=10_000)


def test_document_aware_positions_restart_at_document_starts(shard_dir):
    (b,) = collect(make(shard_dir, batch_size=8, document_aware=True), 1)
    eos = TOK.eos_id
    for inp, pos, doc in zip(b["input_ids"], b["position_ids"], b["document_ids"]):
        starts = [t for t in range(1, T) if inp[t - 1] == eos]  # a document starts after each EOS
        assert [t for t in range(1, T) if pos[t] == 0] == starts
        assert doc.tolist() == np.cumsum([0] + [1 if t in starts else 0 for t in range(1, T)]).tolist()
        assert pos[0] == 0


def test_make_lm_batch_and_cu_seqlens():
    windows = np.array([[5, 6, 7, 8, 9]])
    starts = np.array([[False, False, True, False]])
    b = make_lm_batch(windows, starts)
    assert b["labels"].tolist() == [[6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 0, 1]] and b["document_ids"].tolist() == [[0, 0, 1, 1]]
    assert [c.tolist() for c in cu_seqlens_from_document_ids(b["document_ids"])] == [[0, 2, 4]]


def test_local_type_tokenizes_in_memory(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts(50)])
    cfg = data_cfg(type="local", path=src, val_fraction=0.2)
    kw = dict(batch_size=2, seq_len=T, rank=0, world_size=1, seed=0, pin_memory=False)
    train = build_dataloader("pretrain", cfg, TOK, split="train", **kw)
    val = build_dataloader("pretrain", cfg, TOK, split="val", **kw)
    tr = {tuple(w) for w in windows_of(collect(train, train.source.num_batches))}
    va = {tuple(w) for w in windows_of(list(val))}
    assert tr and va and not (tr & va)


def test_a_split_left_empty_by_the_holdout_says_so(tmp_path):
    # One document, and the fixed hash puts row 0 in validation: the train split is empty although
    # every row is usable. The error must say that (not "none of the 1 rows is usable").
    src = write_jsonl(tmp_path / "one.jsonl", [{"text": "alpha " * 50}])
    cfg = data_cfg(type="local", path=src, val_fraction=0.5)
    with pytest.raises(DataError, match=r"split is empty: all 1 usable rows \(of 1\) fell into the other split; "
                                        r"use more documents or another data.val_fraction \(now 0.5") as e:
        build_dataloader("pretrain", cfg, TOK, batch_size=1, seq_len=T, split="train", rank=0, world_size=1, seed=0,
                         pin_memory=False)
    assert "none of" not in str(e.value)
