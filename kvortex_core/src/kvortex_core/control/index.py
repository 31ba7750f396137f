"""The chunk index of one tier: key -> entry, byte accounting, pins and eviction.

One lock guards everything; every operation is O(1) per key (O(log n) for ``prefix-lru``
eviction), so the scheduler loop can call :meth:`ChunkIndex.lookup` per request. Eviction
victims are handed to ``on_evict`` *after* the lock is released, so tiering can demote them
(and may call back into the index) without deadlocking.

Pins: a chunk being loaded or saved is pinned and never evicted. :meth:`ChunkIndex.pin` returns
a :class:`PinHandle` (a context manager whose ``release()`` is idempotent); a handle still held
at :meth:`ChunkIndex.close` is reported as a leak with the operation that took it.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from kvortex_core.control.eviction import make_policy
from kvortex_core.control.stats import (
    INDEX_COUNTERS,
    INSERT_REJECTS,
    INSERTS,
    PIN_LEAKS,
    REMOVALS,
    Stats,
)
from kvortex_core.errors import ConfigError
from kvortex_core.logs import StormDetector, Throttle, event

log = logging.getLogger(__name__)

EvictCallback = Callable[[list["IndexEntry"]], None]


@dataclass(slots=True, eq=False)
class IndexEntry:
    """One stored chunk in one tier. ``parent`` is the key of the previous chunk of its prefix."""

    key: bytes
    size: int
    location: Any = None
    parent: bytes | None = None
    pins: int = 0
    tick: int = 0  # recency: larger = used more recently
    freq: int = 0  # s3fifo reuse counter
    evicting: bool = False


@dataclass(frozen=True)
class LeakedPin:
    """A pin still held at close: which operation took it, on how many chunks, for how long."""

    op: str
    keys: tuple[bytes, ...]
    held_s: float


@dataclass(eq=False)
class PinHandle:
    """Pins on the entries that were present when :meth:`ChunkIndex.pin` ran."""

    index: ChunkIndex
    op: str
    entries: list[IndexEntry]
    taken_at: float = field(default_factory=time.monotonic)
    released: bool = False

    @property
    def keys(self) -> list[bytes]:
        """The keys this handle pins (those present at pin time, in the order given)."""
        return [e.key for e in self.entries]

    def __len__(self) -> int:
        return len(self.entries)

    def release(self) -> None:
        """Drop the pins; safe to call any number of times."""
        self.index._release(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class ChunkIndex:
    """Thread-safe index of one tier with watermark eviction and pins."""

    STORM_WINDOW_S = 10.0
    STORM_LOG_EVERY_S = 300.0

    def __init__(
        self,
        name: str,
        capacity: int,
        *,
        policy: str = "prefix-lru",
        high_watermark: float = 0.8,
        evict_ratio: float = 0.2,
        on_evict: EvictCallback | None = None,
        stats: Stats | None = None,
    ) -> None:
        if capacity <= 0:
            raise ConfigError(f"index {name!r}: capacity={capacity} must be a positive byte count")
        if not 0.0 < high_watermark <= 1.0 or not 0.0 < evict_ratio <= 1.0:
            raise ConfigError(
                f"index {name!r}: high_watermark={high_watermark} and evict_ratio={evict_ratio} "
                "must both be in (0, 1], e.g. 0.8 and 0.2"
            )
        self.name = name
        self._capacity = int(capacity)
        self.high_watermark = high_watermark
        self.evict_ratio = evict_ratio
        self.policy_name = policy
        self.on_evict = on_evict
        self.stats = stats
        self._lock = threading.Lock()
        self._entries: dict[bytes, IndexEntry] = {}
        self._policy = make_policy(policy, self._entries, self._capacity)
        self._used = 0
        self._pinned_bytes = 0
        self._tick = itertools.count(1)
        self._handles: dict[int, PinHandle] = {}
        self._closed = False
        # an eviction storm: more than twice the capacity evicted within STORM_WINDOW_S (the
        # working set does not fit, the cache turns over before it is reused): one line each
        self._storms = StormDetector(threshold=2 * self._capacity, window_s=self.STORM_WINDOW_S)
        self._storm_log = Throttle(self.STORM_LOG_EVERY_S)
        if stats is not None:
            stats.register_gauge("used_bytes", lambda: self._used, name)
            stats.register_gauge("capacity_bytes", lambda: self._capacity, name)
            stats.register_gauge("entries", lambda: len(self._entries), name)
            # pins held now (a pin still held at close is a leak, counted in pin_leaks then)
            stats.register_gauge("open_pins", lambda: len(self._handles), name)
            stats.declare(name, counters=INDEX_COUNTERS)

    # -- properties -----------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Bytes accounted to stored entries."""
        return self._used

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def pinned_bytes(self) -> int:
        return self._pinned_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[bytes]:
        """A snapshot of the stored keys (no particular order)."""
        with self._lock:
            return list(self._entries)

    # -- queries --------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` are stored; the hit prefix counts as used (recency)."""
        with self._lock:
            n = self._hit_prefix_locked(keys)
        if self.stats is not None:
            self.stats.record_chunks(len(keys), n, self.name)
        return n

    def lookup_and_pin(self, keys: Sequence[bytes], op: str) -> tuple[int, PinHandle]:
        """Atomically find the stored prefix and pin it (no eviction can slip in between)."""
        with self._lock:
            n = self._hit_prefix_locked(keys)
            handle = self._pin_locked(keys[:n], op)
        if self.stats is not None:
            self.stats.record_chunks(len(keys), n, self.name)
        return n, handle

    def _hit_prefix_locked(self, keys: Sequence[bytes]) -> int:
        """Length of the stored prefix; its entries are touched (one tick for the batch)."""
        entries, on_access, tick, n = self._entries, self._policy.on_access, next(self._tick), 0
        for k in keys:
            entry = entries.get(k)
            if entry is None:
                break
            entry.tick = tick
            on_access(entry)
            n += 1
        return n

    def contains(self, keys: Sequence[bytes]) -> int:
        """Bitmask: bit ``i`` is set when ``keys[i]`` is stored. Recency is not changed."""
        entries, mask = self._entries, 0
        with self._lock:
            for i, k in enumerate(keys):
                if k in entries:
                    mask |= 1 << i
        return mask

    def contains_list(self, keys: Sequence[bytes]) -> list[bool]:
        """Like :meth:`contains`, as one bool per key (``torch.tensor(...)`` makes the mask)."""
        with self._lock:
            return [k in self._entries for k in keys]

    def get(self, key: bytes) -> IndexEntry | None:
        """The entry of ``key`` or None (recency is not changed)."""
        return self._entries.get(key)

    def touch(self, keys: Iterable[bytes]) -> None:
        """Mark the stored ones among ``keys`` as just used."""
        with self._lock:
            self._touch_locked(keys)

    def _touch_locked(self, keys: Iterable[bytes]) -> None:
        entries, on_access, tick = self._entries, self._policy.on_access, next(self._tick)
        for k in keys:
            entry = entries.get(k)
            if entry is not None:
                entry.tick = tick
                on_access(entry)

    # -- mutation -------------------------------------------------------------------------
    def insert(self, key: bytes, size: int, *, location: Any = None,
               parent: bytes | None = None, hold: PinHandle | None = None) -> bool:
        """Account ``size`` bytes for ``key``; False when there is no room (all pinned).

        Crossing the high watermark first evicts down to ``high_watermark - evict_ratio`` of
        the capacity; the new entry is never its own victim. Re-inserting a stored key with the
        same size updates its location (when given) and recency; with another size it replaces
        the entry (releasing the old location is the caller's business: it is not evicted).

        ``hold``: a handle from :meth:`pin` that also pins the new entry, atomically with the
        insert (a long save holds its chunks so that making room for its tail never evicts its
        head: the tail would be unreachable without it).
        """
        if size < 0:
            raise ConfigError(f"index {self.name!r}: size={size} of a chunk must be >= 0")
        with self._lock:
            ok, victims = self._insert_locked(key, size, location, parent)
            if ok and hold is not None and not hold.released:
                entry = self._entries[key]
                if entry.pins == 0:
                    self._pinned_bytes += entry.size
                entry.pins += 1
                hold.entries.append(entry)
        self._after_evict(victims)
        if self.stats is not None:
            self.stats.inc(INSERTS if ok else INSERT_REJECTS, 1, self.name)
        return ok

    def insert_chain(self, keys: Sequence[bytes], size: int, *,
                     locations: Sequence[Any] | None = None, parent: bytes | None = None) -> int:
        """Insert consecutive chunks of one prefix (each the parent of the next) under one lock.

        Stops at the first chunk that finds no room and returns how many were inserted; one
        ``on_evict`` call covers all of them.
        """
        if size < 0:
            raise ConfigError(f"index {self.name!r}: size={size} of a chunk must be >= 0")
        done, victims = 0, []
        with self._lock:
            for i, key in enumerate(keys):
                location = None if locations is None else locations[i]
                ok, evicted = self._insert_locked(key, size, location, parent)
                victims += evicted
                if not ok:
                    break
                done, parent = done + 1, key
        self._after_evict(victims)
        if self.stats is not None:
            self.stats.inc(INSERTS, done, self.name)
            if done < len(keys):
                self.stats.inc(INSERT_REJECTS, 1, self.name)
        return done

    def _insert_locked(self, key: bytes, size: int, location: Any,
                       parent: bytes | None) -> tuple[bool, list[IndexEntry]]:
        existing = self._entries.get(key)
        if existing is not None and existing.size == size:
            existing.location = location if location is not None else existing.location
            self._touch_locked((key,))
            return True, []
        if existing is not None:  # size changed: account it as a fresh entry
            self._remove_locked(existing)
        if size > self._capacity - self._pinned_bytes:
            return False, []
        # The new chunk's predecessor must survive making room for it, or prefix-lru would
        # evict a prompt's own head for its tail and leave the tail unreachable.
        guard = self._entries.get(parent) if parent is not None else None
        if guard is not None:
            guard.pins += 1
        try:
            victims = self._make_room_locked(size)
        finally:
            if guard is not None:
                guard.pins -= 1
        if self._used + size > self._capacity:
            return False, victims
        entry = IndexEntry(key, size, location, parent, tick=next(self._tick))
        self._entries[key] = entry
        self._used += size
        self._policy.on_insert(entry)
        return True, victims

    def _make_room_locked(self, size: int) -> list[IndexEntry]:
        after = self._used + size
        need = after - self._capacity
        if after > self.high_watermark * self._capacity:
            low = max(self.high_watermark - self.evict_ratio, 0.0) * self._capacity
            need = max(need, int(after - low))
        return self._evict_locked(need) if need > 0 else []

    def _evict_locked(self, nbytes: int) -> list[IndexEntry]:
        victims = self._policy.select(nbytes)
        for entry in victims:
            del self._entries[entry.key]
            self._used -= entry.size
        return victims

    def evict(self, nbytes: int) -> list[IndexEntry]:
        """Evict unpinned entries adding up to at least ``nbytes`` (fewer if too much is pinned)."""
        with self._lock:
            victims = self._evict_locked(nbytes) if nbytes > 0 else []
        self._after_evict(victims)
        return victims

    def _after_evict(self, victims: list[IndexEntry]) -> None:
        if not victims:
            return
        nbytes = sum(v.size for v in victims)
        if self.stats is not None:
            self.stats.record_eviction(len(victims), nbytes, self.name)
        storm = self._storms.record(nbytes)
        if storm is not None:
            # one line per storm, and at most one per STORM_LOG_EVERY_S (a server whose cache
            # always turns over this fast would log every window), with the storms left unlogged
            untold = self._storm_log.allow(self.name)
            level = logging.WARNING if untold is not None else logging.DEBUG
            event(log, level, "eviction_storm", tier=self.name, evicted_bytes=storm,
                  window_s=self.STORM_WINDOW_S, capacity_bytes=self._capacity,
                  storms_not_logged=untold or 0,
                  hint="the working set does not fit this tier: a larger capacity keeps more of it")
        if self.on_evict is not None:
            try:
                self.on_evict(victims)
            except Exception:  # the entries are gone either way; never fail the caller's insert
                log.exception("index %s: on_evict callback failed for %d entries",
                              self.name, len(victims))

    def remove(self, keys: Iterable[bytes]) -> list[IndexEntry]:
        """Remove the stored ones among ``keys`` (pinned or not); returns what was removed."""
        out = []
        with self._lock:
            for k in keys:
                entry = self._entries.get(k)
                if entry is not None:
                    self._remove_locked(entry)
                    out.append(entry)
        if out and self.stats is not None:
            self.stats.inc(REMOVALS, len(out), self.name)
        return out

    def _remove_locked(self, entry: IndexEntry) -> None:
        del self._entries[entry.key]
        self._used -= entry.size
        if entry.pins:
            self._pinned_bytes -= entry.size
        self._policy.on_remove(entry)

    def clear(self) -> list[IndexEntry]:
        """Remove everything (no ``on_evict``); returns the removed entries."""
        with self._lock:
            entries = list(self._entries.values())
            for entry in entries:
                self._remove_locked(entry)
        if entries and self.stats is not None:
            self.stats.inc(REMOVALS, len(entries), self.name)
        return entries

    # -- pins -----------------------------------------------------------------------------
    def pin(self, keys: Iterable[bytes], op: str) -> PinHandle:
        """Pin the stored ones among ``keys`` for operation ``op`` (e.g. ``"load req-17"``)."""
        with self._lock:
            return self._pin_locked(keys, op)

    def pin_prefix(self, keys: Sequence[bytes], op: str) -> tuple[list[IndexEntry], PinHandle]:
        """Pin the stored prefix of ``keys`` with one handle; its entries in order.

        Recency and lookup statistics are not changed (a load pins what a lookup counted).
        """
        with self._lock:
            entries = []
            for k in keys:
                entry = self._entries.get(k)
                if entry is None:
                    break
                entries.append(entry)
            return entries, self._pin_locked((e.key for e in entries), op)

    def _pin_locked(self, keys: Iterable[bytes], op: str) -> PinHandle:
        pinned = []
        for k in keys:
            entry = self._entries.get(k)
            if entry is not None:
                if entry.pins == 0:
                    self._pinned_bytes += entry.size
                entry.pins += 1
                pinned.append(entry)
        handle = PinHandle(self, op, pinned)
        self._handles[id(handle)] = handle
        return handle

    def _release(self, handle: PinHandle) -> None:
        self.release_all((handle,))

    def release_all(self, handles: Iterable[PinHandle]) -> None:
        """Release many pin handles under one lock (a load unpins one handle per chunk)."""
        with self._lock:
            for handle in handles:
                if handle.released:
                    continue
                handle.released = True
                self._handles.pop(id(handle), None)
                for entry in handle.entries:
                    if entry.pins <= 0:  # cannot happen through handles; keep counts sane anyway
                        continue
                    entry.pins -= 1
                    if entry.pins == 0 and self._entries.get(entry.key) is entry:
                        self._pinned_bytes -= entry.size

    def open_pins(self) -> list[LeakedPin]:
        """Pins currently held (what :meth:`close` would report)."""
        now = time.monotonic()
        with self._lock:
            handles = list(self._handles.values())
        return [LeakedPin(h.op, tuple(h.keys), now - h.taken_at) for h in handles]

    def close(self) -> list[LeakedPin]:
        """Release every pin still held, report each one as a leak and return them."""
        leaks = self.open_pins()
        for handle in list(self._handles.values()):
            handle.release()
        for leak in leaks:
            log.warning("index %s: pin leaked by %r on %d chunk(s), held %.3fs",
                        self.name, leak.op, len(leak.keys), leak.held_s)
        if self.stats is not None:
            if leaks:
                self.stats.inc(PIN_LEAKS, len(leaks), self.name)
            for gauge in ("used_bytes", "capacity_bytes", "entries", "open_pins"):
                self.stats.unregister_gauge(gauge, self.name)
        self._closed = True
        return leaks

    def __repr__(self) -> str:
        return (f"ChunkIndex({self.name!r}, used={self._used}/{self._capacity}, "
                f"entries={len(self._entries)}, policy={self.policy_name!r})")


__all__ = ["ChunkIndex", "IndexEntry", "LeakedPin", "PinHandle"]
