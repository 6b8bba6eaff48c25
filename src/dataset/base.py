"""The `data:` block of a train config, and the one entry point the trainer calls.

    data_cfg = from_dict(DataConfig, train_yaml["data"], where="configs/train/x.yaml: 'data'")
    tokenizer = build_tokenizer(data_cfg.tokenizer)
    loader = build_dataloader("pretrain", data_cfg, tokenizer, batch_size=16, seq_len=1024,
                              split="train", rank=0, world_size=1, seed=0, pin_memory=True)
    batch = next(iter(loader))          # {"input_ids": (B, T) int64, "labels": (B, T) int64, ...}
    sd = loader.state_dict()            # goes into the checkpoint; load_state_dict(sd) resumes

Three source types: `local` (jsonl / json / parquet: a file, a directory or a glob), `streaming`
(Hugging Face `datasets` streaming) and `shards` (pre-tokenized, written by the prepare step of
`src/dataset/pretrain.py`; pretraining only). See src/dataset/README.md for the full reference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Literal

from src.utils.config import ConfigError

from .tokenizer import Tokenizer, TokenizerConfig, build_tokenizer

TASKS = ("pretrain", "sft", "dpo")
IGNORE_INDEX = -100


@dataclass
class SourceConfig:
    """Where raw documents come from: the part of `data:` shared by training and the prepare step."""

    type: Literal["local", "streaming"]
    path: str
    provider: Literal["huggingface"] = "huggingface"  # streaming only
    subset: str | None = None  # streaming only: the dataset configuration name
    split: str | None = None  # streaming only: the source split (default "train")
    # Rename source columns to the names the task reads ({content: text} for pretraining;
    # SFT reads instruction/input/output or messages; DPO reads prompt/chosen/rejected).
    columns: dict[str, str] = field(default_factory=dict)
    max_documents: int | None = None  # read at most this many rows (quick runs)

    def __post_init__(self):
        if not self.path:
            raise ConfigError("data.path is empty: give a file, directory or glob (local) or a dataset id (streaming)")
        if self.type != "streaming":
            for key in ("subset", "split"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"data.{key} applies to type: streaming only; remove it for type: {self.type}")
        if self.max_documents is not None and self.max_documents <= 0:
            raise ConfigError(f"data.max_documents must be positive (or left out), got {self.max_documents}")

    @property
    def source_split(self) -> str:
        return self.split or "train"


@dataclass
class DataConfig:
    """The `data:` block. Fields marked with a task or type apply only there (others must stay unset)."""

    type: Literal["local", "streaming", "shards"]
    path: str  # local: file / directory / glob; streaming: dataset id; shards: the shard directory
    provider: Literal["huggingface"] = "huggingface"
    subset: str | None = None
    split: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    max_documents: int | None = None
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # sft: the row format; auto decides from the first row's keys (and logs the choice).
    format: Literal["auto", "alpaca", "messages"] = "auto"
    # Validation: local sources (and the prepare step of shards) hold out this fraction of documents,
    # chosen by a fixed hash of the document index; streaming holds out the first val_documents.
    val_fraction: float = 0.0
    val_documents: int = 0
    # sft: put several examples into one row (document boundaries kept).
    packing: bool = False
    # pretrain and packed sft: also emit position_ids and document_ids, for attention that
    # must not cross documents.
    document_aware: bool = False
    # sft / dpo: an example longer than seq_len + 1 tokens is truncated on the right (the prompt is
    # kept, the response cut) or skipped; either is counted and logged.
    overlong: Literal["truncate", "skip"] = "truncate"
    shuffle_buffer: int = 0  # streaming: size of the shuffle buffer of `datasets` (0 = source order)
    prefetch: int = 4  # batches prepared ahead in a background thread (0 = none)
    num_workers: int = 1  # prepare step: tokenizer processes
    shard_size: int = 2**28  # prepare step: tokens per shard file (a document is never split)
    # shards: what the prepare step tokenizes into `path` (type local or streaming).
    source: SourceConfig | None = None

    def __post_init__(self):
        if self.type in ("local", "streaming"):
            self.source_config()  # the source fields are checked there
            if self.source is not None:
                raise ConfigError(f"data.source is the input of the prepare step for type: shards; "
                                  f"with type: {self.type} give the source fields directly in data:")
        else:
            for key in ("subset", "split", "max_documents"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"data.{key} does not apply to type: shards; put it in data.source")
            if self.columns:
                raise ConfigError("data.columns does not apply to type: shards; put it in data.source")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.type == "streaming" and self.val_fraction:
            raise ConfigError("type: streaming holds out the first documents for validation: "
                              "use data.val_documents instead of data.val_fraction")
        if self.type != "streaming" and self.val_documents:
            raise ConfigError(f"data.val_documents applies to type: streaming; use data.val_fraction for type: {self.type}")
        if self.val_documents < 0:
            raise ConfigError(f"data.val_documents must be >= 0, got {self.val_documents}")
        if self.type != "streaming" and self.shuffle_buffer:
            raise ConfigError("data.shuffle_buffer applies to type: streaming only (other types shuffle exactly)")
        if self.prefetch < 0 or self.num_workers < 1 or self.shard_size < 1 or self.shuffle_buffer < 0:
            raise ConfigError("data.prefetch and data.shuffle_buffer must be >= 0, data.num_workers and "
                              f"data.shard_size >= 1 (got {self.prefetch}, {self.shuffle_buffer}, "
                              f"{self.num_workers}, {self.shard_size})")

    def check_task(self, task: str):
        """Fields that the task does not read are errors, not silently ignored settings. A field left
        at its default cannot be told from an unset one, so only values that differ from it are refused."""
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}; expected one of {list(TASKS)}")
        if task != "pretrain" and self.type == "shards":
            raise ConfigError(f"type: shards holds pretraining token streams; {task} reads type: local or streaming")
        if task != "sft" and self.packing:
            packs = "always packs" if task == "pretrain" else "never packs"
            raise ConfigError(f"data.packing applies to sft ({task} {packs}); remove it")
        if task == "dpo" and self.document_aware:
            raise ConfigError("data.document_aware does not apply to dpo (one example per row); remove it")
        if task == "sft" and self.document_aware and not self.packing:
            raise ConfigError("data.document_aware needs data.packing: true for sft (unpacked rows hold one example)")
        if task != "sft" and self.format != "auto":
            raise ConfigError(f"data.format applies to sft only ({task} rows have a fixed layout); remove it")
        if task == "pretrain" and self.overlong != "truncate":
            raise ConfigError("data.overlong applies to sft and dpo (pretraining windows cut documents "
                              "anywhere); remove it")
        if task != "pretrain":
            if self.shuffle_buffer:
                raise ConfigError(f"data.shuffle_buffer applies to streaming pretraining ({task} reads the "
                                  "stream into memory and shuffles it exactly); remove it")
            defaults = {f.name: f.default for f in fields(self)}
            for key in ("num_workers", "shard_size"):
                if getattr(self, key) != defaults[key]:
                    raise ConfigError(f"data.{key} applies to the prepare step of pretraining ({task} does not "
                                      "prepare shards); remove it")

    def source_config(self) -> SourceConfig:
        """The raw-document source: the data block itself (local, streaming) or data.source (shards)."""
        if self.type == "shards":
            if self.source is None:
                raise ConfigError("type: shards has no data.source, so there is nothing to prepare: add "
                                  "data.source: {type: local|streaming, path: ...}")
            return self.source
        return SourceConfig(self.type, self.path, self.provider, self.subset, self.split, dict(self.columns),
                            self.max_documents)

    def source_with_held_out(self) -> SourceConfig:
        """`source_config()` for a reader that splits the rows itself (the prepare step, SFT / DPO):
        streaming pretraining skips the first val_documents rows and then reads max_documents, so
        max_documents counts training rows; these readers read the held-out rows on top."""
        source = self.source_config()
        if self.val_documents and source.max_documents is not None:
            source = dataclasses.replace(source, max_documents=source.max_documents + self.val_documents)
        return source


def build_dataloader(
    task: str,
    data_cfg: DataConfig,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    seq_len: int,
    split: str,
    rank: int,
    world_size: int,
    seed: int,
    pin_memory: bool,
):
    """The batches of `task` ("pretrain" | "sft" | "dpo") for one rank, as a `DataLoader`.

    The train split repeats forever over epochs (order fixed by seed, epoch and rank; ranks read
    disjoint windows); the val split is one finite pass, the same on every call to `iter()`.
    """
    data_cfg.check_task(task)
    if split not in ("train", "val"):
        raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
    if batch_size < 1 or seq_len < 1:
        raise ConfigError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world_size {world_size}")
    from .loader import DataLoader

    common = dict(batch_size=batch_size, seq_len=seq_len, split=split, rank=rank, world_size=world_size, seed=seed)
    if task == "pretrain":
        from .pretrain import pretrain_batches

        source = pretrain_batches(data_cfg, tokenizer, **common)
    elif task == "sft":
        from .sft import sft_batches

        source = sft_batches(data_cfg, tokenizer, **common)
    else:
        from .dpo import dpo_batches

        source = dpo_batches(data_cfg, tokenizer, **common)
    return DataLoader(source, pin_memory=pin_memory, prefetch=data_cfg.prefetch)


__all__ = ["DataConfig", "SourceConfig", "TokenizerConfig", "Tokenizer", "build_tokenizer", "build_dataloader",
           "IGNORE_INDEX"]
