"""The conformance kit against the in-memory reference backend (and the kit's own sanity)."""

from __future__ import annotations

import asyncio

import pytest

from kvortex_core import BackendContext, BackendOptions, StorageBackend
from kvortex_core.testing import BackendConformance, MemoryBackend
from kvortex_core.testing.conformance import Factory


def make_memory(capacity: int) -> StorageBackend:
    return MemoryBackend(BackendOptions(), capacity=capacity, context=BackendContext(tier="mem"))


class TestMemoryBackend(BackendConformance):
    @pytest.fixture
    def backend_factory(self) -> Factory:
        return make_memory


class LosesOverwrites(MemoryBackend):
    """A broken backend: the first value of a key wins."""

    async def put(self, key: str, data: memoryview | bytes | bytearray) -> None:
        if key not in self._data:
            await super().put(key, data)


def test_kit_catches_a_broken_backend() -> None:
    """The suite is only useful if it fails on wrong behaviour."""
    kit = BackendConformance()

    def factory(capacity: int) -> StorageBackend:
        return LosesOverwrites(BackendOptions(), capacity=capacity, context=BackendContext())

    with pytest.raises(AssertionError):
        kit.test_overwrite_replaces_value(factory)


def test_memory_scan_lists_keys_and_sizes() -> None:
    async def main() -> list[tuple[str, int]] | None:
        backend = make_memory(1 << 20)
        await backend.open()
        await backend.put("aa", b"x" * 10)
        await backend.put("bb", b"y" * 3)
        listing = await backend.scan()
        await backend.close()
        return listing

    assert sorted(asyncio.run(main()) or []) == [("aa", 10), ("bb", 3)]
