"""Pretraining data: the prepare step (text -> shards), window batches over shards, streaming.

Batches hold `input_ids` (B, T) and `labels` (B, T), already shifted: a window of T + 1 tokens
gives input_ids = window[:-1], labels = window[1:]. Windows follow each other with stride T, so
every token is a target exactly once per epoch. With `data.document_aware: true` a batch also
holds `position_ids` (restarting at 0 where a document starts) and `document_ids` (0, 1, ... per
row), from which attention that does not cross documents can be built (`cu_seqlens`).

Prepare step (parallel tokenizer processes; the output is byte-identical for any worker count):

    python -m src.dataset.pretrain prepare --config configs/train/X.yaml [--out DIR] [--workers N]
                                           [--overwrite] [data.key=value ...]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections import deque
from itertools import islice
from typing import Iterator, Sequence

import numpy as np

from src.utils.config import ConfigError, apply_overrides, from_dict, read_yaml

from .base import DataConfig, SourceConfig
from .sampling import EpochBatches, check_identity
from .shards import ShardWriter, TokenShard, open_shards, write_meta
from .sources import DataError, SkipLog, StreamOpener, get_text, is_validation, iter_rows, require_some
from .tokenizer import Tokenizer, TokenizerConfig, build_tokenizer

logger = logging.getLogger(__name__)

CHUNK_DOCS = 256  # documents per task handed to a tokenizer process


# ----------------------------------------------------------------------------------------------
# Batches from windows


def make_lm_batch(windows: np.ndarray, starts: np.ndarray | None) -> dict[str, np.ndarray]:
    """(B, T + 1) token windows -> shifted inputs / labels; `starts` (B, T) marks document starts."""
    windows = windows.astype(np.int64, copy=False)
    batch = {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}
    if starts is not None:
        starts = starts.copy()
        starts[:, 0] = False  # every row begins a segment; the count starts at document 0
        T = starts.shape[1]
        positions = np.broadcast_to(np.arange(T), starts.shape)
        segment_begin = np.maximum.accumulate(np.where(starts, positions, 0), axis=1)  # (B, T)
        batch["position_ids"] = (positions - segment_begin).astype(np.int64)
        batch["document_ids"] = np.cumsum(starts, axis=1, dtype=np.int64)
    return batch


def cu_seqlens_from_document_ids(document_ids) -> list:
    """Per row, the cumulative document lengths [0, l0, l0 + l1, ..., T] (flash-attn varlen style)."""
    out = []
    for row in np.asarray(document_ids):
        boundaries = np.flatnonzero(np.diff(row)) + 1
        out.append(np.concatenate([[0], boundaries, [len(row)]]).astype(np.int32))
    return out


class WindowBatches(EpochBatches):
    """Windows of seq_len + 1 tokens over token shards (memmaps or in-memory arrays)."""

    def __init__(self, shards: Sequence[TokenShard], *, seq_len: int, document_aware: bool, batch_size: int,
                 split: str, rank: int, world_size: int, seed: int, identity: dict, what: str):
        self.shards, self.seq_len, self.document_aware = list(shards), seq_len, document_aware
        per_shard = np.array([max(len(s.tokens) - 1, 0) // seq_len for s in self.shards], dtype=np.int64)
        self.window_end = np.cumsum(per_shard)  # global window index -> shard by searchsorted
        total = int(self.window_end[-1]) if len(per_shard) else 0
        super().__init__(kind="pretrain_windows", num_items=total, batch_size=batch_size, split=split, rank=rank,
                         world_size=world_size, seed=seed, identity=dict(identity, seq_len=seq_len), what=what)

    def make_batch(self, rows: Sequence[int]) -> dict[str, np.ndarray]:
        T = self.seq_len
        windows = np.empty((len(rows), T + 1), dtype=np.int64)
        starts = np.zeros((len(rows), T), dtype=bool) if self.document_aware else None
        for b, w in enumerate(rows):
            shard_i = int(np.searchsorted(self.window_end, w, side="right"))
            local = int(w) - (int(self.window_end[shard_i - 1]) if shard_i else 0)
            shard = self.shards[shard_i]
            begin = local * T
            windows[b] = shard.tokens[begin : begin + T + 1]
            if starts is not None:
                lo, hi = np.searchsorted(shard.doc_starts, [begin + 1, begin + T])
                starts[b, np.asarray(shard.doc_starts[lo:hi], dtype=np.int64) - begin] = True
        return make_lm_batch(windows, starts)


# ----------------------------------------------------------------------------------------------
# Tokenizing documents (shared by the prepare step and in-memory local / validation data)


def _texts(rows: Iterator, skips: SkipLog, chunk: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    """Chunks of (row indices, texts); unusable rows are counted skips."""
    indices, texts = [], []
    for row in rows:
        skips.seen += 1
        text = get_text(row, skips)
        if text is None:
            continue
        indices.append(row.index)
        texts.append(text)
        if len(texts) == chunk:
            yield np.asarray(indices, dtype=np.int64), texts
            indices, texts = [], []
    if texts:
        yield np.asarray(indices, dtype=np.int64), texts


_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: TokenizerConfig, in_pool: bool = False):
    global _worker_tokenizer
    if in_pool:  # the processes are the parallelism; Rust tokenizers' own threads would oversubscribe the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = build_tokenizer(spec)


def _tokenize_chunk(item):
    indices, texts = item
    flat, lengths = _worker_tokenizer.encode_documents(texts)
    return indices, flat, lengths


def split_chunk(indices, flat, lengths, val_fraction: float, val_documents: int = 0):
    """Divide one tokenized chunk into (train, val) parts of (flat tokens, lengths).

    Validation is the rows with index < val_documents (streaming sources, which hold out their
    first rows) or else the fixed hash of the index with val_fraction (local sources)."""
    if val_documents:
        is_val = np.asarray(indices, dtype=np.int64) < val_documents
    else:
        is_val = np.array([is_validation(int(i), val_fraction) for i in indices], dtype=bool)
    token_is_val = np.repeat(is_val, lengths)
    return {"train": (flat[~token_is_val], lengths[~is_val]), "val": (flat[token_is_val], lengths[is_val])}


def tokenize_in_memory(source: SourceConfig, tokenizer: Tokenizer, split: str, val_fraction: float,
                       first: int | None = None, opener: StreamOpener | None = None) -> TokenShard:
    """Tokenize a (small) source in this process: the `local` type, and streaming validation.
    `first` takes only the first rows (streaming validation); otherwise `val_fraction` picks the split."""
    skips = SkipLog(f"data ({source.path})")
    rows = iter_rows(source, opener=opener)
    if first is not None:
        rows = islice(rows, first)
    parts, lengths = [], []
    for indices, texts in _texts(rows, skips, CHUNK_DOCS):
        flat, lens = tokenizer.encode_documents(texts)
        if first is None:
            flat, lens = split_chunk(indices, flat, lens, val_fraction)[split]
        parts.append(flat)
        lengths.append(lens)
    require_some(sum(len(x) for x in lengths), skips.seen, skips, f"{split} data ({source.path})",
                 split_fix=f"use more documents or another data.val_fraction (now {val_fraction}; validation is "
                 "a fixed hash of the row index, so a handful of documents can all land on one side)")
    skips.log_summary(skips.seen)
    lengths = np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64)
    tokens = np.concatenate(parts) if parts else np.empty(0, dtype=tokenizer.token_dtype)
    doc_starts = (np.cumsum(lengths) - lengths).astype(np.uint64)
    return TokenShard(tokens, doc_starts)


# ----------------------------------------------------------------------------------------------
# Streaming: tokenize and pack on the fly


class StreamingPretrainBatches:
    """Windows packed from a document stream as it arrives, resumable.

    Rank r reads rows val_documents + r, + r + world_size, ... (the first val_documents rows are
    the validation set). The state is (epoch, index of the first row whose tokens are not fully
    consumed, token offset inside it): a resumed run re-reads the stream up to that row, tokenizes
    from there and continues with exactly the next window. At the end of an epoch the last partial
    batch is dropped and the stream restarts (reshuffled when data.shuffle_buffer > 0).
    """

    finite = False
    num_batches = None

    def __init__(self, source: SourceConfig, tokenizer: Tokenizer, *, batch_size: int, seq_len: int, rank: int,
                 world_size: int, seed: int, val_documents: int, shuffle_buffer: int, document_aware: bool,
                 opener: StreamOpener | None = None):
        self.source, self.tokenizer, self.opener = source, tokenizer, opener
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.val_documents, self.shuffle_buffer = seed, val_documents, shuffle_buffer
        self.document_aware = document_aware
        self.what = f"streaming pretrain data ({source.path})"
        self.identity = {"kind": "pretrain_stream", "path": source.path, "batch_size": batch_size, "seq_len": seq_len,
                         "rank": rank, "world_size": world_size, "seed": seed, "val_documents": val_documents,
                         "shuffle_buffer": shuffle_buffer, "vocab_size": tokenizer.vocab_size}
        self.skips = SkipLog(self.what)
        self.epoch, self.doc, self.offset = 0, 0, 0
        self._rows = None  # iterator over this rank's rows, positioned after the documents in _pending
        self._pending: list[np.ndarray] = []  # tokenized documents from row `doc` on
        self._batches_this_epoch = 0

    def _open(self):
        # The validation rows are skipped before any shuffling, so they never reach training.
        rows = iter_rows(self.source, epoch=self.epoch, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                         skip=self.val_documents, opener=self.opener)
        start = self.rank + self.doc * self.world_size
        self._rows = islice(rows, start, None, self.world_size)
        self._pending = []

    def _pull(self) -> bool:
        row = next(self._rows, None)
        if row is None:
            return False
        text = get_text(row, self.skips)
        if text is None:
            self._pending.append(np.empty(0, dtype=np.int64))  # keeps row indices aligned
        else:
            self._pending.append(np.asarray(self.tokenizer.encode(text) + [self.tokenizer.eos_id], dtype=np.int64))
        return True

    def next_batch(self) -> dict[str, np.ndarray]:
        B, T = self.batch_size, self.seq_len
        need = B * T + 1
        while True:
            if self._rows is None:
                self._open()
            have = sum(len(p) for p in self._pending) - self.offset
            while have < need and self._pull():
                have += len(self._pending[-1])
            if have >= need:
                break
            if self._batches_this_epoch == 0 and self.doc == 0:
                raise DataError(f"{self.what}: one pass over the stream gives {have} tokens on rank {self.rank}, "
                                f"fewer than one batch needs ({need}); use more data or a smaller batch / seq_len")
            self.epoch, self.doc, self.offset, self._rows, self._batches_this_epoch = self.epoch + 1, 0, 0, None, 0
        lengths = np.array([len(p) for p in self._pending], dtype=np.int64)
        buffer = np.concatenate(self._pending)[self.offset : self.offset + need]
        windows = np.lib.stride_tricks.sliding_window_view(buffer, T + 1)[::T][:B]  # (B, T + 1)
        starts = None
        if self.document_aware:
            flags = np.zeros(len(buffer), dtype=bool)
            doc_begin = np.cumsum(lengths) - lengths - self.offset
            doc_begin = doc_begin[(doc_begin > 0) & (doc_begin < len(buffer))]
            flags[doc_begin] = True
            starts = np.lib.stride_tricks.sliding_window_view(flags, T)[::T][:B]  # (B, T)
        # Consume B * T tokens: the last token of this batch is the first input of the next.
        self.offset += B * T
        while self._pending and self.offset >= len(self._pending[0]):
            self.offset -= len(self._pending.pop(0))
            self.doc += 1
        self._batches_this_epoch += 1
        return make_lm_batch(np.array(windows), None if starts is None else np.array(starts))

    def reset(self):
        self.load_state_dict({"identity": self.identity, "epoch": 0, "doc": 0, "offset": 0})

    def state_dict(self) -> dict:
        return {"identity": dict(self.identity), "epoch": self.epoch, "doc": self.doc, "offset": self.offset}

    def load_state_dict(self, state: dict):
        check_identity(state, self.identity, self.what)
        self.epoch, self.doc, self.offset = int(state["epoch"]), int(state["doc"]), int(state["offset"])
        self._rows, self._pending = None, []
        self._batches_this_epoch = 1 if (self.doc or self.offset) else 0
        if self._rows is None and self.offset:
            self._open()
            if not self._pull():  # the saved row is gone: the stream changed under the checkpoint
                raise DataError(f"{self.what}: the stream ended before the saved position (epoch {self.epoch}, "
                                f"row {self.doc}); it is not the stream the checkpoint was made on")


def pretrain_batches(cfg: DataConfig, tokenizer: Tokenizer, *, batch_size: int, seq_len: int, split: str, rank: int,
                     world_size: int, seed: int, opener: StreamOpener | None = None):
    """The pretraining batch source for `build_dataloader`."""
    what = f"pretrain {split} data ({cfg.path})"
    identity = {"path": cfg.path, "type": cfg.type}
    if cfg.type == "streaming" and split == "train":
        return StreamingPretrainBatches(cfg.source_config(), tokenizer, batch_size=batch_size, seq_len=seq_len,
                                        rank=rank, world_size=world_size, seed=seed, val_documents=cfg.val_documents,
                                        shuffle_buffer=cfg.shuffle_buffer, document_aware=cfg.document_aware,
                                        opener=opener)
    if cfg.type == "shards":
        shards = open_shards(cfg.path, split, tokenizer)
    elif cfg.type == "streaming":  # validation: the first val_documents rows, held in memory
        if cfg.val_documents == 0:
            raise ConfigError("the val split of type: streaming needs data.val_documents > 0")
        shards = [tokenize_in_memory(cfg.source_config(), tokenizer, split, 0.0, first=cfg.val_documents,
                                     opener=opener)]
    else:
        if split == "val" and cfg.val_fraction == 0:
            raise ConfigError("the val split of type: local needs data.val_fraction > 0")
        logger.info("tokenizing %s in memory (for large data run the prepare step and use type: shards)", cfg.path)
        shards = [tokenize_in_memory(cfg.source_config(), tokenizer, split, cfg.val_fraction)]
    return WindowBatches(shards, seq_len=seq_len, document_aware=cfg.document_aware, batch_size=batch_size,
                         split=split, rank=rank, world_size=world_size, seed=seed, identity=identity, what=what)


# ----------------------------------------------------------------------------------------------
# The prepare step


def prepare(cfg: DataConfig, out_dir: str, *, workers: int | None = None, overwrite: bool = False,
            progress: bool = True, opener: StreamOpener | None = None) -> dict:
    """Tokenize the data block's source into shards under `out_dir`; returns a summary.

    Work is cut into chunks of CHUNK_DOCS documents, tokenized by `workers` processes and written
    back in input order, so the output does not depend on the worker count. Files are written to
    `out_dir.tmp` and renamed into place at the end: a crash never leaves a half-written dataset.
    """
    source = cfg.source_with_held_out()  # the train shards hold the rows training would read
    workers = workers or cfg.num_workers
    tokenizer = build_tokenizer(cfg.tokenizer)
    dtype = tokenizer.token_dtype
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"'{out_dir}' exists; pass --overwrite to replace it")
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    writers = {name: ShardWriter(tmp, name, dtype, cfg.shard_size) for name in ("train", "val")}
    skips = SkipLog(f"prepare ({source.path})")
    rows = iter_rows(source, opener=opener)
    chunks = _texts(rows, skips, CHUNK_DOCS)
    pool = None
    if workers > 1:
        # spawn, not fork: the Rust tokenizers and torch threads do not survive a fork safely.
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker,
                                                         initargs=(cfg.tokenizer, True))
        results = _ordered_results(pool, chunks, in_flight=4 * workers)
    else:
        _init_worker(cfg.tokenizer)
        results = map(_tokenize_chunk, chunks)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(unit="tok", unit_scale=True, desc=f"prepare {os.path.basename(out_dir.rstrip('/'))}",
                   mininterval=1.0, file=sys.stderr)
    start, tokens, documents = time.perf_counter(), 0, 0
    try:
        for indices, flat, lengths in results:
            # val_documents is set only for type: streaming (DataConfig checks): its first rows are
            # the validation split, as when training streams the same config.
            parts = split_chunk(indices, flat, lengths, cfg.val_fraction, cfg.val_documents)
            for name, (part, part_lengths) in parts.items():
                ends = np.cumsum(part_lengths)
                for end, n in zip(ends, part_lengths):
                    writers[name].add(part[end - n : end])
            tokens += len(flat)
            documents += len(lengths)
            if bar is not None:
                bar.update(len(flat))
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    require_some(documents, skips.seen, skips, f"prepare ({source.path})")
    skips.log_summary(skips.seen)
    splits = {name: w.finish() for name, w in writers.items()}
    write_meta(tmp, tokenizer, dtype, splits, source={"type": source.type, "path": source.path,
                                                      "subset": source.subset, "split": source.split,
                                                      "columns": source.columns, "val_fraction": cfg.val_fraction,
                                                      "val_documents": cfg.val_documents})
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    seconds = time.perf_counter() - start
    summary = {"out": out_dir, "documents": documents, "tokens": tokens, "seconds": seconds,
               "tokens_per_second": tokens / max(seconds, 1e-9), "dtype": dtype.name, "workers": workers,
               "train_tokens": sum(s["tokens"] for s in splits["train"]),
               "val_tokens": sum(s["tokens"] for s in splits["val"]), "skipped_rows": skips.skipped}
    logger.info("prepared %(documents)d documents, %(tokens)d tokens (%(dtype)s) in %(seconds).1fs "
                "(%(tokens_per_second).0f tokens/s, %(workers)d workers) -> %(out)s", summary)
    return summary


def _ordered_results(pool, chunks, in_flight: int):
    """Results in submission order, with at most `in_flight` chunks queued: reading the source
    waits for the tokenizers, so a large source is never pulled into memory ahead of them."""
    pending = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def load_data_block(config_path: str, overrides: Sequence[str] = ()) -> DataConfig:
    """The `data:` block of a train config (overrides like `data.num_workers=4` apply first)."""
    raw = apply_overrides(read_yaml(config_path), list(overrides))
    if "data" not in raw:
        raise ConfigError(f"{config_path}: no 'data:' block to prepare")
    return from_dict(DataConfig, raw["data"], where=f"{config_path}: 'data'", prefix="data.")


def main(argv: Sequence[str] | None = None):
    """The prepare command. A mistake in the command or the data (an unknown config key, a missing
    file, an existing output without --overwrite, no usable rows) ends it with one line naming it
    and exit status 2, as the training commands do, instead of a traceback."""
    try:
        _prepare_command(argv)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError) as error:
        print(f"python -m src.dataset.pretrain: error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _prepare_command(argv: Sequence[str] | None) -> None:
    parser = argparse.ArgumentParser(prog="python -m src.dataset.pretrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize the data block's source into memory-mapped shards")
    p.add_argument("--config", required=True, help="a train config; its data: block is read")
    p.add_argument("--out", help="output directory (default: data.path when data.type is shards)")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: data.num_workers)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="data.key=value overrides of the config")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_data_block(args.config, args.overrides)
    out = args.out or (cfg.path if cfg.type == "shards" else None)
    if out is None:
        parser.error(f"data.type is {cfg.type}: give --out DIR (or use type: shards with data.source)")
    summary = prepare(cfg, out, workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"wrote {summary['tokens']:,} tokens ({summary['train_tokens']:,} train, {summary['val_tokens']:,} val) "
          f"from {summary['documents']:,} documents to {out} at {summary['tokens_per_second']:,.0f} tokens/s")


if __name__ == "__main__":
    main()
