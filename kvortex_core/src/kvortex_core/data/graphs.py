"""Whole-chunk transfers of the row plan as one CUDA graph replay per chunk.

Why: a save and a load enqueued at once from two Python threads (a serving engine saves one
request's prefix while it loads another's) share one GIL, and each torch call releases it and
takes it back. Where the other thread runs Python meanwhile, each call waits for it.
``tests/gpu/graph_bidir_probe.py`` measured MLA chunks both ways with 60 us of Python per chunk
on each thread: the eager structure (~9 torch calls a chunk) fell to 0.70-0.76 of the raw copy,
one replay a chunk kept 0.90-0.96 (docs/benchmarks/transfer.md, twenty-first session).

What a chunk costs here: one small kernel that writes its row numbers into the staging half's
row buffer, one replay (gather + DMA for a save, DMA + scatter for a load) and a wait and a
record for its event, all on the half's own stream.

- One graph per (direction, pinned buffer, staging half). It is captured on the direction's
  capture stream, in thread-local capture mode, so the other direction's thread may run CUDA
  calls meanwhile. ``torch.cuda.graph()`` is not used: it synchronizes the device and collects
  garbage on each capture.
- The inputs sit at fixed addresses: the staging half, its row buffer, and the pinned buffer.
  The row buffer is filled in the half's stream order, so a later chunk on the same half never
  overwrites rows that an earlier replay has not read yet. Two loads of one slot at once are safe.
- After each replay, the half's stream waits for the previous chunk's event before it records
  its own. Chunk events then complete in order (commits, ``done_event``), and the two halves'
  replays still overlap: a gather runs while the other half's DMA runs.
- Used only where every batch of a call is one whole chunk (a staging half holds one chunk but
  not two) of the row plan on CUDA. Everything else, and any capture that fails, takes the
  eager path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from kvortex_core.logs import event

log = logging.getLogger(__name__)

#: Graphs kept per engine (two directions x two halves per pinned buffer): beyond this, buffers
#: not seen yet take the eager path. A graph holds a few KiB of device memory.
MAX_GRAPHS = 8192


class ChunkGraphs:
    """The graphs and streams of one transfer engine (see the module docstring)."""

    def __init__(self, wide: torch.Tensor, row_bytes: int, chunk_bytes: int,
                 stages: dict[str, list[torch.Tensor]], device: torch.device) -> None:
        self.wide = wide
        self.chunk_bytes = chunk_bytes
        self.chunk_rows = chunk_bytes // row_bytes
        self.device = device
        prio = torch.cuda.Stream.priority_range()[1]
        self.streams = {d: [torch.cuda.Stream(device=device, priority=prio) for _ in range(2)] for d in stages}
        self._capture = {d: torch.cuda.Stream(device=device) for d in stages}
        self._stage_bytes = {d: [s[:chunk_bytes] for s in halves] for d, halves in stages.items()}
        self._stage_rows = {d: [s[:chunk_bytes].view(wide.dtype).view(self.chunk_rows, -1) for s in halves]
                            for d, halves in stages.items()}
        self.rows = {d: [torch.empty(self.chunk_rows, dtype=torch.int64, device=device) for _ in range(2)]
                     for d in stages}
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple[str, int, int], Any] = {}
        self._lock = threading.Lock()  # the graph table (each direction captures under its own lock)
        self.failed: str | None = None

    def ready(self, direction: str, bufs: Sequence[torch.Tensor]) -> list[list[Any]] | None:
        """Each buffer's two graphs (captured now if new), or None: take the eager path."""
        out = []
        for buf in bufs:
            pair = []
            for half in (0, 1):
                graph = self._graphs.get((direction, buf.data_ptr(), half))
                if graph is None:
                    graph = self._capture_one(direction, buf, half)
                    if graph is None:
                        return None
                pair.append(graph)
            out.append(pair)
        return out

    def _capture_one(self, direction: str, buf: torch.Tensor, half: int) -> Any:
        if self.failed is not None or len(self._graphs) >= MAX_GRAPHS:
            return None
        graph = torch.cuda.CUDAGraph()
        stream = self._capture[direction]
        try:
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    self._ops(direction, buf, half)
                finally:
                    graph.capture_end()
        except Exception as exc:  # noqa: BLE001 - any capture failure: eager from now on
            self.failed = repr(exc)
            event(log, logging.WARNING, "cuda_graphs_off", error=self.failed,
                  hint="transfers take the eager path (same bytes, more host calls per chunk); "
                       "set transfer.cuda_graphs: false to skip the attempt")
            return None
        with self._lock:
            self._graphs[(direction, buf.data_ptr(), half)] = graph
        return graph

    def _ops(self, direction: str, buf: torch.Tensor, half: int) -> None:
        payload = buf[:self.chunk_bytes]
        rows = self.rows[direction][half]
        if direction == "save":
            torch.index_select(self.wide, 0, rows, out=self._stage_rows[direction][half])
            payload.copy_(self._stage_bytes[direction][half], non_blocking=True)
        else:
            self._stage_bytes[direction][half].copy_(payload, non_blocking=True)
            self.wide.index_copy_(0, rows, self._stage_rows[direction][half])

    @property
    def count(self) -> int:
        return len(self._graphs)
