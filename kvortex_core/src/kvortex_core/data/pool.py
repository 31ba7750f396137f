"""The pinned host pool: one allocation made once, carved into fixed-size slots.

Pinning 1 GiB takes ~0.6 s, so the pool is allocated once at start and never grows. Slots have
one size (a chunk payload rounded up to ``alignment``), so allocate/free are O(1) pops and
pushes on a free stack and there is no fragmentation. Running out returns None (the caller
skips caching that chunk); it never raises into the inference engine. A double free raises
:class:`KVortexError` and leaves the free list untouched.

Pinning: with CUDA the buffer is page-locked (``cudaHostRegister`` of one pageable buffer by
default: it keeps the exact size, whereas ``torch.empty(pin_memory=True)`` goes through the
caching host allocator, which rounds up to a power of two, and it lets the pages be placed on
the GPU's NUMA node first). Without CUDA the pool is pageable and says so once.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from kvortex_core.data import numa
from kvortex_core.errors import ConfigError, KVortexError

if TYPE_CHECKING:
    import torch

    from kvortex_core.control.stats import Stats

log = logging.getLogger(__name__)

PinMethod = Literal["register", "host_alloc"]
_warned_pageable = False


def per_rank_capacity(node_capacity: int, ranks_per_node: int, alignment: int = 1) -> int:
    """One rank's share of a per-node byte capacity (rounded down to ``alignment``).

    Capacity is configured per node: 8 GiB with 4 ranks gives each rank 2 GiB, not 8 GiB each.
    """
    if ranks_per_node < 1:
        raise ConfigError(f"ranks_per_node={ranks_per_node} must be >= 1 (GPUs sharing this node)")
    share = node_capacity // ranks_per_node
    share -= share % max(alignment, 1)
    if share <= 0:
        raise ConfigError(
            f"node capacity {node_capacity} bytes split over {ranks_per_node} ranks leaves nothing "
            "per rank; raise the cpu tier capacity"
        )
    return share


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of pool usage."""

    num_slots: int
    slot_bytes: int
    used_slots: int
    high_water_slots: int
    allocations: int
    failed_allocations: int
    pinned: bool
    numa_node: int | None

    @property
    def free_slots(self) -> int:
        return self.num_slots - self.used_slots

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "free_slots": self.free_slots}


def physical_memory() -> int:
    """Bytes of memory of this machine (0 where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 0


def _round_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


class PinnedPool:
    """Fixed-size slots carved out of one (pinned when possible) host buffer."""

    def __init__(
        self,
        slot_bytes: int,
        capacity_bytes: int,
        *,
        pin: bool | None = None,
        alignment: int = 128,
        device: int | None = None,
        pin_method: PinMethod = "register",
        stats: Stats | None = None,
        name: str = "cpu",
    ) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ConfigError(f"alignment={alignment} must be a power of two such as 128 or 4096")
        if slot_bytes <= 0:
            raise ConfigError(f"slot_bytes={slot_bytes} must be positive (one chunk payload)")
        self.slot_bytes = _round_up(slot_bytes, alignment)
        self.num_slots = int(capacity_bytes) // self.slot_bytes
        if self.num_slots < 1:
            raise ConfigError(
                f"pool capacity {capacity_bytes} bytes cannot hold one slot of {self.slot_bytes} "
                f"bytes; raise the cpu tier capacity or lower chunk_tokens"
            )
        ram = physical_memory()
        if ram and self.num_slots * self.slot_bytes > ram:
            raise ConfigError(
                f"tiers.{name}.capacity: this process's share is {capacity_bytes} bytes, more than this "
                f"machine's {ram} bytes of memory; lower tiers.{name}.capacity (host memory per node, "
                "divided among ranks_per_node)"
            )
        self.alignment = alignment
        self.name = name
        self._stats = stats
        self._lock = threading.Lock()
        self._free = list(range(self.num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._in_use = bytearray(self.num_slots)
        self._used = self._high_water = self._allocs = self._failed = 0
        self._unpin: weakref.finalize | None = None
        self._closed = False
        self.pinned = _want_pin(pin)
        on_gpu = device is not None and self.pinned
        self.numa_node = numa.gpu_numa_node(device) if on_gpu else None
        self._buffer, self._base = self._allocate(pin_method)
        if stats is not None:
            stats.register_gauge("pool_used_slots", lambda: self._used, name)
            stats.register_gauge("pool_slots", lambda: self.num_slots, name)

    # -- allocation of the one buffer -----------------------------------------------------
    def _allocate(self, method: PinMethod) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        with torch.inference_mode(False):  # slots are written by threads in and out of inference mode
            return self._allocate_buffer(method)

    def _allocate_buffer(self, method: PinMethod) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        total = self.num_slots * self.slot_bytes
        try:
            if self.pinned and method == "host_alloc":
                # cudaHostAlloc memory is page-aligned: no slack, or a 2^k pool would pin 2^(k+1)
                buf = torch.empty(total if self.alignment <= 4096 else total + self.alignment,
                                  dtype=torch.uint8, pin_memory=True)
            else:
                buf = torch.empty(total + self.alignment, dtype=torch.uint8)
        except (RuntimeError, MemoryError) as exc:
            raise ConfigError(
                f"tiers.{self.name}.capacity: could not allocate {total} bytes of host memory for the "
                f"{self.name} tier ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else 'out of memory'}); "
                f"lower tiers.{self.name}.capacity"
            ) from None
        offset = (-buf.data_ptr()) % self.alignment
        base = buf[offset : offset + total]
        if self.pinned and method == "register":
            self._register(buf)
        return buf, base

    def _register(self, buf: torch.Tensor) -> None:
        import torch

        ptr, size = buf.data_ptr(), buf.numel()
        bound = self.numa_node is not None and numa.bind_memory(ptr, size, self.numa_node)
        # cudaHostRegister faults every page in: under the node's CPUs that is the first touch.
        with numa.run_on_node(None if bound else self.numa_node):
            err = torch.cuda.cudart().cudaHostRegister(ptr, size, 0)
        if int(err) != 0:
            raise KVortexError(
                f"cudaHostRegister of {size} bytes failed with CUDA error {int(err)}; "
                "lower the cpu tier capacity or check the memlock limit (ulimit -l)"
            )
        # Unregister on close() or, if the owner forgets, when the pool is collected: a range
        # left registered makes a later cudaHostRegister over the same addresses fail.
        self._unpin = weakref.finalize(self, _unregister, ptr, buf)

    # -- slots ----------------------------------------------------------------------------
    def allocate(self) -> int | None:
        """One free slot, or None when the pool is exhausted (counted, never raised)."""
        with self._lock:
            if not self._free or self._closed:
                self._failed += 1
                slot = None
            else:
                slot = self._free.pop()
                self._in_use[slot] = 1
                self._note_alloc(1)
        if slot is None:
            self._count_failure()
        return slot

    def allocate_many(self, n: int) -> list[int] | None:
        """``n`` slots or None (all or nothing)."""
        if n <= 0:
            return []
        with self._lock:
            if len(self._free) < n or self._closed:
                self._failed += 1
                slots = None
            else:
                slots = self._free[-n:][::-1]
                del self._free[-n:]
                for s in slots:
                    self._in_use[s] = 1
                self._note_alloc(n)
        if slots is None:
            self._count_failure()
        return slots

    def _note_alloc(self, n: int) -> None:
        self._allocs += n
        self._used += n
        self._high_water = max(self._high_water, self._used)

    def _count_failure(self) -> None:
        if self._stats is not None:
            from kvortex_core.control.stats import ALLOC_FAILURES

            self._stats.inc(ALLOC_FAILURES, 1, self.name)

    def free(self, slot: int) -> None:
        """Give ``slot`` back; freeing a slot that is not allocated raises KVortexError."""
        with self._lock:
            if not (isinstance(slot, int) and 0 <= slot < self.num_slots) or not self._in_use[slot]:
                self._check_free(slot, set())
            self._in_use[slot] = 0
            self._free.append(slot)
            self._used -= 1

    def _check_free(self, slot: Any, seen: set[int]) -> None:
        if not (isinstance(slot, int) and 0 <= slot < self.num_slots):
            raise KVortexError(f"pool {self.name!r}: slot {slot!r} is not in [0, {self.num_slots})")
        if not self._in_use[slot] or slot in seen:
            what = "is freed twice in one call" if slot in seen else "is not allocated (freed already, or never allocated)"
            raise KVortexError(f"pool {self.name!r}: slot {slot} {what}; "
                               "each allocate() must be matched by exactly one free()")

    def free_many(self, slots: Any) -> None:
        """Give several slots back; validated first, so a bad one frees none of them."""
        slots = list(slots)
        with self._lock:
            seen: set[int] = set()
            for s in slots:
                self._check_free(s, seen)
                seen.add(s)
            for s in slots:
                self._in_use[s] = 0
                self._free.append(s)
            self._used -= len(slots)

    def view(self, slot: int) -> torch.Tensor:
        """The slot's bytes as a uint8 tensor of ``slot_bytes`` (shares the pool memory)."""
        if not 0 <= slot < self.num_slots:
            raise KVortexError(f"pool {self.name!r}: slot {slot} is not in [0, {self.num_slots})")
        start = slot * self.slot_bytes
        return self._base[start : start + self.slot_bytes]

    def slots_view(self) -> torch.Tensor:
        """All slots as one ``[num_slots, slot_bytes]`` uint8 tensor (shares the pool memory)."""
        return self._base.view(self.num_slots, self.slot_bytes)

    def buffer(self, slot: int) -> memoryview:
        """The slot as a writable memoryview (for file and socket I/O without a copy)."""
        return memoryview(self.view(slot).numpy()).cast("B")

    def data_ptr(self, slot: int) -> int:
        """Host address of the slot (``alignment``-aligned)."""
        return self._base.data_ptr() + slot * self.slot_bytes

    def is_allocated(self, slot: int) -> bool:
        return bool(self._in_use[slot])

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def used_slots(self) -> int:
        return self._used

    @property
    def free_slots(self) -> int:
        return self.num_slots - self._used

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(self.num_slots, self.slot_bytes, self._used, self._high_water,
                             self._allocs, self._failed, self.pinned, self.numa_node)

    def close(self) -> list[int]:
        """Stop handing out slots, unpin, and report (and return) slots still allocated."""
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            leaked = [i for i, used in enumerate(self._in_use) if used]
        if leaked:
            log.warning("pool %s: %d slot(s) still allocated at close: %s", self.name,
                        len(leaked), leaked[:16])
        if self._unpin is not None:
            self._unpin()  # runs at most once
        if self._stats is not None:
            self._stats.unregister_gauge("pool_used_slots", self.name)
            self._stats.unregister_gauge("pool_slots", self.name)
        return leaked

    def __repr__(self) -> str:
        return (f"PinnedPool({self.name!r}, slots={self._used}/{self.num_slots} "
                f"x {self.slot_bytes} B, "
                f"pinned={self.pinned}, numa_node={self.numa_node})")


def _unregister(ptr: int, buf: torch.Tensor) -> None:
    """Unpin ``buf`` (passed only to keep its memory alive until it is unregistered)."""
    try:
        import torch

        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # at interpreter exit CUDA may already be torn down
        log.debug("cudaHostUnregister(%#x) failed", ptr, exc_info=True)


def _want_pin(pin: bool | None) -> bool:
    import torch

    cuda = torch.cuda.is_available()
    if pin and not cuda:
        raise ConfigError("pin=True needs CUDA, which is not available; pass pin=None to fall back "
                          "to pageable memory")
    if pin is None and not cuda:
        global _warned_pageable
        if not _warned_pageable:
            _warned_pageable = True
            warnings.warn("CUDA is not available: the KVortex host pool is pageable, not pinned",
                          RuntimeWarning, stacklevel=3)
        return False
    return bool(pin if pin is not None else cuda)
