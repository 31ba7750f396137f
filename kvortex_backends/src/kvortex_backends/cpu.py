"""``cpu``: the pinned host-memory tier as a storage backend.

Inside an engine the first tier is always ``cpu`` and the TierManager uses its
:class:`~kvortex_core.data.pool.PinnedPool` directly (one slot per chunk, zero copy: the GPU
DMA lands in the slot, the slot is written to lower tiers as it is). This class is the same
tier behind the plain :class:`StorageBackend` API, for standalone use, tools and the conformance
suite: ``put`` copies a value into pool slots, ``get`` copies it out. A value larger than one
slot spans several (they need not be adjacent), so any size up to the capacity fits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
from pydantic import ByteSize, Field

from kvortex_core.errors import BackendError, BackendFullError, BufferTooSmallError
from kvortex_core.storage.protocol import BackendContext, BackendOptions, StorageBackend, Usage


class CpuOptions(BackendOptions):
    """Options of the ``cpu`` tier (YAML keys under ``tiers.<name>``)."""

    pin: bool | None = Field(
        None, description="page-lock the pool (None: when CUDA is available; False: plain memory)"
    )
    slot_bytes: ByteSize = Field(
        ByteSize(64 * 1024),
        description="slot size for standalone use; inside an engine a slot is one chunk payload",
    )


class CpuBackend(StorageBackend):
    """Values copied into slots of one pinned pool allocated at ``open()``."""

    Options = CpuOptions
    shared = False

    def __init__(self, options: CpuOptions, *, capacity: int, context: BackendContext) -> None:
        super().__init__(options, capacity=capacity, context=context)
        self.options: CpuOptions = options
        self._pool = None
        self._values: dict[str, tuple[list[int], int]] = {}  # key -> (slots, length)
        self._used = 0
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        from kvortex_core.data.pool import PinnedPool

        slot = min(int(self.options.slot_bytes), self.capacity)
        self._pool = PinnedPool(slot, self.capacity, pin=self.options.pin)

    def _slot_array(self, slot: int) -> np.ndarray:
        return self._require_pool().view(slot).numpy()

    def _require_pool(self):  # type: ignore[no-untyped-def]
        if self._pool is None:
            raise BackendError("cpu tier is not open (or already closed); call open() first")
        return self._pool

    async def put(self, key: str, data: memoryview | bytes | bytearray) -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        pool = self._require_pool()
        need = max(1, -(-len(src) // pool.slot_bytes))
        async with self._lock:
            slots = pool.allocate_many(need)
            if slots is None:
                raise BackendFullError(
                    f"cpu tier full: {key} needs {len(src)} bytes ({need} slots of "
                    f"{pool.slot_bytes}); raise the tier capacity"
                )
            for i, slot in enumerate(slots):
                piece = src[i * pool.slot_bytes : (i + 1) * pool.slot_bytes]
                self._slot_array(slot)[: len(piece)] = piece
            self._drop(key)
            self._values[key] = (slots, len(src))
            self._used += len(src)

    async def get(self, key: str, out: memoryview) -> int | None:
        found = self._values.get(key)
        if found is None:
            return None
        slots, length = found
        if len(out) < length:
            raise BufferTooSmallError(
                f"cpu value {key} is {length} bytes, the buffer only {len(out)}"
            )
        dst = np.frombuffer(out, dtype=np.uint8)
        step = self._require_pool().slot_bytes
        for i, slot in enumerate(slots):
            n = min(step, length - i * step)
            dst[i * step : i * step + n] = self._slot_array(slot)[:n]
        return length

    def _drop(self, key: str) -> bool:
        found = self._values.pop(key, None)
        if found is None:
            return False
        for slot in found[0]:
            self._require_pool().free(slot)
        self._used -= found[1]
        return True

    async def contains(self, keys: Sequence[str]) -> list[bool]:
        return [k in self._values for k in keys]

    async def delete(self, keys: Sequence[str]) -> int:
        async with self._lock:
            return sum(self._drop(k) for k in keys)

    async def usage(self) -> Usage:
        return Usage(capacity=self.capacity, used=self._used, items=len(self._values))

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.free_many(s for slots, _ in self._values.values() for s in slots)
            self._values.clear()
            self._used = 0
            self._pool.close()
            self._pool = None
