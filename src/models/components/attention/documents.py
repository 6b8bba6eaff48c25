"""Packed documents: which document each token of a packed batch belongs to.

A packed row of T tokens holds several documents back to back; `document_ids` (B, T) numbers them
within each row (0, 0, 0, 1, 1, 2, ...). A token may attend only to itself and earlier tokens of
its own document (block-causal), so packing never leaks context across documents.

The model builds one `PackedDocuments` per forward and every layer reuses the mask forms derived
from it, each built once per sliding window on first use:

    keep_mask(window)   dense boolean (B, 1, T, T) keep-mask        eager, sdpa
    block_mask(window)  FlexAttention BlockMask (block-sparse)      flex
    varlen()            cumulative sequence lengths over B * T      flash_attn (varlen kernels)

`backends.prepare_documents` builds the form the chosen backend needs before the layers run, so
compiled transformer blocks only read them.

Documents are the contiguous runs of equal ids: a new document starts wherever the id changes
(and at every row start). Every form is derived from these runs, so all backends agree on any
input, whatever numbering the ids use.
"""

from __future__ import annotations

import torch


class PackedDocuments:
    def __init__(self, document_ids: torch.Tensor):
        if document_ids.dim() != 2:
            raise ValueError(f"document_ids must be (batch, seq_len), got shape {tuple(document_ids.shape)}")
        if document_ids.is_floating_point() or document_ids.dtype == torch.bool:
            raise ValueError(f"document_ids must be an integer tensor, got {document_ids.dtype}")
        B, T = document_ids.shape
        starts = torch.ones(B, T, dtype=torch.bool, device=document_ids.device)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        self.starts = starts  # (B, T): True where a document begins
        # segments[b, t] = index of t's document within its row: equal segment <=> same document.
        self.segments = starts.cumsum(dim=1, dtype=torch.int32)  # (B, T)
        self.batch_size, self.seq_len = B, T
        self.device = document_ids.device
        self._keep_masks: dict[int | None, torch.Tensor] = {}
        self._block_masks: dict[int | None, object] = {}
        self._varlen: tuple[torch.Tensor, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.batch_size, self.seq_len

    def keep_mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """Boolean (B, 1, T, T): same document, causal, and within the window when one is given."""
        if sliding_window not in self._keep_masks:
            pos = torch.arange(self.seq_len, device=self.device)
            keep = pos[None, :] <= pos[:, None]  # (T, T): key position <= query position
            if sliding_window is not None:
                keep = keep & (pos[None, :] > pos[:, None] - sliding_window)
            same = self.segments[:, :, None] == self.segments[:, None, :]  # (B, T, T)
            self._keep_masks[sliding_window] = (same & keep)[:, None]  # (B, 1, T, T)
        return self._keep_masks[sliding_window]

    def block_mask(self, sliding_window: int | None = None):
        """FlexAttention BlockMask of the same mask; fully masked 128x128 blocks are skipped."""
        if sliding_window not in self._block_masks:
            from .flex import document_block_mask

            self._block_masks[sliding_window] = document_block_mask(self.segments, sliding_window)
        return self._block_masks[sliding_window]

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens (N + 1,) int32, max_seqlen) over the B * T tokens flattened row after row.

        Every row start is a document start, so no document spans two rows. max_seqlen is T, an
        upper bound that needs no host sync and stays the same every step (a per-batch value
        would recompile compiled blocks each step); blocks past a document's end exit at once.
        """
        if self._varlen is None:
            starts = self.starts.flatten().nonzero().flatten()  # (N,) one host sync, once per forward
            end = torch.tensor([self.batch_size * self.seq_len], device=self.device)
            cu_seqlens = torch.cat([starts, end]).to(torch.int32)  # (N + 1,)
            self._varlen = (cu_seqlens, self.seq_len)
        return self._varlen
