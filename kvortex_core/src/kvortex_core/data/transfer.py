"""The transfer engine: paged KV between device blocks and canonical chunk payloads.

Save gathers the scattered blocks of a batch of chunks on the device into a staging
buffer (one ``index_select`` of the block ids over a strided view of all layers, or over a
row alias of all layers, see :mod:`.rows`; one per layer as a last resort), then moves the batch with one DMA per chunk range into the pinned
slot; load is the reverse (one DMA in, one ``index_copy_`` out). Staging is double-buffered
and bounded: while batch i is in flight over PCIe, batch i+1 is gathered into the
other half. Everything runs on dedicated side streams, ordered after the caller's
current (compute) stream by an event, and completion is reported by events; the host
never synchronizes the device on the hot path. Each direction has one enqueuer thread,
so ``save``/``load`` return at once and a save and a load issued together enqueue side
by side (layer-wise loads are enqueued by their reader, a layer group ahead). On CPU
tensors the same code runs, the copies happening as they are enqueued.

Payload byte layout of one chunk of ``t`` tokens: ``[layers, kv, t, heads, head_size]``
(layers outermost, so a range of layers is one contiguous byte range).
"""

from __future__ import annotations

import functools
import operator
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch

from kvortex_core.data.ids import IdsArena, IdsRegion
from kvortex_core.data.layouts import KVLayout, layer_views
from kvortex_core.data.rows import (
    RowPlan,
    StridedPlan,
    build_row_plan,
    build_strided_plan,
    raw_alias,
)
from kvortex_core.data.streams import (
    StreamSet,
    TransferTimeoutError,
    event_done,
    event_finish,
    event_wait,
    stream_wait_current,
)
from kvortex_core.errors import LayoutError

__all__ = ["TransferEngine", "TransferHandle", "TransferTimeoutError"]

_LAYERWISE_UNIT_BYTES = 4 * 1024**2
_DRAIN_BYTES = 2 * 1024**2

#: ``gather`` modes of :class:`TransferEngine`.
GATHER_MODES = ("auto", "strided", "rows", "layers")

#: "auto" takes the strided plan when a staging half holds at most this many chunks: it costs
#: one kernel per chunk, the row plan one per batch (plus a row table per call).
_STRIDED_MAX_CHUNKS_PER_BATCH = 8


@dataclass(frozen=True)
class _Unit:
    """Layers ``[l0, l1)`` of one chunk: one contiguous byte range of its payload."""

    chunk: int
    l0: int
    l1: int
    blocks: int
    payload_offset: int
    nbytes: int
    stage_offset: int = 0


#: A chunk event not recorded yet (its batch is still being enqueued by the worker).
_UNSET: Any = object()


@dataclass
class TransferHandle:
    """Completion of one save or load; keeps its pinned buffers referenced until done.

    Saves and whole loads are enqueued by the direction's worker thread, so the caller gets
    the handle at once (a save and a load issued back to back enqueue side by side); every
    method first waits, if needed, until the worker has enqueued the transfer.
    """

    device: torch.device
    what: str
    done_event: Any = None
    layer_events: list[Any] = field(default_factory=list)
    chunk_events: list[Any] = field(default_factory=list)
    keepalive: list[Any] = field(default_factory=list)
    #: Enqueues the rest of a layer-wise load (``advance(layer)``: up to that layer; None: all).
    advance: Callable[[int | None], None] | None = None
    #: Every event this transfer recorded or waited on, each once (recycled when it completes).
    other_events: list[Any] = field(default_factory=list)
    #: The stream set that takes this handle's events back once it completed (None: dropped).
    home: StreamSet | None = None
    #: Trailing batches that ``wait`` leaves to the driver's wait (after the others completed):
    #: at least ~0.3 ms of copies, so the waiter thread's wake-up hides behind them; 2 for a
    #: load ending with a small drain batch.
    tail_batches: int = 1
    #: Called once the transfer completed (gives back what its kernels read, e.g. an ids region).
    on_retire: list[Callable[[], None]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _enqueued: bool = True
    _error: BaseException | None = None
    _complete: bool = False

    def _retire(self) -> None:
        """Completed: release the buffers, hand the events back for reuse, never query them again.

        ``other_events`` holds every event the transfer recorded (chunk and layer events are
        some of them) and the caller-stream events it waited on, each once.
        """
        with self._cond:
            if self._complete:
                return
            self._complete = True
            events = self.other_events
            events.append(self.done_event)
            self.done_event, self.chunk_events, self.layer_events, self.other_events = None, [], [], []
            keep, self.keepalive = self.keepalive, []
            release, self.on_retire = self.on_retire, []
        for fn in release:
            fn()
        if self.home is not None:
            self.home.recycle(events)
            self.home.defer(keep)  # freed while a later transfer waits (see StreamSet.defer)

    def _flush(self) -> None:
        if self.advance is not None:
            self.advance(None)

    def _finish_enqueue(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._enqueued, self._error = True, error
            self._cond.notify_all()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _await_enqueue(self, timeout: float | None, ready: Callable[[], bool] | None = None) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._enqueued or (ready is not None and ready()), timeout):
                raise TransferTimeoutError(f"{self.what} was not even enqueued within timeout={timeout}s")
        if self._error is not None:
            raise self._error

    def done(self) -> bool:
        """True once every copy of this transfer has completed (never blocks on the device)."""
        if self._complete:
            return True
        self._flush()
        if not self._enqueued:
            return False
        if self._error is not None:
            raise self._error
        finished = event_done(self.done_event)
        if finished:
            self._retire()
        return finished

    def wait(self, timeout: float | None = None) -> None:
        """Block the host until the transfer completed; TransferTimeoutError after ``timeout`` s
        (checked up to the last stretch, ``tail_batches`` batches awaited in the driver)."""
        if self._complete:
            return
        self._flush()
        self._await_enqueue(timeout)
        if self.home is not None:
            self.home.drop_deferred()  # earlier transfers' buffers, freed while this one runs
        batches = self.other_events  # [caller's event, batch 1 .. batch n]
        head = len(batches) - 1 - self.tail_batches
        if head >= 1 and self.done_event is not None:
            # the batches before the last stretch through the blocking waiter, with the timeout;
            # then the driver's own wait for the rest (event_finish): no thread hand-off after
            # the last copy's end (see event_finish for the measured wake-ups)
            event_wait(batches[head], timeout, self.what)
            event_finish(self.done_event)
        else:
            event_wait(self.done_event, timeout, self.what)
        self._retire()

    def wait_chunk(self, chunk: int, timeout: float | None = None) -> None:
        """Block the host until chunk ``chunk`` of a save sits in its buffer (commit it early)."""
        events = self.chunk_events
        if not 0 <= chunk < len(events):
            self.wait(timeout)
            return
        self._await_enqueue(timeout, lambda: events[chunk] is not _UNSET)
        event_wait(events[chunk], timeout, f"{self.what} (chunk {chunk})")

    def wait_layer(self, layer: int) -> None:
        """Order the caller's current stream after layer ``layer`` arrived (no host block).

        A layer-wise load enqueues its copies a layer group ahead of these calls, so the
        host never spends the whole enqueue up front. Other handles: the whole transfer
        (the host waits only until the worker has enqueued it).
        """
        if self.advance is not None:
            self.advance(layer)
        self._await_enqueue(None)
        if self.device.type != "cuda" or self._complete:
            return
        events = self.layer_events
        event = events[layer] if 0 <= layer < len(events) else self.done_event
        stream_wait_current(event, self.device)

    def stream_wait(self) -> None:
        """Order the caller's current stream after the whole transfer (no host block)."""
        self._flush()
        self._await_enqueue(None)
        if self.device.type == "cuda" and not self._complete:
            stream_wait_current(self.done_event, self.device)


class _Direction:
    """One direction's streams and double-buffered staging (guarded by its own lock)."""

    def __init__(self, device: torch.device, num_streams: int, half_bytes: int, *, kernels_second: bool) -> None:
        self.streams = StreamSet(device, num_streams)
        #: The stream of this direction's kernels (gathers: first; scatters: second), where its
        #: block ids and row tables are made too: never between two of its DMAs.
        self.kernel_stream: Any = self.streams.second if kernels_second else self.streams.first
        self.stages = [torch.empty(half_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
        self.free_events: list[Any] = [None, None]
        self.turn = 0
        self.lock = threading.Lock()
        # One enqueuer thread per direction: transfers of one direction keep their order.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvortex-transfer")

    def idle(self) -> bool:
        """Nothing of this direction is queued on the device: its latest batch completed."""
        latest = self.free_events[self.turn]
        return latest is None or bool(latest.query())

    @functools.cached_property
    @torch.inference_mode(False)
    def arena(self) -> IdsArena | None:
        """Per-transfer block-id regions (CUDA only; made on first use)."""
        return IdsArena(self.streams.device) if self.streams.cuda else None

    def submit(self, handle: TransferHandle, work: Callable[[], None], inline: bool = False) -> None:
        """Run ``work`` (the enqueue) on the worker; the handle learns when it finished.

        ``inline``: enqueue on the caller's thread instead (a synchronous caller saves the
        thread hand-off, ~0.2-0.4 ms, before the first copy starts); errors raise here.
        """
        if inline:
            work()
            return
        handle._enqueued = False

        def run() -> None:
            try:
                work()
            except BaseException as exc:  # noqa: BLE001 - re-raised by the handle's waiters
                handle._finish_enqueue(exc)
            else:
                handle._finish_enqueue()

        self.worker.submit(run)


class TransferEngine:
    """Moves chunk payloads between the registered KV cache and host buffers."""

    @torch.inference_mode(False)  # tensors made here serve callers in and out of inference mode
    def __init__(
        self,
        kv_caches: Any,
        layout: KVLayout,
        *,
        chunk_tokens: int,
        staging_bytes: int = 32 * 1024**2,
        num_streams: int = 2,
        device: torch.device | str | None = None,
        gather: str = "auto",
    ) -> None:
        if chunk_tokens <= 0 or chunk_tokens % layout.block_size:
            raise LayoutError(
                f"chunk_tokens={chunk_tokens} must be a positive multiple of the KV block size "
                f"{layout.block_size}; set chunk_tokens to e.g. {layout.block_size * 16}"
            )
        self.layout = layout
        self.chunk_tokens = chunk_tokens
        self.blocks_per_chunk = chunk_tokens // layout.block_size
        self.views = layer_views(kv_caches, layout)
        self.device = torch.device(device) if device is not None else self.views[0].device
        if self.views[0].device != self.device:
            raise LayoutError(f"KV caches live on {self.views[0].device} but device={self.device} was given")
        if gather not in GATHER_MODES:
            raise LayoutError(f"gather={gather!r} is not one of {', '.join(GATHER_MODES)}")
        # One layer of one full chunk must fit a staging half.
        half = max(int(staging_bytes) // 2, layout.layer_bytes(chunk_tokens))
        self.half_bytes = half
        self._keep = kv_caches  # the views and aliases below do not own the memory
        strided = build_strided_plan(self.views) if gather in ("auto", "strided") else None
        if gather == "strided" and strided is None:
            raise LayoutError("gather='strided' needs layers of one shape and strides with a contiguous "
                              "head dimension, at most 8 groups of evenly spaced layers; use gather='auto'")
        rows = build_row_plan(self.views, kv_caches) if gather in ("auto", "rows") else None
        if gather == "auto" and strided is not None and rows is not None \
                and not _strided_pays(strided, layout, chunk_tokens, half):
            strided = None
        self._strided: StridedPlan | None = strided
        self._rows: RowPlan | None = rows if strided is None else None
        if gather == "rows" and self._rows is None:
            d_stride = self.views[0].stride(4) if self.views[0].shape[4] > 1 else 1
            why = (f"each head vector contiguous (the head dimension's stride is {d_stride}, not 1)"
                   if d_stride != 1 else
                   "layers whose addresses and strides are whole elements apart")
            raise LayoutError(f"gather='rows' needs {why}; use gather='auto' (or 'layers')")
        # Fallback, one kernel per layer: [K, B, N, H, D] per layer, block ids index dim 1. Over
        # aliases, as the other plans: the caller's tensors may require grad or be inference
        # tensors, and neither may be written by an out= or in-place kernel outside autograd's rules.
        self._views_t = [raw_alias(v).transpose(0, 1) for v in self.views]
        self._plans: dict[tuple[Any, ...], list[list[_Unit]]] = {}
        self._stage_views: dict[tuple[int, ...], torch.Tensor] = {}
        self._save = _Direction(self.device, num_streams, half, kernels_second=False)
        self._load = _Direction(self.device, num_streams, half, kernels_second=True)

    # ------------------------------------------------------------------ public API

    @property
    def row_gather(self) -> bool:
        """True when one kernel moves all layers of a unit (see :mod:`kvortex_core.data.rows`)."""
        return self._rows is not None or self._strided is not None

    @property
    def gather_mode(self) -> str:
        """How blocks are gathered and scattered: "strided", "rows" or "layers" (see :mod:`.rows`)."""
        return "strided" if self._strided is not None else "rows" if self._rows is not None else "layers"

    def save(self, block_ids_per_chunk: Sequence[Sequence[int]], dst: Sequence[torch.Tensor], *,
             inline: bool = False, checked: bool = False) -> TransferHandle:
        """Copy each chunk's blocks (all layers) into ``dst[i]`` (uint8 payload view of a pinned slot).

        Returns at once: the copies are enqueued by the direction's worker thread, or, with
        ``inline``, by the caller before this returns (the host never waits for the device).
        ``checked``: the caller built the ids (lists of ints in range, at most a chunk each)
        and the buffers (pool payload views) itself; skips their per-chunk checks (~6 us a chunk).
        """
        return self._save_layers(block_ids_per_chunk, dst, range(self.layout.num_layers), "save", inline,
                                 checked)

    def save_layer(
        self, layer: int, block_ids_per_chunk: Sequence[Sequence[int]], dst: Sequence[torch.Tensor]
    ) -> TransferHandle:
        """Copy one layer of each chunk into its place in ``dst[i]`` as the forward produces it."""
        if not 0 <= layer < self.layout.num_layers:
            raise LayoutError(f"layer {layer} is out of range [0, {self.layout.num_layers})")
        return self._save_layers(block_ids_per_chunk, dst, range(layer, layer + 1), f"save of layer {layer}")

    def load(
        self,
        src: Sequence[torch.Tensor],
        block_ids_per_chunk: Sequence[Sequence[int]],
        *,
        layerwise: bool = False,
        skip_blocks: int = 0,
        inline: bool = False,
        checked: bool = False,
        drain: bool = True,
    ) -> TransferHandle:
        """Copy each chunk payload ``src[i]`` into its blocks.

        ``skip_blocks``: the first blocks (counted over all chunks in order) are left
        untouched, for tokens the engine already holds. ``layerwise``: layer-major order
        with one event per layer (``handle.wait_layer(i)``). ``inline``, ``checked``: as for :meth:`save`.
        ``drain``: end with a small unit, so little is left to scatter after the last DMA; pass
        False when another load follows at once (a caller's next part): its first DMA would then
        wait for the scatter of the batch before the small one.
        """
        blocks = self._check(block_ids_per_chunk, src, "load", checked)
        skips = _split_skip(blocks, skip_blocks)
        layers = range(self.layout.num_layers)
        units = self._units(blocks, layers, layer_major=layerwise, drain=drain and not layerwise)
        handle = TransferHandle(self.device, "load")
        if drain and not layerwise and len(units) > 1:
            handle.tail_batches = 2  # the last batch is the small drain unit (_plan_units)
        job = _LoadJob(self, units, blocks, skips, src, handle, layerwise)
        if layerwise:  # driven by the reader's wait_layer calls, from its own thread
            job.advance(0)
        else:
            self._load.submit(handle, lambda: job.advance(None), inline)
        return handle

    def close(self) -> None:
        """Stop the enqueuer threads once queued transfers are enqueued (handles stay valid)."""
        for d in (self._save, self._load):
            d.worker.shutdown(wait=True)
            d.streams.drop_deferred()

    # ------------------------------------------------------------------ planning

    def _check(self, block_ids_per_chunk: Sequence[Sequence[int]], bufs: Sequence[torch.Tensor],
               what: str, checked: bool = False) -> list[list[int]]:
        if checked:
            return block_ids_per_chunk  # type: ignore[return-value]  # lists of ints, per the caller
        blocks = [b if type(b) is list else (b.tolist() if hasattr(b, "tolist") else list(b)) for b in block_ids_per_chunk]
        if len(blocks) != len(bufs):
            raise LayoutError(f"{what}: {len(blocks)} chunks of block ids but {len(bufs)} buffers")
        per_block = self.layout.chunk_bytes(self.layout.block_size)
        for i, (ids, buf) in enumerate(zip(blocks, bufs, strict=True)):
            if not 0 < len(ids) <= self.blocks_per_chunk:
                raise LayoutError(
                    f"{what}: chunk {i} has {len(ids)} block ids; expected 1..{self.blocks_per_chunk} "
                    f"(chunk_tokens={self.chunk_tokens} / block_size={self.layout.block_size})"
                )
            need = len(ids) * per_block
            if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < need or not buf.is_contiguous():
                raise LayoutError(
                    f"{what}: buffer {i} must be a contiguous 1-D uint8 tensor of at least {need} "
                    f"bytes, got {buf.dtype} shape {tuple(buf.shape)}"
                )
        flat = [b for ids in blocks for b in ids]
        if not all(type(b) is int for b in flat):  # a numpy id in a list: convert, or fail here
            blocks = [[_block_id(b, what, i) for b in ids] for i, ids in enumerate(blocks)]
            flat = [b for ids in blocks for b in ids]
        if flat and (min(flat) < 0 or max(flat) >= self.layout.num_blocks):
            for i, ids in enumerate(blocks):  # name the chunk
                self.layout.check_block_ids(ids, f"{what}: chunk {i} block ids")
        return blocks

    def _units(self, blocks: list[list[int]], layers: range, *, layer_major: bool,
               drain: bool = False) -> list[list[_Unit]]:
        """Split the chunks into layer ranges and pack them into staging-sized batches.

        Plans depend only on the chunks' lengths: cached, so a repeated shape plans for free.
        """
        key = (tuple(map(len, blocks)), layers.start, layers.stop, layer_major, drain)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 256:
                self._plans.clear()
            plan = self._plans[key] = self._plan_units(blocks, layers, layer_major=layer_major, drain=drain)
        return plan

    def _plan_units(self, blocks: list[list[int]], layers: range, *, layer_major: bool,
                    drain: bool) -> list[list[_Unit]]:
        templates: dict[tuple[int, bool], list[tuple[int, int, int, int]]] = {}
        order: list[_Unit] = []
        for c, ids in enumerate(blocks):
            key = (len(ids), drain and c == len(blocks) - 1)
            spans = templates.get(key)
            if spans is None:  # chunks of one size share their layer split
                spans = templates[key] = self._spans(len(ids), layers, layer_major, drain_last=key[1])
            order += [_Unit(c, a, b, len(ids), off, n) for a, b, off, n in spans]
        if layer_major:
            order.sort(key=lambda u: (u.l0, u.chunk))
        elif drain and len(order) > 1 and order[-1].chunk == order[-2].chunk:
            # a load's small last unit is a batch of its own: after the last DMA only its short
            # scatter remains (the host enqueued everything long before, so this costs nothing)
            return _pack(order[:-1], self.half_bytes) + _pack(order[-1:], self.half_bytes)
        return _pack(order, self.half_bytes)

    def _spans(self, n_blocks: int, layers: range, layer_major: bool, *, drain_last: bool
               ) -> list[tuple[int, int, int, int]]:
        """``(l0, l1, payload_offset, nbytes)`` of each unit of a chunk of ``n_blocks`` blocks.

        ``drain_last``: end with a unit of about 2 MiB (a load's last scatter follows its last
        DMA). A save gets no small first unit: measured on H100/H200, the DMA engine then idles
        ~100 us while the host enqueues the next batch, more than the gather it saves (~25 us).
        """
        lb = self.layout.layer_bytes(n_blocks * self.layout.block_size)
        step = self._layer_group(lb) if layer_major else max(1, self.half_bytes // lb)
        cuts = {min(x, layers.stop) for x in (layers.start, *range(layers.start + step, layers.stop, step),
                                              layers.stop)}
        tail = max(1, _DRAIN_BYTES // lb)
        if drain_last and not layer_major and layers.stop - tail > layers.start:
            cuts.add(layers.stop - tail)
        if self._strided is not None:  # a unit's layers lie in one strided view
            cuts.update(x for x in self._strided.starts if layers.start < x < layers.stop)
        return [(a, b, a * lb, (b - a) * lb) for a, b in pairwise(sorted(cuts))]

    def _layer_group(self, layer_bytes: int) -> int:
        """Layers per unit in layer-wise order: units of >= 4 MiB (launch cost is per unit),
        but at least 4 groups so compute can start early, and never more than a staging half."""
        want = -(-_LAYERWISE_UNIT_BYTES // layer_bytes)
        cap = max(1, min(self.layout.num_layers // 4, self.half_bytes // layer_bytes))
        return max(1, min(want, cap))

    def _index_tensors(self, blocks: list[list[int]], d: _Direction, handle: TransferHandle,
                       region: IdsRegion | None = None) -> Any:
        """Device indices for every chunk, made on the direction's kernel stream, the only one
        that reads them: a load's DMAs (on the other stream) never queue behind them.

        ``region``: the ids already lent (see :meth:`_lend_ids`); else lent here.
        """
        if region is None:
            region = self._lend_ids(blocks, d, handle)
        with d.streams.on(d.kernel_stream):
            return self._indices(blocks, region, len(blocks), in_place=False)

    def _lend_ids(self, blocks: list[list[int]], d: _Direction, handle: TransferHandle) -> IdsRegion | None:
        """The call's block ids (short chunks padded) in an arena region, given back once the
        transfer completed; None on CPU."""
        arena = d.arena
        if arena is None:
            return None
        width = max(len(ids) for ids in blocks)
        region = arena.lend([ids + ids[:1] * (width - len(ids)) for ids in blocks])
        handle.on_retire.append(lambda: arena.give(region))
        return region

    def _indices(self, blocks: list[list[int]], region: IdsRegion | None, chunks: int, *,
                 in_place: bool) -> Any:
        """Indices of chunks ``[0, chunks)``, enqueued on the current stream: row numbers
        ``[C, L, K, n, ...]`` with a row plan, else per-chunk block ids (short chunks padded:
        readers slice each to its unit's blocks).

        ``in_place``: the strided gather reads its ids from the pinned region (no upload kernel);
        only for a save's first batch, before any of its DMAs competes for PCIe. The row plan's
        row kernel always reads them in place: it reads each id a few times, once per call.
        """
        lay = self.layout
        if region is None:  # on CPU: the same padded [C, n] ids as an arena region holds
            width = max(len(ids) for ids in blocks)
            padded = torch.tensor([ids + ids[:1] * (width - len(ids)) for ids in blocks], dtype=torch.int64)
        if self._rows is not None:
            ids = padded if region is None else region.in_place if chunks == len(blocks) else region.in_place[:chunks]
            return self._rows.call_rows(ids, lay.block_size, lay.kv_count, lay.num_kv_heads)
        if region is None:
            return list(padded.unbind(0))
        if in_place:  # the strided and the per-layer plans: per-chunk block ids
            return region.in_place_rows
        region.upload()
        return region.rows

    # ------------------------------------------------------------------ save

    def _save_layers(self, block_ids_per_chunk: Sequence[Sequence[int]], dst: Sequence[torch.Tensor],
                     layers: range, what: str, inline: bool = False, checked: bool = False) -> TransferHandle:
        blocks = self._check(block_ids_per_chunk, dst, what, checked)
        batches = self._units(blocks, layers, layer_major=False)
        d = self._save
        produced = d.streams.record_current()  # the caller's stream: the forward that wrote the KV
        handle = TransferHandle(self.device, what, chunk_events=[_UNSET] * len(blocks),
                                keepalive=[list(dst)], other_events=[produced], home=d.streams)
        d.submit(handle, lambda: self._enqueue_save(d, batches, blocks, dst, produced, handle), inline)
        return handle

    def _enqueue_save(self, d: _Direction, batches: list[list[_Unit]], blocks: list[list[int]],
                      dst: Sequence[torch.Tensor], produced: Any, handle: TransferHandle) -> None:
        s = d.streams
        remaining = [0] * len(blocks)
        for batch in batches:
            for u in batch:
                remaining[u.chunk] += 1
        with d.lock:
            region = self._lend_ids(blocks, d, handle)
            # With nothing queued on the DMA stream, the first batch is gathered there, reading
            # its ids in place: no upload, no hand-over event, no stream switch before the first
            # DMA (each a CUDA call of 20-100 us on a cold host path). Behind other DMAs its
            # gather would wait for them all, so then it takes the kernel stream like the rest.
            head = region is not None and d.idle()
            idx = None
            for k, batch in enumerate(batches):
                if head and k == 0:
                    d.turn ^= 1  # the half's last reader is a DMA on this very stream: in order
                    stage = d.stages[d.turn]
                    with s.on(s.second):
                        s.wait(s.second, produced)
                        idx0 = self._indices(blocks, region, batch[-1].chunk + 1, in_place=True)
                        handle.keepalive.append(idx0)
                        self._gather_batch(batch, idx0, stage)
                else:
                    if idx is None:
                        idx = self._index_tensors(blocks, d, handle, region)
                        handle.keepalive.append(idx)
                    # the caller's event orders the first batch here; later ones follow in stream order
                    stage = self._next_stage(d, produced if k == int(head) else None, s.first)
                    with s.on(s.first):
                        self._gather_batch(batch, idx, stage)
                    s.hand_over(s.first, s.second)
                with s.on(s.second):
                    for u in batch:
                        _payload_range(dst[u.chunk], u).copy_(self._stage_bytes(stage, u), non_blocking=True)
                d.free_events[d.turn] = s.record(s.second, d.free_events)
                handle.other_events.append(d.free_events[d.turn])
                landed = [u.chunk for u in batch if _last(remaining, u.chunk)]
                for c in landed:
                    handle.chunk_events[c] = d.free_events[d.turn]
                if landed:
                    handle._notify()
            handle.done_event = s.record(s.second, d.free_events)

    def _gather_batch(self, batch: list[_Unit], idx: Any, stage: torch.Tensor) -> None:
        if not self._batch_rows_op(batch, idx, stage, None):
            for u in batch:
                self._gather(u, idx, stage)

    def _next_stage(self, d: _Direction, after: Any, stream: Any) -> torch.Tensor:
        """The other staging half, once its previous copy finished (a GPU-side wait)."""
        d.turn ^= 1
        d.streams.wait(stream, d.free_events[d.turn])
        d.streams.wait(stream, after)
        return d.stages[d.turn]

    def _unit_view(self, u: _Unit, stage: torch.Tensor) -> torch.Tensor:
        """The unit's staging bytes as ``[layers, K, blocks, N, H, D]``."""
        lay = self.layout
        shape = (u.l1 - u.l0, lay.kv_count, u.blocks, lay.block_size, lay.num_kv_heads, lay.head_size)
        return stage[u.stage_offset:u.stage_offset + u.nbytes].view(lay.transfer_dtype).view(shape)

    def _batch_rows_op(self, batch: list[_Unit], idx: Any, stage: torch.Tensor, skips: list[int] | None) -> bool:
        """Gather (``skips`` None) or scatter a whole batch with one kernel; False if it does not apply.

        Applies when the batch is consecutive whole chunks sharing one layer range (a layer-wise
        load's batch, or a save of chunks smaller than a staging half): their rows are then one
        slice of the call's row table and their staging bytes one range, so one kernel replaces
        one per chunk (host launch cost, not bandwidth, bounds many small units).
        """
        if self._rows is None or len(batch) < 2:
            return False
        first, width = batch[0], idx.shape[3]
        for k, u in enumerate(batch):
            if (u.chunk != first.chunk + k or u.l0 != first.l0 or u.l1 != first.l1 or u.blocks != width
                    or (skips is not None and skips[u.chunk])):
                return False
        rows = idx[first.chunk:first.chunk + len(batch), first.l0:first.l1].reshape(-1)
        last = batch[-1]
        wide = self._rows.wide_rows
        row_bytes = self._rows.row_bytes
        staged = self._wide_stage(stage)[first.stage_offset // row_bytes:(last.stage_offset + last.nbytes) // row_bytes]
        if skips is None:
            torch.index_select(wide, 0, rows, out=staged)
        else:
            wide.index_copy_(0, rows, staged)
        return True

    def _stage_bytes(self, stage: torch.Tensor, u: _Unit) -> torch.Tensor:
        """The unit's staging bytes (views cached: a slice costs ~5-20 us of host time)."""
        return self._cached_view((stage.data_ptr(), u.stage_offset, u.nbytes),
                                 lambda: stage[u.stage_offset:u.stage_offset + u.nbytes])

    def _cached_view(self, key: tuple[int, ...], make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Views of the staging halves by (address, offset, size); a unit of size 0 never exists."""
        view = self._stage_views.get(key)
        if view is None:
            if len(self._stage_views) >= 4096:  # many distinct unit shapes: start over
                self._stage_views.clear()
            view = self._stage_views[key] = make()
        return view

    def _wide_stage(self, stage: torch.Tensor) -> torch.Tensor:
        """A staging half as wide rows (cached: each view op costs ~5 us of host time)."""
        assert self._rows is not None
        wide, row_bytes = self._rows.wide_rows, self._rows.row_bytes
        usable = stage.numel() // row_bytes * row_bytes
        return self._cached_view((stage.data_ptr(), 0, 0),  # size 0: the whole half as rows
                                 lambda: stage[:usable].view(wide.dtype).view(-1, wide.shape[1]))

    def _stage_rows(self, u: _Unit, stage: torch.Tensor, skip: int) -> torch.Tensor:
        """The unit's staging bytes as wide rows ``[n, w]`` (a copy when ``skip`` cuts blocks out)."""
        assert self._rows is not None
        if not skip:
            row_bytes = self._rows.row_bytes
            return self._cached_view(  # negative size: the wide-rows view of the same bytes
                (stage.data_ptr(), u.stage_offset, -u.nbytes),
                lambda: self._wide_stage(stage)[u.stage_offset // row_bytes:(u.stage_offset + u.nbytes) // row_bytes])
        wide = self._rows.wide_rows
        src = self._unit_view(u, stage)[:, :, skip:]
        return src.reshape(-1, self._rows.row_elems).view(wide.dtype)

    def _strided_stage(self, u: _Unit, stage: torch.Tensor) -> torch.Tensor:
        """The unit's staging bytes as ``[layers, K, blocks, N, H, D']`` in the strided plan's dtype."""
        plan = self._strided
        assert plan is not None
        lay = self.layout

        def make() -> torch.Tensor:
            flat = stage[u.stage_offset:u.stage_offset + u.nbytes].view(plan.dtype)
            return flat.view(u.l1 - u.l0, lay.kv_count, u.blocks, lay.block_size, lay.num_kv_heads, -1)

        return self._cached_view((stage.data_ptr(), u.stage_offset, u.nbytes, u.blocks), make)

    def _gather(self, u: _Unit, idx: Any, stage: torch.Tensor) -> None:
        if self._strided is not None:
            ids = idx[u.chunk]
            if u.blocks < ids.shape[0]:
                ids = ids[:u.blocks]
            self._strided.gather(u.l0, u.l1, ids, self._strided_stage(u, stage))
            return
        if self._rows is not None:
            rows = self._rows.unit_rows(idx, u.chunk, u.l0, u.l1, u.blocks)
            wide = self._rows.wide_rows
            torch.index_select(wide, 0, rows, out=self._stage_rows(u, stage, 0))
            return
        out = self._unit_view(u, stage)
        ids = idx[u.chunk][:u.blocks]
        for layer, o in zip(range(u.l0, u.l1), out.unbind(0), strict=True):
            torch.index_select(self._views_t[layer], 1, ids, out=o)

    # ------------------------------------------------------------------ load

    def _load_batch(self, batch: list[_Unit], job: _LoadJob) -> Any:
        """DMA one batch into a staging half, scatter it into the blocks; returns its done event.

        The DMA needs no block ids and writes only staging: it is enqueued first, and the call's
        indices (``job.indices()``, on the scatter stream) and the wait for the caller's use of
        the blocks (``job.in_use``, before the scatter) come after it, off the path to the first copy.
        """
        d, src, skips = job.d, job.src, job.skips
        s = d.streams
        stage = self._next_stage(d, None, s.first)
        with s.on(s.first):
            for u in batch:
                self._stage_bytes(stage, u).copy_(_payload_range(src[u.chunk], u), non_blocking=True)
        idx = job.indices()
        s.hand_over(s.first, s.second)
        s.wait(s.second, job.in_use)
        with s.on(s.second):
            if not self._batch_rows_op(batch, idx, stage, skips):
                for u in batch:
                    self._scatter(u, idx, stage, skips[u.chunk])
        d.free_events[d.turn] = s.record(s.second, d.free_events)
        return d.free_events[d.turn]

    def _scatter(self, u: _Unit, idx: Any, stage: torch.Tensor, skip: int) -> None:
        if skip >= u.blocks:
            return
        if self._strided is not None:
            ids = idx[u.chunk]
            if skip or u.blocks < ids.shape[0]:
                ids = ids[skip:u.blocks]
            src = self._strided_stage(u, stage)
            self._strided.scatter(u.l0, u.l1, ids, src[:, :, skip:] if skip else src)
            return
        if self._rows is not None:
            rows = self._rows.unit_rows(idx, u.chunk, u.l0, u.l1, u.blocks, skip)
            self._rows.wide_rows.index_copy_(0, rows, self._stage_rows(u, stage, skip))
            return
        src = self._unit_view(u, stage)
        if skip:
            src = src[:, :, skip:]
        ids = idx[u.chunk][skip:u.blocks]
        for layer, s in zip(range(u.l0, u.l1), src.unbind(0), strict=True):
            self._views_t[layer].index_copy_(1, ids, s)

    @staticmethod
    def _mark_layers(batch: list[_Unit], remaining: list[int], events: list[Any], event: Any) -> None:
        for u in batch:
            for layer in range(u.l0, u.l1):
                remaining[layer] -= 1
                if remaining[layer] == 0:
                    events[layer] = event


class _LoadJob:
    """Enqueues one load's batches: all at once, or layer-wise a layer group ahead of the reader."""

    def __init__(self, te: TransferEngine, batches: list[list[_Unit]], blocks: list[list[int]],
                 skips: list[int], src: Sequence[torch.Tensor], handle: TransferHandle,
                 layerwise: bool) -> None:
        self.te, self.d, self.skips, self.src, self.handle = te, te._load, skips, src, handle
        self.batches = deque(batches)
        num_layers = te.layout.num_layers
        self.pending = _units_per_layer(batches, num_layers)
        self.layerwise = layerwise
        self.lookahead = (batches[0][0].l1 - batches[0][0].l0) if batches else 1
        self.lock = threading.Lock()
        self.finished = False
        self.in_use = self.d.streams.record_current()  # the caller's stream may still read the blocks
        handle.other_events = [self.in_use]
        handle.home = self.d.streams
        self.blocks = blocks
        self.idx: Any = None
        handle.layer_events = [None] * num_layers if layerwise else []
        handle.keepalive = [list(src)]
        if layerwise:
            handle.advance = self.advance

    def indices(self) -> Any:
        """The load's device indices, made once on the direction's kernel stream (under ``d.lock``)."""
        if self.idx is None:
            self.idx = self.te._index_tensors(self.blocks, self.d, self.handle)
            self.handle.keepalive.append(self.idx)
        return self.idx

    def advance(self, layer: int | None) -> None:
        """Enqueue batches until every unit of layers ``<= layer + lookahead`` is queued (None: all)."""
        with self.lock:
            limit = None if layer is None else min(layer + self.lookahead, len(self.pending) - 1)
            while self.batches and (limit is None or any(self.pending[: limit + 1])):
                batch = self.batches.popleft()
                with self.d.lock:
                    event = self.te._load_batch(batch, self)
                    self.handle.other_events.append(event)
                    self.in_use = None  # later batches follow the first in stream order
                for u in batch:
                    for lyr in range(u.l0, u.l1):
                        self.pending[lyr] -= 1
                        if self.layerwise and self.pending[lyr] == 0:
                            self.handle.layer_events[lyr] = event
            if not self.batches and not self.finished:
                self.finished = True
                self.handle.done_event = self.d.streams.record(self.d.streams.second, self.d.free_events)
                self.handle.advance = None


def _strided_pays(plan: StridedPlan, layout: KVLayout, chunk_tokens: int, half: int) -> bool:
    """Whether "auto" takes the strided plan over the row plan (measured on an H100, see
    docs/benchmarks/transfer.md): only for one group of evenly spaced layers (each further
    group splits every chunk's copy in more, smaller units: MLA saves and loads of 32K tokens
    fell from 0.95-0.96 to 0.90-0.92 of raw with 6 groups), with tokens outside heads in memory
    (an HND view makes the kernel transpose: the vLLM worker's HND saves fell to 0.67), and
    few chunks per staging half (one kernel per chunk against the row plan's one per batch).
    Not for layers at falling addresses either (separate ``cudaMalloc`` calls, vLLM < 0.30): on
    the same memory the row plan measured level with the falling run (engine saves / loads of 8K
    MLA tokens on three VMs, rows against strided: 0.934 / 0.956 and 0.926 / 0.945, 0.941 / 0.962
    and 0.930 / 0.962, 0.931 / 0.953 and 0.939 / 0.964; ``tests/gpu/falling_ab.py``), so every
    irregular placement of per-layer tensors gets one plan, whatever runs the allocator made.
    """
    if (len(plan.runs) != 1 or plan.runs[0].reversed
            or layout.chunk_bytes(chunk_tokens) * _STRIDED_MAX_CHUNKS_PER_BATCH < half):
        return False
    view = plan.runs[0].view  # [L, K, B, N, H, D']
    n, h = view.shape[3], view.shape[4]
    return n == 1 or h == 1 or view.stride(3) == h * view.stride(4)


def _block_id(value: Any, what: str, chunk: int) -> int:
    """An integer block id (numpy and tensor integers too); bools and floats are refused."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise LayoutError(f"{what}: chunk {chunk} block ids must be integers, got {value!r} "
                          f"({type(value).__name__}); pass integer block indices") from None


def _payload_range(buf: torch.Tensor, u: _Unit) -> torch.Tensor:
    """The unit's bytes of a chunk buffer (the buffer itself when the unit is all of it)."""
    if u.payload_offset == 0 and u.nbytes == buf.numel():
        return buf
    return buf[u.payload_offset:u.payload_offset + u.nbytes]


def _last(remaining: list[int], chunk: int) -> bool:
    """Count one unit of ``chunk`` as enqueued; True when it was the chunk's last."""
    remaining[chunk] -= 1
    return remaining[chunk] == 0


def _pack(units: list[_Unit], capacity: int) -> list[list[_Unit]]:
    """Greedy in-order packing of units into batches of at most ``capacity`` bytes."""
    batches: list[list[_Unit]] = []
    current: list[_Unit] = []
    used = 0
    for u in units:
        if current and used + u.nbytes > capacity:
            batches.append(current)
            current, used = [], 0
        current.append(_Unit(u.chunk, u.l0, u.l1, u.blocks, u.payload_offset, u.nbytes, used))
        used += u.nbytes
    if current:
        batches.append(current)
    return batches


def _split_skip(blocks: list[list[int]], skip_blocks: int) -> list[int]:
    """Blocks to skip at the start of each chunk, from a count over all chunks."""
    if skip_blocks < 0:
        raise LayoutError(f"skip_blocks={skip_blocks} must be >= 0")
    skips = []
    for ids in blocks:
        take = min(skip_blocks, len(ids))
        skips.append(take)
        skip_blocks -= take
    return skips


def _units_per_layer(batches: list[list[_Unit]], num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for batch in batches:
        for u in batch:
            for layer in range(u.l0, u.l1):
                counts[layer] += 1
    return counts
