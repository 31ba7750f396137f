"""PinnedPool: slots, alignment, all-or-nothing allocation, double free, close, rank shares."""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

import pytest
import torch

from kvortex_core.control.stats import Stats
from kvortex_core.data import numa
from kvortex_core.data import pool as pool_mod
from kvortex_core.data.pool import PinnedPool, per_rank_capacity
from kvortex_core.errors import ConfigError, KVortexError

pytestmark = pytest.mark.filterwarnings("ignore:CUDA is not available")


def test_slots_are_aligned_and_disjoint() -> None:
    pool = PinnedPool(1000, 64 * 1024, alignment=4096)
    assert pool.slot_bytes == 4096 and pool.num_slots == 16
    slots = pool.allocate_many(16)
    assert slots is not None and sorted(slots) == list(range(16))
    for s in slots:
        assert pool.data_ptr(s) % 4096 == 0
        pool.view(s).fill_(s)
    for s in slots:  # every slot kept its own bytes: no overlap
        v = pool.view(s)
        assert v.dtype == torch.uint8 and v.numel() == 4096 and bool((v == s).all())
    assert bytes(pool.buffer(3)[:2]) == b"\x03\x03"
    pool.buffer(3)[0] = 9  # the memoryview writes through to the pool
    assert int(pool.view(3)[0]) == 9
    pool.free_many(slots)
    assert pool.close() == []


def test_default_alignment_rounds_slot_size() -> None:
    pool = PinnedPool(130, 1000)
    assert pool.slot_bytes == 256 and pool.num_slots == 3 and pool.data_ptr(0) % 128 == 0


def test_exhaustion_returns_none_and_counts() -> None:
    stats = Stats()
    pool = PinnedPool(128, 128 * 4, stats=stats)
    assert pool.allocate_many(5) is None  # all or nothing: nothing was taken
    assert pool.free_slots == 4
    got = [pool.allocate() for _ in range(4)]
    assert sorted(got) == [0, 1, 2, 3]  # type: ignore[type-var]
    assert pool.allocate() is None and pool.allocate_many(1) is None
    assert pool.allocate_many(0) == []
    st = pool.stats()
    assert (st.used_slots, st.free_slots, st.failed_allocations, st.allocations) == (4, 0, 3, 4)
    assert stats.snapshot().counter("alloc_failures", "cpu") == 3
    assert stats.snapshot().gauges["pool_used_slots"]["cpu"] == 4


def test_double_free_is_detected_and_harmless() -> None:
    pool = PinnedPool(128, 128 * 4)
    a, b = pool.allocate(), pool.allocate()
    assert a is not None and b is not None
    pool.free(a)
    with pytest.raises(KVortexError, match=rf"slot {a} is not allocated \(freed already"):
        pool.free(a)
    with pytest.raises(KVortexError, match="freed twice in one call"):
        pool.free_many([b, b])  # validated first: b stays allocated
    with pytest.raises(KVortexError, match="or never allocated"):
        pool.free(3)  # in range, never handed out: not called a double free
    assert pool.is_allocated(b)
    with pytest.raises(KVortexError, match="not in"):
        pool.free(99)
    with pytest.raises(KVortexError, match="not in"):
        pool.view(-1)
    pool.free(b)
    assert sorted(pool.allocate_many(4) or []) == [0, 1, 2, 3]  # free list intact, no duplicates


def test_high_water_and_close_reports_leaks() -> None:
    pool = PinnedPool(128, 128 * 8)
    slots = pool.allocate_many(6) or []
    pool.free_many(slots[:5])
    assert pool.stats().high_water_slots == 6 and pool.used_slots == 1
    assert pool.close() == [slots[5]]
    assert pool.allocate() is None  # closed: nothing more is handed out
    assert pool.close() == []


def test_bad_sizes() -> None:
    with pytest.raises(ConfigError, match="cannot hold one slot"):
        PinnedPool(4096, 100)
    with pytest.raises(ConfigError, match="alignment=100"):
        PinnedPool(128, 1024, alignment=100)
    with pytest.raises(ConfigError, match="slot_bytes=0"):
        PinnedPool(0, 1024)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_pageable_without_cuda_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_mod, "_warned_pageable", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not PinnedPool(128, 1024).pinned
        PinnedPool(128, 1024)
    assert len([w for w in caught if "pageable" in str(w.message)]) == 1
    with pytest.raises(ConfigError, match="pin=True needs CUDA"):
        PinnedPool(128, 1024, pin=True)


class _FakeCudart:
    """Records cudaHostRegister/Unregister calls (the pinning logic, tested without a GPU)."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        self.registered[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0


def test_registered_pool_unpins_once_on_close_or_collection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    gc.collect()  # earlier tests' pools, collected under the fake, would unregister through it
    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    pool = PinnedPool(4096, 4096 * 8, alignment=4096)
    assert pool.pinned and list(fake.registered.values()) == [4096 * 9]  # + alignment slack
    (ptr,) = fake.registered
    pool.close()
    pool.close()
    assert fake.unregistered.count(ptr) == 1
    forgotten = PinnedPool(4096, 4096 * 8)
    (ptr2,) = set(fake.registered) - {ptr}
    del forgotten  # never closed: collection must still unpin the range
    gc.collect()
    assert fake.unregistered.count(ptr) == 1 and fake.unregistered.count(ptr2) == 1


def test_per_rank_capacity() -> None:
    assert per_rank_capacity(8 << 30, 4) == 2 << 30
    assert per_rank_capacity(1000, 3, alignment=128) == 256
    with pytest.raises(ConfigError, match="ranks_per_node=0"):
        per_rank_capacity(1000, 0)
    with pytest.raises(ConfigError, match="leaves nothing"):
        per_rank_capacity(3, 4)


def test_numa_helpers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert numa.parse_cpulist("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    root = tmp_path  # a fake sysfs
    (root / "node0").mkdir()
    (root / "node1").mkdir()
    (root / "node1" / "cpulist").write_text("2-3")
    dev = root / "0000:1b:00.0"
    dev.mkdir()
    (dev / "numa_node").write_text("1\n")
    monkeypatch.setattr(numa, "_SYS_NODES", root)
    monkeypatch.setattr(numa, "_SYS_PCI", root)
    assert numa.num_nodes() == 2 and numa.node_cpus(1) == {2, 3}
    assert numa.pci_numa_node("0000:1B:00.0") == 1 and numa.pci_numa_node("0000:00:00.0") is None
    with numa.run_on_node(None) as moved:
        assert not moved
    before = os.sched_getaffinity(0)
    cpu = min(before)
    (root / "node1" / "cpulist").write_text(str(cpu))
    with numa.run_on_node(1) as moved:  # first touch would happen on node 1's CPUs
        assert moved and os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["register", "host_alloc"])
def test_pinned_pool_on_gpu(method: str) -> None:
    pool = PinnedPool(1 << 20, 16 << 20, device=0, pin_method=method)  # type: ignore[arg-type]
    assert pool.pinned and pool.view(0).is_pinned()
    slot = pool.allocate()
    assert slot is not None
    src = torch.arange(1 << 20, device="cuda").to(torch.uint8)
    pool.view(slot).copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(pool.view(slot).cuda(), src)
    pool.free(slot)
    assert pool.close() == []


@pytest.mark.parametrize("times", [3, 1 << 20, 1 << 40])
def test_a_capacity_beyond_the_machines_memory_is_a_config_error(times: int) -> None:
    """A typo such as 64TiB for 64GiB: a ConfigError naming the setting, before any allocation
    (a free list of 10^9 slots, then the OOM killer, before)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with pytest.raises(ConfigError, match=r"tiers\.cpu\.capacity: .* more than this machine's"):
        PinnedPool(1 << 20, ram * times, pin=False)


def test_a_failed_host_allocation_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The allocator refusing (overcommit limits, cgroup memory) names the setting to lower.
    Fault injected: torch.empty raising as it does when the host is out of memory."""
    real = torch.empty

    def refuse(*a: object, **k: object) -> torch.Tensor:
        if a and isinstance(a[0], int) and a[0] >= 64 << 20:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "empty", refuse)
    with pytest.raises(ConfigError, match=r"tiers\.cpu\.capacity: could not allocate \d+ bytes"):
        PinnedPool(1 << 20, 64 << 20, pin=False)
