"""Deterministic, rank-disjoint, resumable batch order shared by the map-style datasets.

Each epoch has a plan: the list of rows this rank reads, in order. The plan comes only from
(seed, epoch, rank, world_size): the items are permuted with `default_rng([seed, epoch])`, rank r
takes every world_size-th item starting at r, and every rank keeps the same count, so ranks stay
in step and never read the same item in an epoch. The position (epoch, batch) is the whole state.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .sources import DataError


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def rank_slice(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's items: disjoint across ranks, the same count on every rank (the remainder is dropped)."""
    per_rank = len(order) // world_size
    return order[rank::world_size][:per_rank]


class EpochBatches:
    """Batches of `batch_size` rows from a per-epoch plan. Subclasses define `make_batch(rows)` and
    may override `plan(epoch)` (default: this rank's share of the permuted item indices)."""

    def __init__(self, *, kind: str, num_items: int, batch_size: int, split: str, rank: int, world_size: int,
                 seed: int, identity: dict[str, Any], what: str):
        self.kind, self.num_items, self.batch_size = kind, num_items, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.finite = split == "val"
        self.identity = dict(identity, kind=kind, split=split, batch_size=batch_size, rank=rank,
                             world_size=world_size, seed=seed, num_items=num_items)
        self.what = what
        self.epoch, self.batch = 0, 0
        self._plan_epoch, self._plan = None, None
        self._check_one_batch(0)

    def _check_one_batch(self, epoch: int):
        rows = self._rows(epoch)
        if len(rows) < self.batch_size:
            split = "val" if self.finite else "train"
            raise DataError(
                f"{self.what}: {split} split gives {len(rows)} rows per rank"
                + (f" in epoch {epoch}" if epoch else "")
                + f", fewer than batch_size={self.batch_size} (world_size={self.world_size}); "
                "use more data, a smaller batch or seq_len"
                + (", or a larger data.val_fraction / data.val_documents" if split == "val" else "")
            )

    def plan(self, epoch: int) -> Sequence:
        order = epoch_permutation(self.num_items, self.seed, epoch) if not self.finite else np.arange(self.num_items)
        return rank_slice(order, self.rank, self.world_size)

    def make_batch(self, rows: Sequence) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _rows(self, epoch: int) -> Sequence:
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self.plan(epoch), epoch
        return self._plan

    @property
    def num_batches(self) -> int:
        """Batches in one epoch (or the one val pass)."""
        return len(self._rows(self.epoch)) // self.batch_size

    def next_batch(self) -> dict[str, np.ndarray]:
        if self.batch >= self.num_batches:
            if self.finite:
                raise StopIteration
            # Batches are always full: an epoch's rows beyond its last full batch are not read. The
            # constructor checked epoch 0, but plans that differ per epoch (packed SFT) can give a
            # later epoch fewer rows than one batch; that is an error, never a short batch.
            self._check_one_batch(self.epoch + 1)
            self.epoch, self.batch = self.epoch + 1, 0
        rows = self._rows(self.epoch)
        b = self.batch * self.batch_size
        self.batch += 1
        return self.make_batch(rows[b : b + self.batch_size])

    def reset(self):
        self.epoch, self.batch = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"identity": dict(self.identity), "epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]):
        check_identity(state, self.identity, self.what)
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


def check_identity(state: dict[str, Any], identity: dict[str, Any], what: str):
    """A saved loader position only means something for the same data, batch shape and ranks."""
    saved = state.get("identity") if isinstance(state, dict) else None
    if saved is None:
        raise DataError(f"{what}: not a data-loader state of this project: {str(state)[:120]}")
    diffs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in identity.items() if saved.get(k) != v]
    if diffs:
        raise DataError(f"{what}: the checkpoint's data position belongs to another setup ({'; '.join(diffs)}); "
                        "resume with the same data, batch_size, seq_len and world_size, or start the data "
                        "from the beginning")
