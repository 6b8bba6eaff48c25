"""The loader the trainer iterates: batches of CPU LongTensors, prefetched in a background thread.

A batch source (pretrain windows, streaming, SFT, DPO) implements:

    next_batch() -> dict[str, np.ndarray]   # int64 arrays; raises StopIteration at the end (val only)
    state_dict() -> dict                    # the position of the NEXT batch
    load_state_dict(sd)                     # checks that sd belongs to this source, then seeks
    reset()                                 # back to the first batch (val passes)
    finite: bool                            # val: one pass; train: forever over epochs
    num_batches: int | None                 # batches per pass when finite

The loader records the source state that came with each batch it hands out, so `state_dict()`
is the position after the last batch the trainer actually received, however far the prefetch
thread has read ahead. `load_state_dict()` stops the thread and seeks; the next `iter()` resumes
there.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any

import numpy as np
import torch

_END = object()


class _Producer:
    """A daemon thread filling a bounded queue with (batch, state) pairs from the source."""

    def __init__(self, source, depth: int, pin: bool):
        self.source, self.pin = source, pin
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="data-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self):
        try:
            while not self.stop_event.is_set():
                try:
                    batch = self.source.next_batch()
                except StopIteration:
                    self._put(_END)
                    return
                item = (to_tensors(batch, self.pin), self.source.state_dict())
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, which raises it in the training loop
            self._put(e)

    def get(self):
        item = self.queue.get()
        if item is _END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self):
        self.stop_event.set()
        self.thread.join()


def to_tensors(batch: dict[str, np.ndarray], pin: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in batch.items():
        t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.int64))
        out[key] = t.pin_memory() if pin else t
    return out


class DataLoader:
    """Iterates dict batches of CPU LongTensors; `state_dict()` / `load_state_dict()` resume exactly."""

    def __init__(self, source, *, pin_memory: bool, prefetch: int):
        self.source = source
        # Pinned memory makes the host-to-device copy asynchronous; there is nothing to pin for without CUDA.
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.prefetch = prefetch
        self._state = source.state_dict()
        self._producer: _Producer | None = None
        self._generation = 0

    @property
    def finite(self) -> bool:
        return self.source.finite

    def __len__(self) -> int:
        if not self.source.finite:
            raise TypeError("the train loader repeats forever over epochs; it has no length")
        return self.source.num_batches

    def _stop(self):
        if self._producer is not None:
            self._producer.stop()
            self._producer = None

    def __iter__(self):
        self._stop()
        self._generation += 1
        if self.source.finite:
            self.source.reset()
            self._state = self.source.state_dict()
        else:
            self.source.load_state_dict(self._state)  # continue after the last batch handed out
        return self._iterate(self._generation)

    def _iterate(self, generation: int):
        if self.prefetch > 0:
            self._producer = _Producer(self.source, self.prefetch, self.pin_memory)
        while True:
            if generation != self._generation:
                raise RuntimeError("this iterator was superseded by a newer iter() or load_state_dict() on its loader")
            if self.prefetch > 0:
                try:
                    batch, state = self._producer.get()
                except StopIteration:
                    return
            else:
                try:
                    batch = to_tensors(self.source.next_batch(), self.pin_memory)
                except StopIteration:
                    return
                state = self.source.state_dict()
            self._state = state
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]):
        self._stop()
        self._generation += 1
        self.source.load_state_dict(state)
        self._state = copy.deepcopy(state)

    def close(self):
        self._stop()

    def __del__(self):
        try:
            self._stop()
        except Exception:
            pass
