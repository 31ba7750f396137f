"""The backend conformance suite: subclass ``BackendConformance`` and provide one fixture.

Example (in a plugin's own tests)::

    import pytest
    from kvortex_core.testing import BackendConformance
    from my_backend import MyBackend

    class TestMyBackend(BackendConformance):
        @pytest.fixture
        def backend_factory(self, tmp_path):
            def make(capacity: int):
                return MyBackend(MyBackend.Options(), capacity=capacity, context=BackendContext())
            return make

Each test builds a backend through the factory, ``open()``s it, runs one scenario on a fresh
event loop and ``close()``s it. Pytest is the only requirement (no pytest-asyncio).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kvortex_core.errors import BackendFullError, BufferTooSmallError
from kvortex_core.storage.protocol import StorageBackend
from kvortex_core.testing.scenario import run_scenario

Factory = Callable[[int], StorageBackend]
MiB = 1024 * 1024


def _payload(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


def _key(i: int, tag: str = "k") -> str:
    return hashlib.sha256(f"{tag}:{i}".encode()).hexdigest()[:40]


class BackendConformance:
    """Behaviour every storage backend must have. Override the fixture ``backend_factory``."""

    #: Capacity used by tests that do not probe limits.
    roomy_capacity: int = 256 * MiB
    #: Value sizes for round trips (odd sizes catch alignment bugs).
    sizes: tuple[int, ...] = (1, 4096, 65537, 1 * MiB + 3)

    @pytest.fixture
    def backend_factory(self) -> Factory:  # pragma: no cover - must be overridden
        raise NotImplementedError("override the backend_factory fixture: capacity -> backend")

    def run(
        self,
        factory: Factory,
        scenario: Callable[[StorageBackend], Awaitable[Any]],
        capacity: int | None = None,
    ) -> Any:
        return run_scenario(factory(capacity or self.roomy_capacity), scenario)

    def test_round_trip_bytes_equal(self, backend_factory: Factory) -> None:
        rng = random.Random(1)

        async def scenario(b: StorageBackend) -> None:
            values = {_key(i, "rt"): _payload(rng, s) for i, s in enumerate(self.sizes)}
            for k, v in values.items():
                await b.put(k, memoryview(v))
            for k, v in values.items():
                out = bytearray(len(v) + 17)
                n = await b.get(k, memoryview(out))
                assert n == len(v), f"get({k}) returned length {n}, stored {len(v)}"
                assert bytes(out[:n]) == v, f"bytes of {k} differ after the round trip"

        self.run(backend_factory, scenario)

    def test_missing_key_is_none(self, backend_factory: Factory) -> None:
        async def scenario(b: StorageBackend) -> None:
            assert await b.get(_key(0, "absent"), memoryview(bytearray(16))) is None
            assert await b.contains([_key(1, "absent")]) == [False]
            assert await b.delete([_key(2, "absent")]) == 0

        self.run(backend_factory, scenario)

    def test_batch_contains_in_order(self, backend_factory: Factory) -> None:
        async def scenario(b: StorageBackend) -> None:
            present = [_key(i, "bc") for i in range(0, 20, 2)]
            for k in present:
                await b.put(k, b"x" * 100)
            asked = [_key(i, "bc") for i in range(20)] + [present[0]]
            got = await b.contains(asked)
            assert got == [i % 2 == 0 for i in range(20)] + [True]
            assert await b.contains([]) == []

        self.run(backend_factory, scenario)

    def test_delete_removes_only_named_keys(self, backend_factory: Factory) -> None:
        async def scenario(b: StorageBackend) -> None:
            keys = [_key(i, "del") for i in range(6)]
            for k in keys:
                await b.put(k, os.urandom(1000))
            assert await b.delete(keys[:3] + [_key(99, "del")]) == 3
            assert await b.contains(keys) == [False] * 3 + [True] * 3
            for k in keys[:3]:
                assert await b.get(k, memoryview(bytearray(1000))) is None
            assert (await b.usage()).items == 3

        self.run(backend_factory, scenario)

    def test_overwrite_replaces_value(self, backend_factory: Factory) -> None:
        async def scenario(b: StorageBackend) -> None:
            k = _key(0, "ow")
            await b.put(k, b"a" * 5000)
            await b.put(k, b"b" * 300)
            out = bytearray(5000)
            n = await b.get(k, memoryview(out))
            assert n == 300 and bytes(out[:300]) == b"b" * 300
            usage = await b.usage()
            assert usage.items == 1
            assert usage.used < 5000 + 300, "overwrite must not double-count the old value"

        self.run(backend_factory, scenario)

    def test_caller_may_reuse_buffer_after_put(self, backend_factory: Factory) -> None:
        async def scenario(b: StorageBackend) -> None:
            buf = bytearray(b"\x11" * 4096)
            await b.put(_key(0, "reuse"), memoryview(buf))
            buf[:] = b"\x22" * 4096
            out = bytearray(4096)
            await b.get(_key(0, "reuse"), memoryview(out))
            assert bytes(out) == b"\x11" * 4096

        self.run(backend_factory, scenario)

    def test_buffer_too_small_raises(self, backend_factory: Factory) -> None:
        async def scenario(b: StorageBackend) -> None:
            await b.put(_key(0, "small"), b"z" * 1000)
            with pytest.raises(BufferTooSmallError):
                await b.get(_key(0, "small"), memoryview(bytearray(10)))
            out = bytearray(1000)
            assert await b.get(_key(0, "small"), memoryview(out)) == 1000

        self.run(backend_factory, scenario)

    def test_capacity_limit_refuses_and_keeps_data(self, backend_factory: Factory) -> None:
        capacity = 64 * 1024
        rng = random.Random(7)

        async def scenario(b: StorageBackend) -> None:
            stored: dict[str, bytes] = {}
            with pytest.raises(BackendFullError):
                for i in range(100):
                    v = _payload(rng, 10_000)
                    await b.put(_key(i, "cap"), v)
                    stored[_key(i, "cap")] = v
            usage = await b.usage()
            assert usage.capacity == capacity
            assert usage.used <= capacity
            assert 0 < len(stored) <= capacity // 10_000
            for k, v in stored.items():
                out = bytearray(len(v))
                assert await b.get(k, memoryview(out)) == len(v) and bytes(out) == v
            await b.delete([next(iter(stored))])
            await b.put(_key(1000, "cap"), _payload(rng, 10_000))  # room again

        self.run(backend_factory, scenario, capacity=capacity)

    def test_concurrent_puts_and_gets(self, backend_factory: Factory) -> None:
        rng = random.Random(3)
        values = {_key(i, "cc"): _payload(rng, 20_000 + i) for i in range(48)}

        async def scenario(b: StorageBackend) -> None:
            await asyncio.gather(*(b.put(k, v) for k, v in values.items()))

            async def check(k: str, v: bytes) -> bool:
                out = bytearray(len(v))
                n = await b.get(k, memoryview(out))
                return n == len(v) and bytes(out) == v

            assert all(await asyncio.gather(*(check(k, v) for k, v in values.items())))
            assert (await b.usage()).items == len(values)

        self.run(backend_factory, scenario)

    def test_health_and_close(self, backend_factory: Factory) -> None:
        async def main() -> None:
            b = backend_factory(self.roomy_capacity)
            await b.open()
            assert (await b.health()).ok
            await b.put(_key(0, "hc"), b"data")
            await b.close()

        asyncio.run(main())
