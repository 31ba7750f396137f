"""Block ids that the device reads in place from pinned host memory (no upload copy).

A transfer's gather kernels need its block ids on the device. Uploading them costs a copy and
an event per call, ~90-150 us of host time on a cold path (``tests/gpu/start_probe.py``, H100
VM), all of it before the first DMA can start. Pinned host memory is mapped into the device's
address space (CUDA unified virtual addressing), so a kernel can read the ids where the host
wrote them: an :class:`IdsArena` hands each transfer a region of one pinned buffer, exposed
as device tensors, and takes it back once the transfer completed (its kernels no longer read
it). Reading ~16 ids per chunk over PCIe adds ~18 us to one chunk's gather kernel
(``tests/gpu/gather_probe.py``), on the device and overlapped with the previous batch's DMA.
"""

from __future__ import annotations

import array
import logging
import threading
from collections import deque

import numpy as np
import torch

from kvortex_core.data.rows import alias_bytes

log = logging.getLogger("kvortex_core.data.ids")


class IdsArena:
    """``regions`` regions of ``capacity`` int64 ids each; a region is lent to one transfer at a time.

    ``take`` returns None when no region is free or the ids do not fit: the caller then
    uploads them the usual way (a transfer never waits for a region).
    """

    def __init__(self, device: torch.device, regions: int = 16, capacity: int = 8192) -> None:
        self.capacity = capacity
        self._host = torch.empty(regions * capacity, dtype=torch.int64, pin_memory=True)
        self._np = self._host.numpy()
        self._dev = alias_bytes(self._host.data_ptr(), regions * capacity * 8, device).view(torch.int64)
        self._free: deque[int] = deque(range(regions))
        self._rows: dict[tuple[int, int, int], list[torch.Tensor]] = {}
        self._lock = threading.Lock()  # guards _rows (the deque's ends are thread-safe)

    @classmethod
    def create(cls, device: torch.device) -> IdsArena | None:
        """An arena on ``device``, or None where pinned memory cannot be read in place."""
        try:
            arena = cls(device)
            probe = arena._dev[:2]
            arena._np[:2] = (7, 11)
            if probe.tolist() != [7, 11]:  # a device read of the host bytes
                raise RuntimeError(f"device read {probe.tolist()} for [7, 11]")
            return arena
        except (RuntimeError, TypeError, ValueError) as exc:
            log.warning("block ids are uploaded per transfer (pinned memory not readable in place: %s)", exc)
            return None

    def take(self, ids: list[list[int]]) -> tuple[int, list[torch.Tensor]] | None:
        """A region holding ``ids`` (``[C, n]``, rectangular) and its rows as device tensors, or None."""
        c, n = len(ids), len(ids[0])
        if c * n > self.capacity:
            return None
        try:
            region = self._free.popleft()
        except IndexError:
            return None
        base = region * self.capacity
        flat = array.array("q")
        for row in ids:
            flat.fromlist(row)
        self._np[base:base + c * n] = np.frombuffer(flat, dtype=np.int64)
        key = (region, c, n)
        rows = self._rows.get(key)
        if rows is None:  # view ops cost ~5-20 us each: one set per shape and region, kept
            with self._lock:
                if len(self._rows) >= 1024:
                    self._rows.clear()
                rows = self._rows[key] = list(self._dev[base:base + c * n].view(c, n).unbind(0))
        return region, rows

    def give(self, region: int) -> None:
        """Take ``region`` back: every kernel that read it has completed."""
        self._free.append(region)
