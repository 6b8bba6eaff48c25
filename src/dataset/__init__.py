"""Data subsystem: tokenizers, pre-tokenized shards, streaming, SFT and DPO datasets.

The trainer needs three names: `DataConfig` (the `data:` block), `build_tokenizer` and
`build_dataloader`. See src/dataset/README.md.
"""

from .base import IGNORE_INDEX, DataConfig, SourceConfig, build_dataloader
from .pretrain import cu_seqlens_from_document_ids
from .sources import DataError
from .tokenizer import Tokenizer, TokenizerConfig, build_tokenizer, tokenize_chat

__all__ = ["DataConfig", "SourceConfig", "TokenizerConfig", "Tokenizer", "DataError", "IGNORE_INDEX",
           "build_tokenizer", "build_dataloader", "tokenize_chat", "cu_seqlens_from_document_ids"]
