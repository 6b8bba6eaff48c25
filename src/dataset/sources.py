"""Reading raw rows: local jsonl / json / parquet files and `datasets` streaming, with clear errors.

A row is a dict. `iter_rows(source)` yields `Row(index, where, record)`, where `where` names the
file and line (or the stream position) for error messages. Bad input is either an error that
names the file, the line and the fix (malformed JSON, no files, nothing usable at all) or a
logged, counted skip (`SkipLog`), never a crash deep in the stack.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

from .base import SourceConfig

logger = logging.getLogger(__name__)

LOCAL_EXTENSIONS = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
    """Input data that cannot be used; the message names the file / row and the fix."""


@dataclass
class Row:
    index: int  # position in the whole source (before any rank split or validation holdout)
    where: str  # "file.jsonl:12" or "dataset[train] row 12"
    record: dict[str, Any]


class SkipLog:
    """Counts skipped rows by reason; logs the first few of each reason and a summary."""

    def __init__(self, what: str, show: int = 3):
        self.what = what
        self.show = show
        self.seen = 0  # rows looked at (kept by the caller)
        self.counts: Counter[str] = Counter()
        self.notes: Counter[str] = Counter()  # kept but changed (e.g. truncated)

    def skip(self, reason: str, where: str):
        self.counts[reason] += 1
        if self.counts[reason] <= self.show:
            logger.warning("%s: skipping %s: %s", self.what, where, reason)

    def note(self, reason: str):
        self.notes[reason] += 1

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self, total: int) -> str:
        parts = [f"{n} {reason}" for reason, n in self.counts.most_common()]
        parts += [f"{n} {reason}" for reason, n in self.notes.most_common()]
        text = f"{self.what}: used {total - self.skipped} of {total} rows"
        return text + (f" ({'; '.join(parts)})" if parts else "")

    def log_summary(self, total: int):
        if self.counts or self.notes:
            logger.warning(self.summary(total))
        else:
            logger.info(self.summary(total))


def is_validation(index: int, val_fraction: float) -> bool:
    """Fixed pseudo-random holdout: a multiplicative hash of the row index, independent of order."""
    return val_fraction > 0 and ((index * 2654435761) % 2**32) / 2**32 < val_fraction


# ----------------------------------------------------------------------------------------------
# Local files


def resolve_local_files(path: str) -> list[str]:
    """A file, a directory (its .jsonl / .json / .parquet files) or a glob, in sorted order."""
    if any(c in path for c in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
    elif os.path.isdir(path):
        files = sorted(
            os.path.join(path, f) for f in os.listdir(path) if f.endswith(LOCAL_EXTENSIONS)
        )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"data.path '{path}' does not exist (paths are relative to the repository root)")
    if not files:
        raise DataError(f"data.path '{path}': no {'/'.join(LOCAL_EXTENSIONS)} files found")
    bad = [f for f in files if not f.endswith(LOCAL_EXTENSIONS)]
    if bad:
        raise DataError(f"data.path '{path}': cannot read '{bad[0]}'; supported: {', '.join(LOCAL_EXTENSIONS)}")
    return files


def _object_or_error(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object per row, got {type(record).__name__}")
    return record


def _not_utf8(file: str, line: int, e: UnicodeDecodeError) -> DataError:
    return DataError(f"{file}:{line}: not valid UTF-8 (byte 0x{e.object[e.start]:02x}); re-save the file as UTF-8 "
                     "(e.g. iconv -f latin1 -t utf-8 IN > OUT) or remove it from data.path")


def _read_jsonl(file: str) -> Iterator[tuple[str, dict]]:
    # Bytes decoded line by line, so a bad byte is reported at its own line (a text-mode file
    # decodes ahead in blocks); utf-8-sig on the first line accepts a byte-order mark.
    with open(file, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(file, lineno, e) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                                "fix or delete that line") from None
            yield f"{file}:{lineno}", _object_or_error(record, f"{file}:{lineno}")


def _read_json(file: str) -> Iterator[tuple[str, dict]]:
    with open(file, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # -sig: a byte-order mark is accepted
    except UnicodeDecodeError as e:
        raise _not_utf8(file, raw.count(b"\n", 0, e.start) + 1, e) from None
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                        "a .json file must hold one list of objects (use .jsonl for one object per line)") from None
    if not isinstance(data, list):
        raise DataError(f"{file}: a .json file must hold a list of objects, got {type(data).__name__}")
    for i, record in enumerate(data):
        yield f"{file}[{i}]", _object_or_error(record, f"{file}[{i}]")


def _read_parquet(file: str) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = 0
    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=1024)
        for batch in batches:
            for record in batch.to_pylist():
                yield f"{file} row {i}", record
                i += 1
    except (pa.ArrowException, OSError) as e:  # a truncated or corrupt file, or not parquet at all
        raise DataError(f"{file}: cannot read it as parquet (after {i} rows): {type(e).__name__}: {e}; "
                        "re-write the file or remove it from data.path") from None


def iter_local_rows(path: str) -> Iterator[tuple[str, dict]]:
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    files = resolve_local_files(path)
    empty = 0
    for file in files:
        n = 0
        for item in readers[os.path.splitext(file)[1]](file):
            n += 1
            yield item
        if n == 0:
            empty += 1
            logger.warning("data: skipping empty file %s", file)
    if empty == len(files):
        raise DataError(f"data.path '{path}': every file is empty ({', '.join(files[:3])}{'...' if len(files) > 3 else ''})")


# ----------------------------------------------------------------------------------------------
# Streaming (Hugging Face datasets)


def open_hf_stream(source: SourceConfig, *, seed: int = 0, epoch: int = 0, shuffle_buffer: int = 0,
                   skip: int = 0) -> Iterable[dict]:
    """`datasets.load_dataset(..., streaming=True)`; a local directory of jsonl files works offline."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError("type: streaming needs the `datasets` package (pip install datasets)") from e
    try:
        ds = datasets.load_dataset(source.path, name=source.subset, split=source.source_split, streaming=True)
    except Exception as e:  # network, unknown dataset / subset / split: all reported with the config keys
        raise DataError(
            f"cannot open streaming dataset path={source.path!r} subset={source.subset!r} "
            f"split={source.source_split!r}: {type(e).__name__}: {e}"
        ) from e
    if skip:
        ds = ds.skip(skip)
    if shuffle_buffer:
        ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)
        ds.set_epoch(epoch)
    return ds


# A factory of row iterables for one epoch; tests inject their own in place of `open_hf_stream`.
StreamOpener = Callable[[int], Iterable[dict]]


def _guarded_stream(stream: Iterable[dict], name: str, first: int) -> Iterator[tuple[str, dict]]:
    """Rows of a stream; a failure inside the reader (a corrupt file, a dropped connection) becomes a
    DataError naming the stream and the row instead of a trace deep inside `datasets`."""
    it = iter(stream)
    i = first
    while True:
        try:
            record = next(it)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"{name}: reading row {i} failed: {type(e).__name__}: {e}") from e
        yield f"{name} row {i}", _object_or_error(record, f"{name} row {i}")
        i += 1


def iter_rows(
    source: SourceConfig,
    *,
    epoch: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 0,
    skip: int = 0,
    opener: StreamOpener | None = None,
) -> Iterator[Row]:
    """Every row of the source, with its index, in a fixed order, columns renamed.

    Streaming only: `skip` drops the first rows before shuffling (the validation holdout);
    `opener(epoch)`, when given, replaces `datasets` (tests inject local iterables this way)."""
    if source.type == "local":
        if skip or shuffle_buffer:
            raise ValueError("skip and shuffle_buffer apply to streaming sources")
        items = iter_local_rows(source.path)
    else:
        if opener is None:
            stream = open_hf_stream(source, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, skip=skip)
        else:
            stream = islice(opener(epoch), skip, None)
        items = _guarded_stream(stream, f"{source.path}[{source.source_split}]", skip)
    if source.max_documents is not None:
        items = islice(items, source.max_documents)
    rename = source.columns
    for index, (where, record) in enumerate(items):
        if rename:
            record = {rename.get(k, k): v for k, v in record.items()}
        yield Row(index, where, record)


def get_text(row: Row, skips: SkipLog, field: str = "text") -> str | None:
    """The row's text field, or None (a counted skip) when it is missing, not a string or empty."""
    value = row.record.get(field)
    if value is None:
        skips.skip(f"no '{field}' field (has: {', '.join(sorted(row.record)[:8])}; rename with data.columns)", row.where)
        return None
    if not isinstance(value, str):
        skips.skip(f"'{field}' is {type(value).__name__}, not a string", row.where)
        return None
    if not value.strip():
        skips.skip(f"empty '{field}'", row.where)
        return None
    return value


def require_some(kept: int, total: int, skips: SkipLog, what: str, split_fix: str = "use more documents"):
    """An input where nothing is usable is an error, not an empty dataset.

    `kept` counts the rows of the split asked for; usable rows that all fell into the other split
    are a different error from unusable rows (then `split_fix` says what to change)."""
    if total == 0:
        raise DataError(f"{what}: the source has no rows")
    if kept == 0:
        usable = total - skips.skipped
        if usable > 0:
            raise DataError(f"{what}: the split is empty: all {usable} usable rows (of {total}) fell into the "
                            f"other split; {split_fix}")
        raise DataError(f"{what}: none of the {total} rows is usable: {skips.summary(total)}")
