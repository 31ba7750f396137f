"""Two backends: ``example`` (works anywhere) and ``example-remote`` (needs a missing SDK)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

from pydantic import Field

from kvortex_core import (
    BackendContext,
    BackendError,
    BackendFullError,
    BackendOptions,
    BufferTooSmallError,
    StorageBackend,
    Usage,
)


class ExampleOptions(BackendOptions):
    """Options a tier of type ``example`` accepts (anything else is a config error)."""

    max_value_bytes: int = Field(64 * 1024 * 1024, gt=0, description="largest value accepted")
    key_prefix: str = Field("", description="prepended to every key (to share one dict)")


class ExampleBackend(StorageBackend):
    """Stores each value as ``bytes`` in a dict; capacity counts the value sizes."""

    Options = ExampleOptions

    def __init__(self, options: BackendOptions, *, capacity: int, context: BackendContext) -> None:
        super().__init__(options, capacity=capacity, context=context)
        self._opts = cast(ExampleOptions, options)  # KVortex validated it with ``Options``
        self._values: dict[str, bytes] = {}
        self._used = 0
        # put checks room then inserts: a lock keeps concurrent puts from both taking the room
        self._lock = asyncio.Lock()

    def _k(self, key: str) -> str:
        return self._opts.key_prefix + key

    async def put(self, key: str, data: memoryview | bytes | bytearray) -> None:
        value = bytes(data)  # a copy: the caller may reuse its buffer as soon as we return
        if len(value) > self._opts.max_value_bytes:
            raise BackendError(
                f"value of {len(value)} bytes exceeds max_value_bytes "
                f"{self._opts.max_value_bytes}; raise the option"
            )
        async with self._lock:
            old = len(self._values.get(self._k(key), b""))
            if self._used - old + len(value) > self.capacity:
                raise BackendFullError(
                    f"example backend full: {len(value)} bytes do not fit "
                    f"in {self.capacity - self._used + old} free"
                )
            self._values[self._k(key)] = value
            self._used += len(value) - old

    async def get(self, key: str, out: memoryview) -> int | None:
        value = self._values.get(self._k(key))
        if value is None:
            return None
        if len(out) < len(value):
            raise BufferTooSmallError(f"{key}: value is {len(value)} bytes, buffer {len(out)}")
        out[: len(value)] = value
        return len(value)

    async def contains(self, keys: Sequence[str]) -> list[bool]:
        return [self._k(k) in self._values for k in keys]

    async def delete(self, keys: Sequence[str]) -> int:
        removed = 0
        async with self._lock:
            for k in keys:
                value = self._values.pop(self._k(k), None)
                if value is not None:
                    self._used -= len(value)
                    removed += 1
        return removed

    async def usage(self) -> Usage:
        return Usage(capacity=self.capacity, used=self._used, items=len(self._values))

    async def close(self) -> None:
        self._values.clear()
        self._used = 0


class ExampleRemoteBackend(ExampleBackend):
    """Pretends to need an SDK: KVortex refuses to configure it until the SDK is installed."""

    requires = ("kvortex_example_missing_sdk",)
    install_hint = 'pip install "kvortex-example-backend[remote]"'
    shared = True
