"""``memory``: an in-process reference backend (a dict of bytes), registered like any plugin.

It is the smallest complete implementation of the protocol; the conformance suite runs
against it, and it is handy in tests and demos. Not meant for production (plain heap memory).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from kvortex_core.errors import BackendFullError, BufferTooSmallError
from kvortex_core.plugins.hookspecs import Register
from kvortex_core.plugins.marker import hookimpl
from kvortex_core.storage.protocol import BackendContext, BackendOptions, StorageBackend, Usage


class MemoryBackend(StorageBackend):
    """Values held in a dict; capacity enforced on the sum of value sizes."""

    def __init__(self, options: BackendOptions, *, capacity: int, context: BackendContext) -> None:
        super().__init__(options, capacity=capacity, context=context)
        self._data: dict[str, bytes] = {}
        self._used = 0
        self._lock = asyncio.Lock()

    async def put(self, key: str, data: memoryview | bytes | bytearray) -> None:
        value = bytes(data)
        async with self._lock:
            old = len(self._data.get(key, b""))
            if self._used - old + len(value) > self.capacity:
                raise BackendFullError(
                    f"memory backend full: {key!r} needs {len(value)} bytes, "
                    f"{self.capacity - self._used + old} free of {self.capacity}"
                )
            self._data[key] = value
            self._used += len(value) - old

    async def get(self, key: str, out: memoryview) -> int | None:
        value = self._data.get(key)
        if value is None:
            return None
        if len(out) < len(value):
            raise BufferTooSmallError(f"value of {key!r} is {len(value)} bytes, buffer {len(out)}")
        out[: len(value)] = value
        return len(value)

    async def contains(self, keys: Sequence[str]) -> list[bool]:
        return [k in self._data for k in keys]

    async def delete(self, keys: Sequence[str]) -> int:
        removed = 0
        async with self._lock:
            for k in keys:
                value = self._data.pop(k, None)
                if value is not None:
                    self._used -= len(value)
                    removed += 1
        return removed

    async def usage(self) -> Usage:
        return Usage(capacity=self.capacity, used=self._used, items=len(self._data))

    async def scan(self) -> list[tuple[str, int]]:
        return [(k, len(v)) for k, v in self._data.items()]

    async def close(self) -> None:
        self._data.clear()
        self._used = 0


@hookimpl
def kvortex_register_backends(register: Register) -> None:
    register("memory", MemoryBackend)
