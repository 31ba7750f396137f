"""Block ids for the gather kernels: per-transfer regions, uploaded by one kernel and no event.

A transfer's gather kernels need its block ids on the device. Reusing one pinned buffer would
need an event per call, checked before the next (on a cold path ~90-150 us of host time before
the first DMA, measured on an H100 VM by ``tests/gpu/start_probe.py``, since removed). An
:class:`IdsArena` instead lends each transfer a region of a pinned host buffer and of its
device twin, taken back only once the transfer completed: the host writes the ids, one upload
moves them, and nothing else is tracked. Past the arena (every region lent, or more ids than a region holds) a transfer gets a
region of its own from the pinned and device allocators, used the same way.

(The gather kernels could read the pinned region in place through unified addressing, with no
device twin at all; measured on an H100 that made every gather read its ids over PCIe,
competing with the DMAs: saves and loads of 8K tokens lost 2-7 % against the row plan, so the
ids are uploaded once per transfer. Two readers do read in place: the row plan's row kernel,
which reads each id a few times per call, and the first gather of a save started with its copy
stream idle, which runs before any DMA of the call: see ``TransferEngine._enqueue_save``.)

The copy itself is a kernel (:func:`upload`) reading the pinned ids over unified addressing,
not a host-to-device ``copy_`` (a DMA). With the DMA, a save running beside a load through
KVortexEngine had parts whose copies started only after the whole load had finished (12 ms
late in ``tests/gpu/bidir_timeline.py`` on an H100), and both directions at once reached
0.68-0.75 of the raw copies for the Llama-8B unified layout; with the kernel, 0.99-1.00
(docs/benchmarks/transfer.md). Which driver or allocator queue held the DMA back was not
isolated: host-to-device copies queued (or gated on an event) on the load's stream did not
delay a DMA upload in an isolated test. The kernel reads each id once (a few KiB).
"""

from __future__ import annotations

import array
import itertools
import threading
from collections import deque
from typing import NamedTuple

import torch


def upload(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst`` (device) = ``src`` (a device alias of pinned host memory, see :func:`host_alias`),
    by a kernel on the current stream (no DMA, no copy engine, see the module docstring)."""
    torch.add(src, 0, out=dst)


def host_alias(pinned: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device tensor over ``pinned`` (page-locked host memory) through unified addressing.

    The caller keeps ``pinned`` alive. Kernels reading it read host memory over PCIe. Relies on
    the device address of pinned memory being its host address: true under unified addressing
    (every 64-bit CUDA platform) for ``cudaHostAlloc`` memory, what ``pin_memory`` returns by
    default (with ``pinned_use_cuda_host_register`` it registers memory instead, which devices
    that can use the host pointer for registered memory, as x86-64 GPUs do, also address so).
    """
    from kvortex_core.data.rows import alias_bytes

    nbytes = pinned.numel() * pinned.element_size()
    return alias_bytes(pinned.data_ptr(), nbytes, device).view(pinned.dtype).view(pinned.shape)


def flat_ids(ids: list[list[int]]) -> array.array[int]:
    """The rows of ``ids`` concatenated as one ``array("q")`` (at C speed: no per-id Python work)."""
    flat = array.array("q")
    for row in ids:
        flat.fromlist(row)
    return flat


class IdsRegion(NamedTuple):
    """One transfer's block ids ``[C, n]`` in an :class:`IdsArena` region (views kept per shape)."""

    index: int
    #: Flat, a device alias of the pinned region: kernels reading it read host memory over PCIe.
    host: torch.Tensor
    #: Flat, the region's device twin (valid once :meth:`upload` ran on the reader's stream).
    dev: torch.Tensor
    #: Per chunk, ``[n]`` views of the twin.
    rows: list[torch.Tensor]
    #: ``[C, n]`` view of the pinned alias: for kernels that read the ids in place (no upload).
    in_place: torch.Tensor
    #: Per chunk, ``[n]`` views of the pinned alias.
    in_place_rows: list[torch.Tensor]
    #: The pinned host tensor of a region past the arena (None for the arena's own regions).
    owner: torch.Tensor | None = None

    def upload(self) -> None:
        """Copy the ids into the twin by a kernel on the current stream: kernels on that stream
        read ``rows`` in order; others must be ordered after it."""
        upload(self.dev, self.host)


class IdsArena:
    """``regions`` regions of ``capacity`` int64 ids each; a region is lent to one transfer at a time.

    ``lend`` never waits: when no region is free or the ids do not fit, it makes a region past
    the arena (allocator memory, kept referenced here until given back, so a transfer whose
    handle was dropped unwaited never frees memory a pending kernel still reads). 64 regions
    cover a layer-by-layer save of a 61-layer model in flight; 4096 ids are 64K tokens of
    16-token blocks.
    """

    @torch.inference_mode(False)
    def __init__(self, device: torch.device, regions: int = 64, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._device = device
        self._host = torch.empty(regions * capacity, dtype=torch.int64, pin_memory=True)
        self._ids = memoryview(self._host.numpy()).cast("B").cast("q")  # the pinned ids, writable
        self._uva = host_alias(self._host, device)  # the same memory, for kernels (upload, in place)
        self._dev = torch.empty(regions * capacity, dtype=torch.int64, device=device)
        self._free: deque[int] = deque(range(regions))
        self._views: dict[tuple[int, int, int], IdsRegion] = {}
        #: Regions past the arena, by their (negative) index, until given back.
        self._overflow: dict[int, IdsRegion] = {}
        self._overflows = itertools.count(1)
        self._lock = threading.Lock()  # guards _views and _overflow (the deque's ends are thread-safe)

    def lend(self, ids: list[list[int]]) -> IdsRegion:
        """A region holding ``ids`` (``[C, n]``, rectangular). Nothing is enqueued: kernels read it
        in place, or after ``upload()``."""
        c, n = len(ids), len(ids[0])
        index = None
        if c * n <= self.capacity:
            try:
                index = self._free.pop()  # the last one given back: its views and memory are warm
            except IndexError:
                pass
        if index is None:
            return self._lend_past(ids, c, n)
        base = index * self.capacity
        self._ids[base:base + c * n] = flat_ids(ids)  # a memoryview copy: no numpy call
        key = (index, c, n)
        region = self._views.get(key)
        if region is None:  # view ops cost ~5-20 us each: one set per shape and region, kept
            with self._lock:
                if len(self._views) >= 1024:
                    self._views.clear()
                region = self._views[key] = _region(index, self._uva[base:base + c * n],
                                                    self._dev[base:base + c * n], c, n)
        return region

    @torch.inference_mode(False)
    def _lend_past(self, ids: list[list[int]], c: int, n: int) -> IdsRegion:
        host = torch.empty(c * n, dtype=torch.int64, pin_memory=True)
        memoryview(host.numpy()).cast("B").cast("q")[:] = flat_ids(ids)
        dev = torch.empty(c * n, dtype=torch.int64, device=self._device)
        region = _region(-next(self._overflows), host_alias(host, self._device), dev, c, n, host)
        with self._lock:
            self._overflow[region.index] = region
        return region

    def give(self, region: IdsRegion) -> None:
        """Take ``region`` back: the transfer that held it has completed."""
        if region.index < 0:
            with self._lock:
                self._overflow.pop(region.index, None)
        else:
            self._free.append(region.index)


def _region(index: int, host: torch.Tensor, dev: torch.Tensor, c: int, n: int,
            owner: torch.Tensor | None = None) -> IdsRegion:
    return IdsRegion(index, host, dev, list(dev.view(c, n).unbind(0)), host.view(c, n),
                     list(host.view(c, n).unbind(0)), owner)
