"""The tiering event loop: one daemon thread running asyncio, plus bounded work queues.

Backend I/O (coroutines) runs here, never on the caller's thread. Callers either wait for a
result with a timeout (:meth:`LoopThread.run`) or hand work to a :class:`WorkQueue`, which
refuses (returns False) instead of blocking when it is full.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from kvortex_core.errors import KVortexError

log = logging.getLogger(__name__)
T = TypeVar("T")
Job = Callable[[], Awaitable[None]]


_live: weakref.WeakSet[LoopThread] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Stop loops whose owner never called close(), so exit is quiet (no pending-task noise)."""
    for lt in list(_live):
        try:
            lt.stop(timeout=1.0)
        except Exception:  # one loop's trouble must not keep the others running
            log.debug("tiering loop: stop at exit failed", exc_info=True)


class LoopThread:
    """An asyncio event loop on its own daemon thread."""

    def __init__(self, name: str = "kvortex-tiering") -> None:
        self.loop = asyncio.new_event_loop()
        # Long-lived tasks (work-queue workers) held here, not only by their owner: an owner
        # dropped without close() must not leave pending tasks to the garbage collector, which
        # would close their coroutines on another thread (asyncio is not thread-safe).
        self._kept: set[asyncio.Task[Any]] = set()
        self._ready = threading.Event()
        #: One stop at a time: an orphaned engine's close thread and the exit hook may race.
        self._stop_lock = threading.Lock()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        _live.add(self)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()
        # Stopped. Tasks that a timed-out stop() could not cancel (a backend blocked the loop
        # past its deadline) end here, on their own thread, instead of being destroyed pending.
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def keep(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """Hold ``task`` until it finishes (call on the loop thread); stop() cancels it."""
        self._kept.add(task)
        task.add_done_callback(self._kept.discard)
        return task

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait up to ``timeout`` s (cancelled past it).

        Raises TimeoutError past the deadline and whatever ``coro`` raised otherwise.
        """
        if self.in_loop():
            coro.close()
            raise KVortexError("LoopThread.run called from the loop thread itself (would deadlock)")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"tiering operation did not finish within {timeout:.3g}s") from None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a plain callback on the loop thread (thread-safe, never blocks)."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(fn, *args)

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel what is left, stop the loop and join the thread (within ``timeout`` in all).

        Idempotent and thread-safe: a second caller waits for the first one's stop (at most
        ``timeout``) and returns."""
        deadline = time.monotonic() + timeout
        if not self._stop_lock.acquire(timeout=max(timeout, 0.05)):
            return
        try:
            if not self.loop.is_closed():
                self._stop(deadline, timeout)
        finally:
            self._stop_lock.release()

    def _stop(self, deadline: float, timeout: float) -> None:
        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(_cancel_all(), timeout)
        except (TimeoutError, KVortexError, concurrent.futures.CancelledError):
            log.warning("tiering loop: tasks still running at stop")
        except RuntimeError:  # the loop closed meanwhile (its thread ended)
            pass
        if self.loop.is_closed():
            _live.discard(self)
            return
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # closed between the check and the call
            pass
        self._thread.join(max(deadline - time.monotonic(), 0.05))
        if not self._thread.is_alive():
            self.loop.close()
            _live.discard(self)


class WorkQueue:
    """A bounded queue of jobs run by ``workers`` tasks on a :class:`LoopThread`.

    :meth:`offer` is callable from any thread and never blocks: a full queue returns False, so
    the caller counts a skipped write instead of waiting for a slow tier.
    """

    def __init__(self, loop: LoopThread, name: str, *, maxsize: int, workers: int) -> None:
        self.name = name
        self.maxsize = maxsize
        self._loop = loop
        self._lock = threading.Lock()
        self._pending = 0
        self._queue: asyncio.Queue[Job] | None = None
        self._idle: asyncio.Event | None = None
        self._workers: list[asyncio.Task[None]] = []
        loop.run(self._start(workers), timeout=10.0)

    async def _start(self, workers: int) -> None:
        self._queue = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._workers = [self._loop.keep(asyncio.create_task(self._work())) for _ in range(workers)]

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        return self._pending

    def offer(self, job: Job) -> bool:
        """Queue ``job`` unless the queue is full; never blocks."""
        with self._lock:
            if self._pending >= self.maxsize:
                return False
            self._pending += 1
        self._loop.call_soon(self._enqueue, job)
        return True

    def _enqueue(self, job: Job) -> None:
        assert self._queue is not None and self._idle is not None
        self._idle.clear()
        self._queue.put_nowait(job)

    async def _work(self) -> None:
        assert self._queue is not None and self._idle is not None
        while True:
            job = await self._queue.get()
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:  # a job reports its own failures; never kill the worker
                log.exception("work queue %s: job failed", self.name)
            finally:
                with self._lock:
                    self._pending -= 1
                    idle = self._pending == 0
                if idle:
                    self._idle.set()

    async def drain(self) -> None:
        """Wait until every queued job has run (call on the loop, under a timeout)."""
        assert self._idle is not None
        while self._pending:
            await self._idle.wait()
            if self._pending:
                self._idle.clear()
