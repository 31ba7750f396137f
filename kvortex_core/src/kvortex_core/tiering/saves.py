"""Saves, write-behind, eviction and demotion (part of :class:`~kvortex_core.tiering.manager.TierManager`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kvortex_core.data import payload as pl
from kvortex_core.tiering.counters import (
    BYTES_WRITTEN,
    DEMOTIONS,
    DEMOTIONS_SKIPPED,
    SAVE_SKIPPED,
    WRITE_BEHIND_SKIPPED,
)
from kvortex_core.tiering.leases import SaveLease
from kvortex_core.tiering.state import TierState
from kvortex_core.tiering.tiers import LowerTier, TierUnavailable

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from kvortex_core.control.index import IndexEntry, PinHandle


#: Keys whose delete failed kept for a retry, at most (the oldest beyond are left to the
#: store's own expiry or the next start-up scan).
_MAX_UNDELETED = 65536


class SaveMixin(TierState):
    """begin/commit/abort_save, write-behind to lower tiers, demotion on eviction."""

    _saving: set[bytes]
    _saved: threading.Condition
    _saving_waiters: int
    _demoting: int  # cpu slots held by demotions in flight
    _drop_victims: bool  # an allocation evicts without demoting (set under _lock)
    _seal_pool: ThreadPoolExecutor  # seals run here (see TierManager.__init__)
    WRITE_BEHIND_WORKERS: int
    _demoting_lock: threading.Lock
    _demoting_keys: dict[bytes, int]
    _rescued: set[int]

    if TYPE_CHECKING:  # provided by TierManager / the other mixin

        def contains(self, keys: Sequence[bytes]) -> int: ...
        def _spawn(self, coro: Any) -> None: ...
        def _stored_below(self, key: bytes) -> bool: ...

    def begin_save(
        self, keys: Sequence[bytes], parents: Sequence[bytes | None] | None = None,
        *, full_at: list[int] | None = None,
    ) -> list[SaveLease]:
        """Reserve a slot for each chunk of a prefix not stored anywhere.

        Chunks stored already, or being saved by another caller, are skipped. When no slot is
        left the reservation stops there (chunks after a missing one could never be loaded),
        the rest is counted as skipped, and ``full_at`` (if given) gets the index of that chunk.
        """
        keys = list(keys)
        stored = self.contains(keys)
        leases: list[SaveLease] = []
        with self._lock:
            for i, key in enumerate(keys):
                if stored >> i & 1 or key in self._saving or self._closed:
                    continue
                slot = self._allocate_slot()
                if slot is None:
                    self.stats.inc(SAVE_SKIPPED, len(keys) - i, self.cpu_name)
                    if full_at is not None:
                        full_at.append(i)
                    break
                self._saving.add(key)
                parent = parents[i] if parents is not None else (keys[i - 1] if i else None)
                leases.append(SaveLease(key, i, slot, self._payload_view(slot), parent))
        return leases

    def hold_for_save(self, n_chunks: int) -> PinHandle | None:
        """A pin handle for ``commit_save(..., hold=)`` when indexing ``n_chunks`` more chunks may
        cross the cpu tier's high watermark (eviction then starts); None when they fit below it."""
        index = self.cpu_index
        if index.used + n_chunks * self.pool.slot_bytes <= index.high_watermark * index.capacity:
            return None
        return index.pin((), "save")

    def _payload_view(self, slot: int) -> torch.Tensor:
        return self._payload_views[slot]

    def _header_view(self, slot: int) -> memoryview:
        """The slot's header bytes, writable."""
        return self._header_views[slot]

    def _allocate_slot(self) -> int | None:
        slot = self.pool.allocate()
        if slot is None:  # evict one chunk: freed at once if stored below, else demoted
            self.cpu_index.evict(self.pool.slot_bytes)
            slot = self.pool.allocate()
        if slot is None:
            # its slot is held until the write below ends: evict one more and drop it, as a
            # cpu-only engine would. Else a lower tier slower than the saves made every save
            # skip, and the cpu tier cached less with a lower tier than without it (a red-team
            # finding). A new chunk is worth more than the least recently used one.
            self._drop_victims = True
            try:
                self.cpu_index.evict(self.pool.slot_bytes)
            finally:
                self._drop_victims = False
            slot = self.pool.allocate()
        return slot

    def prepare_save(self, leases: Sequence[SaveLease]) -> None:
        """Write the slots' headers now, while their payloads are still being copied.

        The header area is apart from the payload and the slot is in no index yet, so this
        is safe before the copy ends; ``commit_save`` then only publishes the chunks.
        """
        for lease in leases:
            if not lease.done and not lease.header_written:
                self._write_identity_header(lease)

    def _write_identity_header(self, lease: SaveLease) -> None:
        # Identity header only (checksum 0): a cpu slot is our own memory and is never
        # verified. The checksum is computed when the chunk leaves for a lower tier
        # (_sealed), so a save costs no host pass over its bytes unless it is written below.
        pl.write_header(self._header_view(lease.slot), key=lease.key, namespace=self.namespace,
                        shape=self.payload_shape, dtype=self.dtype,
                        payload_len=self.payload_bytes, checksum=0)
        lease.header_written = True

    def commit_save(self, leases: Sequence[SaveLease], hold: PinHandle | None = None) -> list[SaveLease]:
        """Seal the filled slots into the cpu index and queue write-behind; never blocks.

        Returns the leases whose chunk was not indexed (no room, or stored meanwhile): usually none.

        ``hold``: a pin handle of the cpu index (``cpu_index.pin((), op)``) that pins each chunk
        as it is indexed, until the caller releases it: a save larger than what the tier keeps
        then drops its tail (no room) instead of evicting its own head to index the tail.
        """
        missed: list[SaveLease] = []
        for lease in leases:
            if lease.done:
                continue
            lease.done = True
            try:
                self._commit_one(lease, hold)
            finally:
                self._done_saving(lease.key)
            if not lease.stored:
                missed.append(lease)
        return missed

    def _commit_one(self, lease: SaveLease, hold: PinHandle | None = None) -> None:
        if not lease.header_written:
            self._write_identity_header(lease)
        with self._lock:
            # A key promoted meanwhile keeps its slot: re-inserting would orphan that one.
            ok = (
                not self._closed
                and lease.key not in self.cpu_index
                and self.cpu_index.insert(
                    lease.key, self.pool.slot_bytes, location=lease.slot, parent=lease.parent, hold=hold
                )
            )
        if not ok:
            self.pool.free(lease.slot)
            self.stats.inc(SAVE_SKIPPED, 1, self.cpu_name)
            return
        lease.stored = True
        self.stats.record_saved(self.payload_bytes, self.cpu_name)  # KV bytes, as loads count
        for tier in self.tiers:
            if tier.write_through:
                self._write_behind(tier, lease.key)

    async def _sealed(self, key: bytes, slot: int) -> memoryview:
        """Checksum the slot's payload and write its header (off the loop: xxh3 drops the GIL)."""
        view = self.pool.view(slot)

        def seal() -> int:
            return pl.seal(view, key=key, namespace=self.namespace, shape=self.payload_shape,
                           dtype=self.dtype, payload_len=self.payload_bytes)

        total = await asyncio.get_running_loop().run_in_executor(self._seal_pool, seal)
        return self.pool.buffer(slot)[:total]

    def _write_behind(self, tier: LowerTier, key: bytes) -> None:
        """Queue a copy of a stored chunk to ``tier``; never blocks (a full queue skips it).

        The chunk is pinned only while its job runs. Pinned from the moment it was queued, a
        tier slower than the saves (write-through to a Redis 300 ms away) held up to the
        queue's 256 chunks unevictable: the cpu tier filled with pins and skipped half the new
        saves (a red-team finding). A chunk evicted before its job runs is written by its
        demotion instead. Whether the tier takes writes is checked again when the job runs and
        right before its write: writes queued or sealed meanwhile may have timed out (16 saves
        in a burst into a hung tier left 16 late writes, each holding its slot: a red-team
        finding).
        """
        if tier.refuses_write_behind():
            return

        async def job() -> None:
            if tier.refuses_write_behind():
                return
            pin = self.cpu_index.pin([key], f"write-behind {tier.name}")
            if not len(pin):
                pin.release()
                return  # evicted meanwhile (its demotion covers it)
            handed = False
            try:
                value = await self._sealed(key, int(pin.entries[0].location))
                if tier.refuses_write_behind():
                    return
                handed = True  # from here _put releases the pin, once nothing reads the slot
                await self._put(tier, key, value, release=pin.release)
            finally:
                if not handed:
                    pin.release()

        if not tier.queue.offer(job):
            self.stats.inc(WRITE_BEHIND_SKIPPED, 1, tier.name)

    async def _put(
        self, tier: LowerTier, key: bytes, value: memoryview | bytes | bytearray, *,
        release: Callable[[], None] | None = None,
    ) -> bool:
        """Write one value into a lower tier and its index (evicting there first).

        ``release`` runs once nothing reads ``value`` any more: before this returns, or, for a
        put that timed out and was left to finish, when it ended. ``value`` may be a view of a
        cpu slot: a slot freed or rewritten while a late put still read it gave that put mixed
        bytes (with compression on, stored under a fresh checksum and served after a restart:
        a red-team finding).
        """
        late = False
        try:
            return await self._put_value(tier, key, value, release)
        except TierUnavailable:  # only a put left to finish: its end runs ``release``
            late = True
            tier.late_writes += 1
            return False
        finally:
            if release is not None and not late:
                release()

    async def _put_value(self, tier: LowerTier, key: bytes, value: memoryview | bytes | bytearray,
                         release: Callable[[], None] | None) -> bool:
        if key in tier.index:
            return True
        if not tier.index.insert(key, len(value)):
            return False
        # in flight from the moment it is indexed: a read meanwhile finds nothing yet and must
        # keep the entry (it removed it while this put waited for the tier's evictions, and
        # the put, landing on a key no index counted, then deleted the chunk everywhere)
        tier.putting.add(key)
        try:
            await self._process_doomed(tier)
            # a put that times out is left to finish (a backend's write may already be running
            # on a thread, or be sent): once it ended, its value is deleted unless the key was
            # indexed again meanwhile, else it holds the store's capacity with bytes no index counts
            await tier.call("put", tier.backend.put(key.hex(), value),
                            on_late=lambda: self._late_put_ended(tier, key, release))
        except TierUnavailable as exc:
            tier.index.remove([key])
            if exc.still_running:
                raise  # _put leaves the release to the late put's end
            return False
        finally:
            tier.putting.discard(key)
        if key not in tier.index:
            # Evicted or rejected while the put was in flight (its delete may have run before
            # the value landed): delete it again, or the store holds bytes no index counts.
            if tier.remote is not None:
                tier.remote.record([key], [False])
            await self._delete(tier, [key])  # on failure retried with the next deletes
            return False
        self.stats.inc(BYTES_WRITTEN, len(value), tier.name)
        return True

    def _late_put_ended(self, tier: LowerTier, key: bytes,
                        release: Callable[[], None] | None = None) -> None:
        """A put that timed out has ended (``LowerTier.call``'s ``on_late``, on the loop): its
        value's buffer is free again (``release``), and its value deleted unless put again."""
        tier.late_writes -= 1
        if release is not None:
            release()
        if key in tier.index or key in tier.putting:
            return  # put again meanwhile: that put's value stands (a backend orders its writes)

        async def drop() -> None:
            if key in tier.index or key in tier.putting:
                return
            if tier.remote is not None:
                tier.remote.record([key], [False])
            await self._delete(tier, [key])  # on failure retried with the next deletes

        self._spawn(drop())

    def abort_save(self, leases: Sequence[SaveLease]) -> None:
        """Give the slots of unfinished saves back."""
        for lease in leases:
            if lease.done:
                continue
            lease.done = True
            self.pool.free(lease.slot)
            self._done_saving(lease.key)

    def _done_saving(self, key: bytes) -> None:
        with self._lock:
            self._saving.discard(key)
            if self._saving_waiters:
                self._saved.notify_all()

    def wait_saving(self, keys: Sequence[bytes], timeout: float) -> bool:
        """Wait until no save in progress (another caller's) holds any of ``keys``.

        A save skips chunks another thread is saving; it waits here so that when it returns,
        every chunk of its prompt is indexed (or that other save failed). False on timeout.
        """
        with self._lock:
            if not self._saving or self._saving.isdisjoint(keys):
                return True
            self._saving_waiters += 1
            try:
                return self._saved.wait_for(lambda: self._saving.isdisjoint(keys), timeout)
            finally:
                self._saving_waiters -= 1

    # -- eviction and demotion -------------------------------------------------------------
    def _on_cpu_evict(self, victims: list[IndexEntry]) -> None:
        """cpu chunks leaving: free their slots, demoting first those not stored below.

        Demotions in flight hold their slots: with a quarter of the slots held already (a tier
        below slower than the saves), the victims are dropped instead (counted), as a cpu-only
        engine would, or the held slots grew until saves found none (a red-team finding). One
        eviction's victims share one decision: at most its batch overshoots the quarter.
        """
        # (at least as many as a tier writes at once, whatever the pool's size)
        busy = self._drop_victims or self._demoting >= max(self.WRITE_BEHIND_WORKERS, self.pool.num_slots // 4)
        for entry in victims:
            slot = int(entry.location)
            with self._demoting_lock:
                if slot in self._rescued:  # its first demotion still runs: that one frees the slot
                    self._rescued.discard(slot)
                    continue
            stored_below = self._stored_below(entry.key)
            target = None if stored_below or busy else self._demotion_target(0)
            if target is None or self._closed:
                if not stored_below and self.tiers and not self._closed:  # no tier takes writes
                    self.stats.inc(DEMOTIONS_SKIPPED, 1, self.tiers[0].name)
                self.pool.free(slot)
                continue
            with self._demoting_lock:
                self._demoting += 1
                self._demoting_keys[entry.key] = slot
            if not target.queue.offer(self._demote_slot_job(target, entry.key, slot)):
                self._demoted(slot, entry.key)
                self.stats.inc(DEMOTIONS_SKIPPED, 1, target.name)

    def _demoted(self, slot: int, key: bytes) -> None:
        """A demotion is over (written or not): its slot goes back to the pool, unless a load
        took the chunk back into the cpu index meanwhile (:meth:`rescue`)."""
        with self._demoting_lock:
            self._demoting -= 1
            if self._demoting_keys.get(key) == slot:
                del self._demoting_keys[key]
            rescued = slot in self._rescued
            self._rescued.discard(slot)
        if not rescued:
            self.pool.free(slot)

    def rescue(self, keys: Sequence[bytes]) -> None:
        """Take chunks being demoted back into the cpu index (their slot still holds them).

        Between its eviction and the end of its write below, a chunk is in no index; a lookup
        counts it (``contains``) and a load takes it back here instead of missing it.
        """
        for i, key in enumerate(keys):
            with self._demoting_lock:
                slot = self._demoting_keys.pop(key, None)
                if slot is None:
                    continue
                self._rescued.add(slot)
            with self._lock:
                ok = key not in self.cpu_index and self.cpu_index.insert(
                    key, self.pool.slot_bytes, location=slot, parent=keys[i - 1] if i else None
                )
            if not ok:
                with self._demoting_lock:
                    running = slot in self._rescued
                    self._rescued.discard(slot)
                if not running:  # the demotion ended meanwhile and left the slot to us
                    self.pool.free(slot)

    def _demotion_target(self, start: int) -> LowerTier | None:
        return next((t for t in self.tiers[start:] if t.takes_writes), None)

    async def _demote_value(self, start: int, key: bytes, value: memoryview | bytes | bytearray,
                            release: _Readers | None = None) -> None:
        """Write a demoted chunk into the first tier from ``start`` down that takes it: a tier
        that refuses it (full, its eviction racing other writes) or fails passes it on, where
        the chunk used to be dropped. ``release``: the buffer's readers (each put is one)."""
        for tier in self.tiers[start:]:
            if not tier.takes_writes:
                continue
            if await self._put(tier, key, value, release=release.add() if release else None):
                self.stats.inc(DEMOTIONS, 1, tier.name)
                return
        # No tier took it (all full, failing or out of service): the chunk is gone, counted
        # against the tier it was meant for.
        self.stats.inc(DEMOTIONS_SKIPPED, 1, self.tiers[start].name)

    def _demote_slot_job(self, tier: LowerTier, key: bytes, slot: int) -> Any:
        async def job() -> None:
            readers = _Readers(lambda: self._demoted(slot, key))
            try:
                value = await self._sealed(key, slot)
                await self._demote_value(self.tiers.index(tier), key, value, readers)
            finally:
                readers.done()  # the slot is given back once every put that read it ended

        return job

    def _on_lower_evict(self, position: int, victims: list[IndexEntry]) -> None:
        """Chunks leaving a lower tier's index: delete them there (demoting first) on the loop."""
        tier = self.tiers[position]
        tier.doomed.extend(victims)
        if not self._closed:
            self.loop.call_soon(self._spawn, self._process_doomed(tier))

    async def _process_doomed(self, tier: LowerTier) -> None:
        """Delete the values evicted from ``tier``'s index, those the tier below lacks once
        copied there. Values that need no copy go first, in one delete, and each copied one is
        deleted as soon as it is below: a store counts a value until it is deleted. Deleting
        all at the end made the store refuse most writes while a slow tier below (Redis, S3)
        took the copies (54-79 % of a disk tier's writes under churn: a red-team finding); a
        write the store still refuses passes to the tier below (:meth:`_demote_value`).
        (Making writes wait for the evictions running instead cost a third of the hit rate
        under churn: each waited for a whole eviction's copies.)"""
        victims, tier.doomed = tier.doomed, []
        if not victims:
            if tier.undeleted and tier.breaker.available:
                await self._delete(tier, [])
            return
        position = self.tiers.index(tier)
        below = self._demotion_target(position + 1)
        copy = {e.key: e for e in victims
                if below is not None and not self._stored_below_from(e.key, position + 1)}
        if tier.remote is not None:  # our own delete: the shared tier's cached answer is wrong
            tier.remote.record([e.key for e in victims], [False] * len(victims))
        await self._delete(tier, [e.key for e in victims if e.key not in copy])
        for entry in copy.values():
            if below is not None:
                await self._demote_between(tier, below, entry)
            await self._delete(tier, [entry.key])

    async def _delete(self, tier: LowerTier, keys: list[bytes]) -> None:
        """Delete evicted ``keys`` and those whose delete failed before (unless indexed again).

        A failed delete used to be forgotten: a shared tier's store kept the values and charged
        them to this instance's capacity, which then refused every write for good once the
        store was healthy again (a red-team finding).
        """
        retry = [k for k in tier.undeleted if k not in tier.index and k not in tier.putting]
        todo, tier.undeleted = list(dict.fromkeys(keys + retry)), []
        if not todo:
            return
        try:
            await tier.call("delete", tier.backend.delete([k.hex() for k in todo]))
        except TierUnavailable:  # retried with the next deletes (others may have failed meanwhile)
            tier.undeleted = list(dict.fromkeys(tier.undeleted + todo))[-_MAX_UNDELETED:]

    def _stored_below_from(self, key: bytes, start: int) -> bool:
        return any(key in t.index for t in self.tiers[start:])

    async def _demote_between(self, src: LowerTier, dst: LowerTier, entry: IndexEntry) -> None:
        buf = bytearray(max(entry.size, self.pool.slot_bytes))
        try:
            n = await src.call("get", src.backend.get(entry.key.hex(), memoryview(buf)))
        except TierUnavailable:
            return
        if n:
            await self._demote_value(self.tiers.index(dst), entry.key, memoryview(buf)[:n])


class _Readers:
    """Runs ``then`` once the job holding a buffer and every put it lent the buffer to are done
    (a put that timed out reads it until it ends). Used on the tiering loop only."""

    def __init__(self, then: Callable[[], None]) -> None:
        self._count = 1  # the job itself
        self._then = then

    def add(self) -> Callable[[], None]:
        self._count += 1
        return self.done

    def done(self) -> None:
        self._count -= 1
        if self._count == 0:
            self._then()
