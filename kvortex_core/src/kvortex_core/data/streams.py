"""Stream and event plumbing for the transfer engine, with a synchronous CPU twin.

On CUDA every operation is enqueued on a side stream and ordered with events; on the
CPU the same calls run inline and events are ``None`` (already complete). The transfer
engine is written once against this small surface, so every path runs in CPU tests.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch

from kvortex_core.errors import KVortexError


class TransferTimeoutError(KVortexError, TimeoutError):
    """A transfer did not complete within the requested timeout."""


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

    @contextlib.contextmanager
    def on(self, stream: Any) -> Iterator[None]:
        """Run the enclosed enqueues on ``stream`` (inline on CPU)."""
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            yield

    def record(self, stream: Any) -> Any:
        """An event marking the work enqueued so far on ``stream`` (None on CPU)."""
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def record_current(self) -> Any:
        """An event on the caller's current stream: the work that produced or uses the KV."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    @staticmethod
    def wait(stream: Any, event: Any) -> None:
        """Order ``stream`` after ``event`` without blocking the host."""
        if stream is not None and event is not None:
            stream.wait_event(event)


def event_done(event: Any) -> bool:
    return event is None or bool(event.query())


def event_wait(event: Any, timeout: float | None, what: str) -> None:
    """Block the host until ``event`` completes (poll when a timeout is given)."""
    if event is None:
        return
    if timeout is None:
        event.synchronize()
        return
    deadline = time.monotonic() + timeout
    delay = 5e-5
    while not event.query():
        if time.monotonic() >= deadline:
            raise TransferTimeoutError(
                f"{what} did not finish within timeout={timeout}s; raise transfer timeouts "
                "(timeouts.transfer_s) or check that the GPU is not stalled"
            )
        time.sleep(delay)
        delay = min(delay * 2, 1e-3)


def stream_wait_current(event: Any, device: torch.device) -> None:
    """Make the caller's current CUDA stream wait for ``event`` (no host block)."""
    if event is not None:
        torch.cuda.current_stream(device).wait_event(event)
