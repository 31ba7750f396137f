"""Stream and event plumbing for the transfer engine, with a synchronous CPU twin.

On CUDA every operation is enqueued on a side stream and ordered with events; on the
CPU the same calls run inline and events are ``None`` (already complete). The transfer
engine is written once against this small surface, so every path runs in CPU tests.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from kvortex_core.errors import KVortexError


class TransferTimeoutError(KVortexError, TimeoutError):
    """A transfer did not complete within the requested timeout."""


#: The primitives behind ``torch.cuda.stream()`` (absent on builds without CUDA).
_GET_STREAM = getattr(torch._C, "_cuda_getCurrentStream", None)
_SET_STREAM = getattr(torch._C, "_cuda_setStream", None)

#: Spare events kept per stream set (more are dropped; a call uses one per staging batch).
_MAX_SPARE_EVENTS = 512

#: Completed transfers whose buffers are kept for a later free (see StreamSet.defer).
_MAX_DEFERRED = 8


class StreamSet:
    """The streams of one direction: ``first`` (gather or DMA-in) and ``second`` (DMA-out or scatter).

    With ``num_streams == 1`` both names are the same stream (no overlap inside a direction).
    """

    def __init__(self, device: torch.device, num_streams: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            # High priority: the small gather/scatter kernels are scheduled ahead of queued model
            # kernels, so a long matmul never stalls the DMA pipeline (copies use no SMs anyway).
            prio = torch.cuda.Stream.priority_range()[1]
            self.first: Any = torch.cuda.Stream(device=device, priority=prio)
            self.second: Any = (torch.cuda.Stream(device=device, priority=prio) if num_streams > 1
                                else self.first)
        else:
            self.first = self.second = None
        self._handoff: Any = None
        self._spare: deque[Any] = deque()  # completed events, for reuse (thread-safe ends)
        self._deferred: deque[Any] = deque()  # buffers of completed transfers, freed later

    @contextlib.contextmanager
    def on(self, stream: Any) -> Iterator[None]:
        """Run the enclosed enqueues on ``stream`` (inline on CPU).

        Switches with torch's own stream getter/setter when present: ``torch.cuda.stream()``
        costs ~15 us a use (device checks), paid twice per batch on the hot path.
        """
        if stream is None:
            yield
            return
        if _GET_STREAM is None or _SET_STREAM is None:  # pragma: no cover - other torch builds
            with torch.cuda.stream(stream):
                yield
            return
        prev = _GET_STREAM(stream.device_index)
        _SET_STREAM(stream.stream_id, stream.device_index, stream.device_type)
        try:
            yield
        finally:
            _SET_STREAM(*prev)

    def record(self, stream: Any, busy: Sequence[Any] = ()) -> Any:
        """An event marking the work enqueued so far on ``stream`` (None on CPU).

        A recycled event when one is spare (see :meth:`recycle`), never one of ``busy``
        (events the caller may still wait on): creating and later destroying an event per
        batch cost ~5-10 us of host time each, paid as a call returns.
        """
        if stream is None:
            return None
        event = self._take(busy)
        event.record(stream)
        return event

    def record_current(self) -> Any:
        """An event on the caller's current stream: the work that produced or uses the KV."""
        if not self.cuda:
            return None
        event = self._take(())
        event.record(current_stream(self.device))
        return event

    def recycle(self, events: Iterable[Any]) -> None:
        """Take back events whose records all completed and that nobody will wait on again.

        Re-recording such an event is safe: every wait enqueued earlier kept the record it saw.
        """
        spare = self._spare
        if len(spare) < _MAX_SPARE_EVENTS:
            spare.extend(e for e in events if e is not None)

    def defer(self, garbage: Any) -> None:
        """Keep ``garbage`` (a completed transfer's buffers) until :meth:`drop_deferred`.

        Freeing a transfer's row-index tensor and buffer views costs ~50 us of host time;
        deferred, it is paid while a later transfer waits for its copies instead of on the
        return path of the call that just finished.
        """
        deferred = self._deferred
        deferred.append(garbage)
        while len(deferred) > _MAX_DEFERRED:  # handles polled with done(), never waited: bounded
            try:
                deferred.popleft()
            except IndexError:
                break

    def drop_deferred(self) -> None:
        """Free what :meth:`defer` kept (called while waiting, and on close)."""
        deferred = self._deferred
        while deferred:
            try:
                deferred.popleft()
            except IndexError:  # emptied by another thread meanwhile
                break

    def _take(self, busy: Sequence[Any]) -> Any:
        spare = self._spare
        for _ in range(min(len(spare), 4)):
            try:
                event = spare.popleft()
            except IndexError:  # taken by another thread meanwhile
                break
            if all(event is not b for b in busy):
                return event
            spare.append(event)  # still waited on: later
        return torch.cuda.Event()

    def hand_over(self, src: Any, dst: Any) -> None:
        """Order ``dst`` after the work enqueued so far on ``src`` (no host block).

        One event per direction, re-recorded each time: a wait already enqueued keeps the
        record it saw, so reuse is safe and saves creating an event per batch.
        """
        if src is None or src is dst:
            return
        if self._handoff is None:
            self._handoff = torch.cuda.Event()
        self._handoff.record(src)
        dst.wait_event(self._handoff)

    @staticmethod
    def wait(stream: Any, event: Any) -> None:
        """Order ``stream`` after ``event`` without blocking the host."""
        if stream is not None and event is not None:
            stream.wait_event(event)


def event_done(event: Any) -> bool:
    return event is None or bool(event.query())


def event_wait(event: Any, timeout: float | None, what: str) -> None:
    """Block the host until ``event`` completes, or raise TransferTimeoutError after ``timeout`` s.

    Without a timeout the caller blocks in the driver (``synchronize``, GIL released). With a
    timeout the driver wait runs on a waiter thread and the caller waits on it with that
    timeout, so a stalled GPU raises here instead of hanging the caller; the hand-off from the
    waiter thread costs its caller 61 / 118 us (median / p90) after the event on an H100 VM
    (``tests/gpu/wake_probe.py``), which is why :func:`event_finish` exists.
    """
    if event is None or event.query():
        return
    if timeout is None:
        event.synchronize()
        return
    if not _WAITER.wait(event, timeout):
        raise TransferTimeoutError(
            f"{what} did not finish within timeout={timeout}s; raise transfer timeouts "
            "(timeouts.transfer_s) or check that the GPU is not stalled"
        )


def event_finish(event: Any) -> None:
    """Block in the driver until ``event`` completes: for the last stretch of a transfer only.

    ``synchronize`` releases the GIL and returns soonest after the event of the waits measured
    (``tests/gpu/wake_probe.py``, H100 VM, after a ~300 us kernel; median / p90): 23 / 87 us,
    against 61 / 118 us through the waiter thread of :func:`event_wait` (a thread hand-off) and
    46 / 96 us for a poll with ``time.sleep(0)`` (the kernel's timer slack). A poll without
    sleeping (27 / 69 us) would hold the GIL and starve every other thread of the process while
    it spins.

    There is no timeout: callers first wait with their timeout for everything the rest
    depends on (see ``TransferHandle.wait``), so what is left is ~0.3-0.7 ms of the transfer's
    own enqueued copies and kernels, which wait on nothing outside it.
    """
    if event is not None and not event.query():
        event.synchronize()


class _EventWaiter:
    """Daemon threads that block in ``event.synchronize()`` on behalf of callers with a timeout.

    Daemons: a thread stuck on a hung device never blocks interpreter exit. Threads are
    added on demand (one per concurrent waiter, up to ``max_threads``); beyond that the
    caller polls, so waits never queue behind a stuck one.
    """

    def __init__(self, max_threads: int = 8) -> None:
        self._jobs: queue.SimpleQueue[tuple[Any, threading.Event, list[BaseException]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._max = max_threads

    def wait(self, event: Any, timeout: float) -> bool:
        """True once ``event`` completed, False after ``timeout`` s; re-raises a device error."""
        done, error = threading.Event(), []
        with self._lock:
            if self._idle == 0:
                if self._threads >= self._max:
                    return _poll(event, timeout)
                self._threads += 1
                threading.Thread(target=self._run, name="kvortex-event-wait", daemon=True).start()
            else:
                self._idle -= 1
        self._jobs.put((event, done, error))
        finished = done.wait(timeout)
        if error:
            raise error[0]
        return finished

    def _run(self) -> None:
        while True:
            event, done, error = self._jobs.get()
            try:
                event.synchronize()
            except Exception as exc:  # noqa: BLE001 - handed to the waiting caller
                error.append(exc)
            done.set()
            with self._lock:
                self._idle += 1


def _poll(event: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 2e-5
    while not event.query():
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 2e-4)
    return True


_WAITER = _EventWaiter()


def stream_wait_current(event: Any, device: torch.device) -> None:
    """Make the caller's current CUDA stream wait for ``event`` (no host block)."""
    if event is not None:
        current_stream(device).wait_event(event)


_KNOWN_STREAMS: dict[tuple[int, int, int], Any] = {}


def current_stream(device: torch.device) -> Any:
    """The caller's current CUDA stream on ``device``.

    ``torch.cuda.current_stream()`` builds a new Stream object each call (~8 us, more on a
    cold path: it runs once per transfer and per layer-wise wait); here the object of a
    stream seen before is reused, keyed by torch's own (id, device, type) triple.
    """
    if _GET_STREAM is None or device.index is None:  # pragma: no cover - other torch builds
        return torch.cuda.current_stream(device)
    key = _GET_STREAM(device.index)
    stream = _KNOWN_STREAMS.get(key)
    if stream is None:
        if len(_KNOWN_STREAMS) >= 256:  # an application that makes streams on the fly
            _KNOWN_STREAMS.clear()
        stream = _KNOWN_STREAMS[key] = torch.cuda.Stream(stream_id=key[0], device_index=key[1],
                                                         device_type=key[2])
    return stream
