"""Coalesce concurrent ``GET``s of one event-loop turn into one pipeline (one round trip).

The engine loads a prefix as many concurrent ``get`` calls. Measured on one server
(docs/benchmarks/backends.md), N GETs in one pipeline on one connection read 15-20% faster
than N GETs on N pooled connections, so gets issued in the same loop turn share one
pipeline. Puts are not coalesced: separate connections were faster for writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class GetBatcher:
    """``await batcher.get(name)`` -> the value (bytes) or None; errors reach every waiter."""

    def __init__(self, client: Callable[[], Any], max_batch: int) -> None:
        self._client = client
        self._max_batch = max_batch
        self._pending: list[tuple[str, asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, name: str) -> bytes | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after every get of this loop turn has queued
        self._pending.append((name, future))
        if len(self._pending) >= self._max_batch:
            self._flush()
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)  # the loop only keeps weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[str, asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:  # alone in its loop turn: a plain GET, no pipeline to build
                values = [await self._client().get(batch[0][0])]
            else:
                pipe = self._client().pipeline(transaction=False)
                for name, _ in batch:
                    pipe.get(name)
                values = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # handed to every waiter (a cancel is re-raised)
            for _, future in batch:
                if not future.done():  # a waiter may have been cancelled by its timeout
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, future), value in zip(batch, values, strict=True):
            if future.done():
                continue
            if isinstance(value, Exception):
                future.set_exception(value)
            else:
                future.set_result(value)

    async def close(self) -> None:
        """Wait for in-flight batches (their waiters get results or errors)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
