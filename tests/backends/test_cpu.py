"""The cpu backend: conformance, spanning values over slots, registration."""

from __future__ import annotations

import asyncio

import pytest

from kvortex_backends.cpu import CpuBackend
from kvortex_core.errors import BackendFullError
from kvortex_core.plugins.manager import PluginManager
from kvortex_core.storage.protocol import BackendContext
from kvortex_core.testing import BackendConformance

pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available:RuntimeWarning")


def _cpu(capacity: int, slot_bytes: int = 16 * 1024) -> CpuBackend:
    return CpuBackend(
        CpuBackend.Options(slot_bytes=slot_bytes),
        capacity=capacity,
        context=BackendContext(tier="cpu"),
    )


class TestCpuConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self):  # type: ignore[no-untyped-def]
        return _cpu


def test_values_span_slots_and_free_them() -> None:
    async def scenario() -> None:
        b = _cpu(64 * 1024, slot_bytes=4096)
        await b.open()
        big = bytes(range(256)) * 100  # 25600 bytes: 7 slots
        await b.put("aa", big)
        out = bytearray(len(big))
        assert await b.get("aa", memoryview(out)) == len(big) and bytes(out) == big
        with pytest.raises(BackendFullError):
            await b.put("bb", bytes(40_000))  # 10 slots, only 9 free
        await b.put("aa", b"small")  # overwrite frees the 7 slots
        await b.put("bb", bytes(40_000))
        assert (await b.usage()).items == 2
        await b.close()

    asyncio.run(scenario())


def test_registered_through_entry_point() -> None:
    backends = PluginManager().backends()
    assert backends["cpu"].cls is CpuBackend
    assert backends["disk"].cls.__name__ == "DiskBackend"
    assert backends["cpu"].distribution == "kvortex-backends"
