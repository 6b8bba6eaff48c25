"""Streaming pretraining: on-the-fly tokenization and packing, rank split, validation, exact resume."""

import pytest
import torch

from src.dataset import DataError, TokenizerConfig, build_dataloader, build_tokenizer
from src.dataset.loader import DataLoader
from src.dataset.pretrain import prepare, pretrain_batches
from src.dataset.shards import open_shards, read_meta

from .helpers import collect, data_cfg, texts, write_jsonl

TOK = build_tokenizer(TokenizerConfig())
T, B = 16, 2
DOCS = texts(120, seed=3)


def opener_of(docs):
    """An injected stream: the same rows every epoch (what `datasets` gives without shuffling)."""
    return lambda epoch: iter([{"text": d} for d in docs])


def make(split="train", rank=0, world_size=1, docs=DOCS, prefetch=2, **kw):
    cfg = data_cfg(type="streaming", path="local/generator", prefetch=prefetch, **kw)
    source = pretrain_batches(cfg, TOK, batch_size=B, seq_len=T, split=split, rank=rank, world_size=world_size,
                              seed=0, opener=opener_of(docs))
    return DataLoader(source, pin_memory=False, prefetch=prefetch)


def stream_of(docs):
    return [t for d in docs for t in TOK.encode(d) + [TOK.eos_id]]


def rows(batches):
    return [torch.cat([b["input_ids"][i], b["labels"][i, -1:]]).tolist() for b in batches for i in range(B)]


def test_packs_the_token_stream_in_order():
    got = rows(collect(make(), 10))
    stream = stream_of(DOCS)
    for k, row in enumerate(got):  # window k starts at token k * T (stride T, one token overlap)
        assert row == stream[k * T : k * T + T + 1]


def test_ranks_and_validation_are_disjoint():
    val_docs = 10
    val = make(split="val", val_documents=val_docs)
    assert rows(list(val)) == [stream_of(DOCS[:val_docs])[k * T : k * T + T + 1] for k in range(len(val) * B)]
    for rank in range(2):
        mine = DOCS[val_docs + rank :: 2]
        got = rows(collect(make(rank=rank, world_size=2, val_documents=val_docs), 5))
        stream = stream_of(mine)
        assert got == [stream[k * T : k * T + T + 1] for k in range(len(got))]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_is_exact_across_epochs(prefetch):
    docs = DOCS[:3]  # a short stream: several epochs within the run
    reference = rows(collect(make(docs=docs, prefetch=prefetch, document_aware=True), 40))
    loader = make(docs=docs, prefetch=prefetch, document_aware=True)
    it = iter(loader)
    seen = [next(it) for _ in range(30)]
    state = loader.state_dict()
    assert state["epoch"] >= 1 and (state["doc"] > 0 or state["offset"] > 0)
    resumed = make(docs=docs, prefetch=prefetch, document_aware=True)
    resumed.load_state_dict(state)
    assert rows(seen) + rows(collect(resumed, 10)) == reference


def test_document_aware_batches_from_the_stream():
    (b,) = collect(make(document_aware=True), 1)
    for inp, pos in zip(b["input_ids"], b["position_ids"]):
        starts = [t for t in range(1, T) if inp[t - 1] == TOK.eos_id]
        assert [t for t in range(1, T) if pos[t] == 0] == starts


def test_bad_rows_are_counted_not_fatal(caplog):
    docs = [{"text": d} for d in DOCS[:2]] + [{"other": 1}] + [{"text": d} for d in DOCS[2:40]]
    cfg = data_cfg(type="streaming", path="local/generator")
    source = pretrain_batches(cfg, TOK, batch_size=B, seq_len=T, split="train", rank=0, world_size=1, seed=0,
                              opener=lambda epoch: iter(docs))
    got = rows(collect(DataLoader(source, pin_memory=False, prefetch=0), 30))
    stream = stream_of(DOCS[:40])
    assert got == [stream[k * T : k * T + T + 1] for k in range(30 * B)]
    assert source.skips.counts and "no 'text' field" in caplog.text


def test_a_stream_too_short_for_one_batch_is_clear():
    with pytest.raises(DataError, match="fewer than one batch needs"):
        collect(make(docs=["ab"], prefetch=0), 1)


def test_local_files_through_datasets_streaming(tmp_path):
    pytest.importorskip("datasets")
    write_jsonl(tmp_path / "part0.jsonl", [{"content": d} for d in DOCS[:60]])
    write_jsonl(tmp_path / "part1.jsonl", [{"content": d} for d in DOCS[60:]])
    cfg = data_cfg(type="streaming", provider="huggingface", path=str(tmp_path), split="train",
                   columns={"content": "text"}, val_documents=5)
    kw = dict(batch_size=B, seq_len=T, rank=0, world_size=1, seed=0, pin_memory=False)
    train = build_dataloader("pretrain", cfg, TOK, split="train", **kw)
    got = rows(collect(train, 6))
    stream = stream_of(DOCS[5:])
    assert got == [stream[k * T : k * T + T + 1] for k in range(6 * B)]
    state = train.state_dict()
    resumed = build_dataloader("pretrain", cfg, TOK, split="train", **kw)
    resumed.load_state_dict(state)
    assert rows(collect(resumed, 2)) == [stream[k * T : k * T + T + 1] for k in range(6 * B, 8 * B)]
    val = build_dataloader("pretrain", cfg, TOK, split="val", **kw)
    assert rows(list(val))[0] == stream_of(DOCS[:5])[: T + 1]


def test_streaming_shuffle_buffer_keeps_validation_out(tmp_path):
    pytest.importorskip("datasets")
    docs = [f"doc{i:03d} " * 3 for i in range(60)]
    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    cfg = data_cfg(type="streaming", path=str(tmp_path), val_documents=10, shuffle_buffer=16, prefetch=0)
    loader = build_dataloader("pretrain", cfg, TOK, batch_size=1, seq_len=8, split="train", rank=0, world_size=1,
                              seed=0, pin_memory=False)
    source = loader.source
    text = "".join(TOK.decode(b["input_ids"][0].tolist()) for b in collect(loader, 100))
    seen = {d for d in docs if d.strip().split()[0] in text}
    assert source.epoch == 0  # all within the first pass
    assert not any(d in seen for d in docs[:10]) and len(seen) > 10


def test_a_failing_stream_names_the_row():
    def broken(epoch):
        yield {"text": "ab"}  # shorter than one batch: the reader must go on to row 1
        raise OSError("connection reset")

    cfg = data_cfg(type="streaming", path="remote/set")
    source = pretrain_batches(cfg, TOK, batch_size=B, seq_len=T, split="train", rank=0, world_size=1, seed=0,
                              opener=broken)
    with pytest.raises(DataError, match=r"remote/set\[train\]: reading row 1 failed: OSError: connection reset"):
        source.next_batch()


def test_malformed_local_file_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    cfg = data_cfg(type="streaming", path=str(tmp_path), prefetch=0)
    loader = build_dataloader("pretrain", cfg, TOK, batch_size=1, seq_len=4, split="train", rank=0, world_size=1,
                              seed=0, pin_memory=False)
    with pytest.raises(DataError, match="reading row"):
        next(iter(loader))


@pytest.mark.parametrize("max_documents", [None, 5])
def test_prepare_of_a_streaming_config_holds_out_val_documents(tmp_path, max_documents):
    # The shards must split the rows as training on the same streaming config does: the first
    # val_documents rows are validation, training reads (max_documents) rows after them.
    cfg = data_cfg(type="streaming", path="local/generator", val_documents=3, max_documents=max_documents)
    out = tmp_path / "shards"
    summary = prepare(cfg, str(out), progress=False, opener=opener_of(DOCS))
    train_docs = DOCS[3:] if max_documents is None else DOCS[3:3 + max_documents]
    assert read_meta(str(out))["splits"]["val"]["documents"] == 3
    assert summary["train_tokens"] == len(stream_of(train_docs))
    (val,) = open_shards(str(out), "val", TOK)
    (train,) = open_shards(str(out), "train", TOK)
    assert val.tokens.tolist() == stream_of(DOCS[:3]) and train.tokens.tolist() == stream_of(train_docs)
    streamed_val = pretrain_batches(cfg, TOK, batch_size=1, seq_len=T, split="val", rank=0, world_size=1, seed=0,
                                    opener=opener_of(DOCS))
    assert streamed_val.shards[0].tokens.tolist() == val.tokens.tolist()
