"""Block ids for the gather kernels: per-transfer regions, uploaded with one copy and no event.

A transfer's gather kernels need its block ids on the device. The general upload
(``_Direction.upload_ids``) reuses one pinned buffer, so it records an event per call and
checks it before the next; on a cold path that is ~90-150 us of host time before the first DMA
(``tests/gpu/start_probe.py``, H100 VM). An :class:`IdsArena` instead lends each transfer a
region of a pinned host buffer and of its device twin, taken back only once the transfer
completed: the host writes the ids, one ``copy_`` moves them, and nothing else is tracked.

(Kernels could read the pinned region in place through unified addressing, with no copy at
all; measured on an H100 that made every gather read its ids over PCIe, competing with the
DMAs: saves and loads of 8K tokens lost 2-7 % against the row plan, so the copy stays.)
"""

from __future__ import annotations

import array
import threading
from collections import deque

import numpy as np
import torch


def flat_ids(ids: list[list[int]]) -> np.ndarray:
    """The rows of ``ids`` concatenated as one int64 array (at C speed: no per-id Python work)."""
    flat = array.array("q")
    for row in ids:
        flat.fromlist(row)
    return np.frombuffer(flat, dtype=np.int64)


class IdsArena:
    """``regions`` regions of ``capacity`` int64 ids each; a region is lent to one transfer at a time.

    ``take`` returns None when no region is free or the ids do not fit: the caller then
    uploads them through a fresh pinned tensor (a transfer never waits for a region). 64
    regions cover a layer-by-layer save of a 61-layer model in flight; 4096 ids are 64K
    tokens of 16-token blocks.
    """

    def __init__(self, device: torch.device, regions: int = 64, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._host = torch.empty(regions * capacity, dtype=torch.int64, pin_memory=True)
        self._np = self._host.numpy()
        self._dev = torch.empty(regions * capacity, dtype=torch.int64, device=device)
        self._free: deque[int] = deque(range(regions))
        self._views: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}
        self._lock = threading.Lock()  # guards clearing _views (the deque's ends are thread-safe)

    def take(self, ids: list[list[int]]) -> tuple[int, list[torch.Tensor]] | None:
        """A region holding ``ids`` (``[C, n]``, rectangular) and its rows as device tensors, or None.

        The copy is enqueued on the caller's current stream: kernels on that stream read the
        rows in order; others must be ordered after it (or read them after a later event of it).
        """
        c, n = len(ids), len(ids[0])
        if c * n > self.capacity:
            return None
        try:
            region = self._free.popleft()
        except IndexError:
            return None
        base = region * self.capacity
        self._np[base:base + c * n] = flat_ids(ids)
        key = (region, c, n)
        views = self._views.get(key)
        if views is None:  # view ops cost ~5-20 us each: one set per shape and region, kept
            with self._lock:
                if len(self._views) >= 1024:
                    self._views.clear()
                dev = self._dev[base:base + c * n]
                views = self._views[key] = (self._host[base:base + c * n], dev, list(dev.view(c, n).unbind(0)))
        host, dev, rows = views
        dev.copy_(host, non_blocking=True)
        return region, rows

    def give(self, region: int) -> None:
        """Take ``region`` back: the transfer that held it has completed."""
        self._free.append(region)
