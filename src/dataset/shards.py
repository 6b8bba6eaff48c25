"""Pre-tokenized shards: writing (the prepare step) and memory-mapped reading.

A dataset directory:

    meta.json              format version, tokenizer (name, fingerprint, vocab size, EOS id),
                           token dtype, and per split the list of shards with their token and
                           document counts
    train_00000.bin        raw token ids (uint16 when the vocabulary fits, else uint32), each
                           document followed by EOS; documents are never split across shards
    train_00000.idx        uint64 offsets of the first token of each document in the .bin
    val_00000.bin / .idx   the validation split, same layout

Reading never loads a shard into RAM: `np.memmap` maps the files, a batch copies only its windows.
Opening checks meta.json against the run (tokenizer fingerprint, vocab size, dtype) and every file
size against the counts, and fails naming the mismatch and the fix (re-run the prepare step).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .sources import DataError
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
META = "meta.json"


@dataclass
class TokenShard:
    """One span of tokens with the offsets of its document starts (arrays or memmaps)."""

    tokens: np.ndarray  # (N,) uint16 / uint32
    doc_starts: np.ndarray  # (D,) uint64, increasing, doc_starts[0] == 0


class ShardWriter:
    """Appends tokenized documents (each already ending with EOS) to `{split}_{k:05d}.bin` files."""

    def __init__(self, directory: str, split: str, dtype: np.dtype, shard_size: int):
        self.directory, self.split, self.dtype, self.shard_size = directory, split, np.dtype(dtype), shard_size
        self.shards: list[dict] = []
        self._file = None
        self._starts: list[int] = []
        self._tokens = 0

    def _open(self):
        name = f"{self.split}_{len(self.shards):05d}"
        self._file = open(os.path.join(self.directory, name + ".bin"), "wb")
        self._name, self._starts, self._tokens = name, [], 0

    def _close(self):
        self._file.close()
        np.asarray(self._starts, dtype=np.uint64).tofile(os.path.join(self.directory, self._name + ".idx"))
        self.shards.append({"file": self._name + ".bin", "index": self._name + ".idx",
                            "tokens": self._tokens, "documents": len(self._starts)})
        self._file = None

    def add(self, doc: np.ndarray):
        if self._file is not None and self._tokens + len(doc) > self.shard_size and self._tokens > 0:
            self._close()
        if self._file is None:
            self._open()
        self._starts.append(self._tokens)
        self._file.write(np.ascontiguousarray(doc, dtype=self.dtype).tobytes())
        self._tokens += len(doc)

    def finish(self) -> list[dict]:
        if self._file is not None:
            self._close()
        return self.shards


def write_meta(directory: str, tokenizer: Tokenizer, dtype: np.dtype, splits: dict[str, list[dict]], source: dict):
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint,
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "dtype": np.dtype(dtype).name,
        "source": source,
        "splits": {name: {"tokens": sum(s["tokens"] for s in shards),
                          "documents": sum(s["documents"] for s in shards), "shards": shards}
                   for name, shards in splits.items()},
    }
    with open(os.path.join(directory, META), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META)
    if not os.path.isfile(path):
        hint = "run the prepare step first: bash scripts/prepare_data.sh CONFIG"
        raise DataError(f"'{directory}' is not a shard directory (no {META}); {hint}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); re-run the prepare step") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: shard format version {meta.get('format_version')!r}, this code reads "
                        f"{FORMAT_VERSION}; re-run the prepare step")
    return meta


def check_meta(meta: dict, tokenizer: Tokenizer, directory: str):
    """The shards must have been written by the run's tokenizer, with the dtype its vocabulary needs."""
    fix = "re-run the prepare step with this tokenizer, or set data.tokenizer to the one the shards were made with"
    t = meta["tokenizer"]
    if t["vocab_size"] != tokenizer.vocab_size:
        raise DataError(f"{directory}: shards were tokenized with a vocabulary of {t['vocab_size']} "
                        f"({t['name']}), the run uses {tokenizer.vocab_size} ({tokenizer.name}); {fix}")
    if t["fingerprint"] != tokenizer.fingerprint:
        raise DataError(f"{directory}: shards were tokenized with tokenizer '{t['name']}' "
                        f"(fingerprint {t['fingerprint']}), the run uses '{tokenizer.name}' "
                        f"(fingerprint {tokenizer.fingerprint}); {fix}")
    if meta["dtype"] != tokenizer.token_dtype.name:
        raise DataError(f"{directory}: shards store {meta['dtype']} ids but a vocabulary of "
                        f"{tokenizer.vocab_size} needs {tokenizer.token_dtype.name}; re-run the prepare step")


def open_shards(directory: str, split: str, tokenizer: Tokenizer) -> list[TokenShard]:
    """Memory-map the shards of one split after checking them against the run."""
    meta = read_meta(directory)
    check_meta(meta, tokenizer, directory)
    if split not in meta["splits"] or not meta["splits"][split]["shards"]:
        have = [s for s, v in meta["splits"].items() if v["shards"]]
        hint = "set data.val_fraction > 0 when preparing" if split == "val" else "re-run the prepare step"
        raise DataError(f"{directory}: no '{split}' shards (has: {', '.join(have) or 'none'}); {hint}")
    dtype = np.dtype(meta["dtype"])
    out = []
    for shard in meta["splits"][split]["shards"]:
        bin_path = os.path.join(directory, shard["file"])
        idx_path = os.path.join(directory, shard["index"])
        for path, want in ((bin_path, shard["tokens"] * dtype.itemsize), (idx_path, shard["documents"] * 8)):
            if not os.path.isfile(path):
                raise DataError(f"{path}: missing shard file listed in {META}; re-run the prepare step")
            size = os.path.getsize(path)
            if size != want:
                raise DataError(f"{path}: {size} bytes, {META} says {want} (truncated or overwritten); "
                                "re-run the prepare step")
        if shard["tokens"] == 0:
            continue
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        doc_starts = np.memmap(idx_path, dtype=np.uint64, mode="r")
        out.append(TokenShard(tokens, doc_starts))
    return out
