"""Data subsystem: tokenizers, pre-tokenized shards, streaming, SFT and DPO datasets.

The trainer needs three names: `DataConfig` (the `data:` block), `build_tokenizer` and
`build_dataloader`. See src/dataset/README.md.
"""

from .base import IGNORE_INDEX, DataConfig, SourceConfig, build_dataloader
from .sources import DataError
from .tokenizer import Tokenizer, TokenizerConfig, build_tokenizer, tokenize_chat


def __getattr__(name: str):
    # Imported on first use, not with the package: `python -m src.dataset.pretrain` (the prepare
    # step) would otherwise find its own module imported already and warn that running it again
    # "may result in unpredictable behaviour".
    if name == "cu_seqlens_from_document_ids":
        from .pretrain import cu_seqlens_from_document_ids

        return cu_seqlens_from_document_ids
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataConfig", "SourceConfig", "TokenizerConfig", "Tokenizer", "DataError", "IGNORE_INDEX",
           "build_tokenizer", "build_dataloader", "tokenize_chat", "cu_seqlens_from_document_ids"]
