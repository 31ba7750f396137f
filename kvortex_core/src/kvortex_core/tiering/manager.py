"""TierManager: ordered tiers, write-behind, promotion, demotion and failure isolation.

The first tier is always ``cpu``: a :class:`PinnedPool` whose slots are laid out like a stored
value (``HEADER_BYTES`` of header, then the payload), indexed by a :class:`ChunkIndex`. Lower
tiers are any registered backends, each with its own index, circuit breaker and bounded
write-behind queue, driven from one event-loop thread (:mod:`kvortex_core.tiering.loop`).

- Save: ``begin_save`` reserves slots for chunks stored nowhere, ``commit_save`` seals them
  (header + checksum) into the cpu index and queues a write to every ``write_through`` tier.
- Eviction from cpu demotes a chunk to the first available lower tier unless some lower tier
  already has it; eviction from a lower tier demotes to the next one the same way.
- Load: ``begin_load`` pins cpu hits and fetches lower-tier hits straight into fresh slots,
  verifies them (a bad payload is a miss, deleted and counted) and promotes them into cpu.
- A failing tier never raises into the caller: it is skipped (breaker open) and probed later.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvortex_core.config.backends import backend_options
from kvortex_core.control.index import ChunkIndex, IndexEntry
from kvortex_core.data import payload as pl
from kvortex_core.data.pool import PinnedPool, per_rank_capacity
from kvortex_core.errors import ConfigError, PayloadError
from kvortex_core.logs import Throttle, event
from kvortex_core.storage.protocol import BackendContext
from kvortex_core.tiering.breaker import CircuitBreaker
from kvortex_core.tiering.leases import LoadLease, SaveLease
from kvortex_core.tiering.loop import LoopThread, WorkQueue
from kvortex_core.tiering.tiers import LowerTier, RemoteCache, TierUnavailable, log_transition

if TYPE_CHECKING:
    import torch

    from kvortex_core.config.settings import KVortexConfig
    from kvortex_core.control.stats import Stats
    from kvortex_core.plugins.manager import PluginManager

log = logging.getLogger("kvortex_core.tiering")

# Counter names (all labelled by tier).
BYTES_WRITTEN = "tier_bytes_written"
BYTES_READ = "tier_bytes_read"
CHECKSUM_FAILURES = "checksum_failures"
WRITE_BEHIND_SKIPPED = "write_behind_skipped"
SAVE_SKIPPED = "save_skipped_pool_full"
PROMOTIONS = "promotions"
DEMOTIONS = "demotions"
DEMOTIONS_SKIPPED = "demotions_skipped"
BREAKER_TRANSITIONS = "breaker_transitions"
LOAD_MISSES = "load_misses"

# Outcome of one lower-tier fetch: verified, a miss (slot reusable), or slot quarantined.
OK, MISS, GONE = "ok", "miss", "gone"


class TierManager:
    """Owns the cpu pool and every tier of one rank; see the module docstring."""

    #: Jobs a lower tier's write-behind queue holds before writes are skipped (and counted).
    WRITE_BEHIND_DEPTH = 256
    #: Concurrent backend writes per tier.
    WRITE_BEHIND_WORKERS = 4
    #: How long a shared tier's ``contains`` answer is trusted by ``lookup``.
    REMOTE_CACHE_TTL_S = 2.0

    def __init__(self, *, config: KVortexConfig, namespace: bytes, payload_shape: tuple[int, ...],
                 dtype: torch.dtype, stats: Stats, pool: PinnedPool, cpu_name: str) -> None:
        self.config = config
        self.namespace = namespace
        self.payload_shape = tuple(int(d) for d in payload_shape)
        self.dtype = dtype
        self.stats = stats
        self.pool = pool
        self.payload_offset = pl.HEADER_BYTES
        self.payload_bytes = math.prod(self.payload_shape) * _itemsize(dtype)
        self.cpu_name = cpu_name
        ev = config.eviction
        self.cpu_index = ChunkIndex(cpu_name, pool.capacity_bytes, policy=ev.policy,
                                    high_watermark=ev.high_watermark, evict_ratio=ev.evict_ratio,
                                    on_evict=self._on_cpu_evict, stats=stats)
        self.tiers: list[LowerTier] = []
        self.loop = LoopThread()
        self._lock = threading.RLock()
        self._saving: set[bytes] = set()
        self._checksum_log = Throttle(10.0)
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def create(cls, config: KVortexConfig, plugins: PluginManager, *, namespace: bytes,
               payload_shape: tuple[int, ...], dtype: torch.dtype, stats: Stats, rank: int = 0,
               world_size: int = 1) -> TierManager:
        """Build the pool and open every tier (a tier that cannot open starts out of service)."""
        names = config.tier_names
        first = config.tiers[names[0]]
        if first.type != "cpu":
            raise ConfigError(
                f"the first tier {names[0]!r} has type {first.type!r}; it must be 'cpu' (pinned "
                f"host memory), e.g. tiers: {{cpu: {{type: cpu, capacity: 8GiB}}, {names[0]}: ...}}"
            )
        ranks = config.ranks_per_node or world_size
        cpu_opts = backend_options(config, names[0], plugins)
        slot = pl.HEADER_BYTES + math.prod(payload_shape) * _itemsize(dtype)
        pool = PinnedPool(slot, per_rank_capacity(int(first.capacity), ranks, 4096),
                          pin=getattr(cpu_opts, "pin", None), alignment=4096, stats=stats,
                          name=names[0])
        mgr = cls(config=config, namespace=namespace, payload_shape=payload_shape, dtype=dtype,
                  stats=stats, pool=pool, cpu_name=names[0])
        try:
            for name in names[1:]:
                mgr._add_tier(name, plugins, per_rank_capacity(int(config.tiers[name].capacity), ranks),
                              rank, world_size)
        except BaseException:
            mgr.close()
            raise
        return mgr

    def _add_tier(self, name: str, plugins: PluginManager, capacity: int, rank: int,
                  world_size: int) -> None:
        tc = self.config.tiers[name]
        info = plugins.backend(tc.type)
        info.check_dependencies()
        context = BackendContext(tier=name, namespace=self.namespace.hex(), rank=rank,
                                 world_size=world_size)
        backend = info.cls(backend_options(self.config, name, plugins), capacity=capacity,
                           context=context)
        ev, cb = self.config.eviction, self.config.circuit_breaker
        position = len(self.tiers)
        index = ChunkIndex(name, capacity, policy=ev.policy, high_watermark=ev.high_watermark,
                           evict_ratio=ev.evict_ratio, stats=self.stats,
                           on_evict=lambda victims: self._on_lower_evict(position, victims))
        breaker = CircuitBreaker(name, failure_threshold=cb.failure_threshold,
                                 reset_after_s=cb.reset_after_s, on_transition=self._on_transition)
        shared = bool(getattr(info.cls, "shared", False))
        tier = LowerTier(
            name=name, backend=backend, index=index, breaker=breaker, stats=self.stats,
            queue=WorkQueue(self.loop, name, maxsize=self.WRITE_BEHIND_DEPTH,
                            workers=self.WRITE_BEHIND_WORKERS),
            op_timeout_s=self.config.timeouts.backend_op_s, write_through=tc.write_through,
            shared=shared, remote=RemoteCache(self.REMOTE_CACHE_TTL_S) if shared else None,
        )
        self.tiers.append(tier)
        self._open_tier(tier)

    def _open_tier(self, tier: LowerTier) -> None:
        bound = max(self.config.timeouts.backend_op_s, self.config.timeouts.close_s)
        try:
            entries = self.loop.run(self._open_and_scan(tier), bound)
        except Exception as exc:  # noqa: BLE001 - a tier that cannot start is skipped, not fatal
            tier.breaker.force_open(f"open failed: {type(exc).__name__}: {exc}")
            return
        for key, size in entries or ():
            try:
                tier.index.insert(bytes.fromhex(key), size)
            except ValueError:
                continue  # not one of our keys

    @staticmethod
    async def _open_and_scan(tier: LowerTier) -> list[tuple[str, int]] | None:
        await tier.backend.open()
        return await tier.backend.scan()

    def _on_transition(self, name: str, old: str, new: str, error: str) -> None:
        self.stats.inc(BREAKER_TRANSITIONS, 1, name)
        log_transition(name, old, new, error)

    # -- lookups ---------------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes]) -> int:
        """Bitmask over all tiers: bit i set when keys[i] is stored somewhere reachable now."""
        keys = list(keys)
        mask = self.cpu_index.contains(keys)
        for tier in self.tiers:
            if not tier.available:
                continue
            mask |= tier.index.contains(keys)
            if tier.remote is not None:
                mask |= self._remote_mask(tier, keys)
        return mask

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Longest prefix of ``keys`` present in any tier; never waits on a shared tier."""
        keys = list(keys)
        n = _leading_ones(self.contains(keys), len(keys))
        self.cpu_index.touch(keys[:n])
        return n

    def _remote_mask(self, tier: LowerTier, keys: list[bytes]) -> int:
        assert tier.remote is not None
        mask, stale = tier.remote.mask(keys)
        if stale and not self._closed:
            self.loop.call_soon(self._spawn, self._refresh_remote(tier, stale))
        return mask

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._tasks.discard)

    async def _refresh_remote(self, tier: LowerTier, keys: list[bytes]) -> None:
        assert tier.remote is not None
        try:
            found = await tier.call("contains", tier.backend.contains([k.hex() for k in keys]),
                                    self.config.timeouts.remote_lookup_s)
        except TierUnavailable:
            tier.remote.give_up(keys)
            return
        tier.remote.record(keys, found)

    def _stored_below(self, key: bytes) -> bool:
        return any(key in t.index or (t.remote is not None and t.remote.present(key))
                   for t in self.tiers)

    # -- saves -----------------------------------------------------------------------------
    def begin_save(self, keys: Sequence[bytes], parents: Sequence[bytes | None] | None = None
                   ) -> list[SaveLease]:
        """Reserve a slot for each chunk not stored anywhere (pool full: skipped and counted)."""
        keys = list(keys)
        stored = self.contains(keys)
        leases: list[SaveLease] = []
        with self._lock:
            for i, key in enumerate(keys):
                if stored >> i & 1 or key in self._saving or self._closed:
                    continue
                slot = self._allocate_slot()
                if slot is None:
                    self.stats.inc(SAVE_SKIPPED, 1, self.cpu_name)
                    continue
                self._saving.add(key)
                parent = parents[i] if parents is not None else (keys[i - 1] if i else None)
                leases.append(SaveLease(key, i, slot, self._payload_view(slot), parent))
        return leases

    def _payload_view(self, slot: int) -> torch.Tensor:
        return self.pool.view(slot)[pl.HEADER_BYTES : pl.HEADER_BYTES + self.payload_bytes]

    def _allocate_slot(self) -> int | None:
        slot = self.pool.allocate()
        if slot is None:
            self.cpu_index.evict(self.pool.slot_bytes)  # frees (or demotes) unpinned chunks
            slot = self.pool.allocate()
        return slot

    def commit_save(self, leases: Sequence[SaveLease]) -> None:
        """Seal the filled slots into the cpu index and queue write-behind; never blocks."""
        for lease in leases:
            if lease.done:
                continue
            lease.done = True
            try:
                self._commit_one(lease)
            finally:
                with self._lock:
                    self._saving.discard(lease.key)

    def _commit_one(self, lease: SaveLease) -> None:
        total = pl.seal(self.pool.view(lease.slot), key=lease.key, namespace=self.namespace,
                        shape=self.payload_shape, dtype=self.dtype, payload_len=self.payload_bytes)
        with self._lock:
            ok = not self._closed and self.cpu_index.insert(
                lease.key, self.pool.slot_bytes, location=lease.slot, parent=lease.parent)
        if not ok:
            self.pool.free(lease.slot)
            self.stats.inc(SAVE_SKIPPED, 1, self.cpu_name)
            return
        self.stats.record_saved(total, self.cpu_name)
        for tier in self.tiers:
            if tier.write_through:
                self._write_behind(tier, lease.key, lease.slot, total)

    def _write_behind(self, tier: LowerTier, key: bytes, slot: int, total: int) -> None:
        if not tier.available:
            self.stats.inc(WRITE_BEHIND_SKIPPED, 1, tier.name)
            return
        pin = self.cpu_index.pin([key], f"write-behind {tier.name}")
        if not len(pin):
            return  # evicted meanwhile (its demotion covers it)

        async def job() -> None:
            try:
                await self._put(tier, key, self.pool.buffer(slot)[:total])
            finally:
                pin.release()

        if not tier.queue.offer(job):
            pin.release()
            self.stats.inc(WRITE_BEHIND_SKIPPED, 1, tier.name)

    async def _put(self, tier: LowerTier, key: bytes, value: memoryview | bytes | bytearray) -> bool:
        """Write one value into a lower tier and its index (evicting there first)."""
        if key in tier.index:
            return True
        if not tier.index.insert(key, len(value)):
            return False
        await self._process_doomed(tier)
        try:
            await tier.call("put", tier.backend.put(key.hex(), value))
        except TierUnavailable:
            tier.index.remove([key])
            return False
        self.stats.inc(BYTES_WRITTEN, len(value), tier.name)
        return True

    def abort_save(self, leases: Sequence[SaveLease]) -> None:
        """Give the slots of unfinished saves back."""
        for lease in leases:
            if lease.done:
                continue
            lease.done = True
            self.pool.free(lease.slot)
            with self._lock:
                self._saving.discard(lease.key)

    # -- eviction and demotion -------------------------------------------------------------
    def _on_cpu_evict(self, victims: list[IndexEntry]) -> None:
        """cpu chunks leaving: free their slots, demoting first those not stored below."""
        for entry in victims:
            slot = int(entry.location)
            target = None if self._stored_below(entry.key) else self._demotion_target(0)
            if target is None or self._closed:
                self.pool.free(slot)
                continue
            if not target.queue.offer(self._demote_slot_job(target, entry.key, slot)):
                self.pool.free(slot)
                self.stats.inc(DEMOTIONS_SKIPPED, 1, target.name)

    def _demotion_target(self, start: int) -> LowerTier | None:
        return next((t for t in self.tiers[start:] if t.available), None)

    def _demote_slot_job(self, tier: LowerTier, key: bytes, slot: int) -> Any:
        async def job() -> None:
            try:
                header = pl.read_header(self.pool.view(slot))
                if await self._put(tier, key, self.pool.buffer(slot)[: header.total_len]):
                    self.stats.inc(DEMOTIONS, 1, tier.name)
            finally:
                self.pool.free(slot)

        return job

    def _on_lower_evict(self, position: int, victims: list[IndexEntry]) -> None:
        """Chunks leaving a lower tier's index: delete them there (demoting first) on the loop."""
        tier = self.tiers[position]
        tier.doomed.extend(victims)
        if not self._closed:
            self.loop.call_soon(self._spawn, self._process_doomed(tier))

    async def _process_doomed(self, tier: LowerTier) -> None:
        victims, tier.doomed = tier.doomed, []
        if not victims:
            return
        position = self.tiers.index(tier)
        below = self._demotion_target(position + 1)
        for entry in victims:
            if below is not None and not self._stored_below_from(entry.key, position + 1):
                await self._demote_between(tier, below, entry)
        try:
            await tier.call("delete", tier.backend.delete([e.key.hex() for e in victims]))
        except TierUnavailable:
            pass  # a later scan or the store's own expiry reclaims them

    def _stored_below_from(self, key: bytes, start: int) -> bool:
        return any(key in t.index for t in self.tiers[start:])

    async def _demote_between(self, src: LowerTier, dst: LowerTier, entry: IndexEntry) -> None:
        buf = bytearray(max(entry.size, self.pool.slot_bytes))
        try:
            n = await src.call("get", src.backend.get(entry.key.hex(), memoryview(buf)))
        except TierUnavailable:
            return
        if n and await self._put(dst, entry.key, memoryview(buf)[:n]):
            self.stats.inc(DEMOTIONS, 1, dst.name)

    # -- loads -----------------------------------------------------------------------------
    def begin_load(self, keys: Sequence[bytes], timeout: float | None = None) -> list[LoadLease]:
        """Leases for the longest prefix of ``keys`` deliverable now (pinned cpu slots)."""
        keys = list(keys)
        leases: list[LoadLease] = []
        for i, key in enumerate(keys):  # the cpu-resident head needs no I/O
            lease = self._cpu_lease(i, key)
            if lease is None:
                break
            leases.append(lease)
        if len(leases) < len(keys) and self._find_below(keys[len(leases)]) is not None:
            leases += self._fetch_run(keys, len(leases), timeout)
        return leases

    def _find_below(self, key: bytes) -> LowerTier | None:
        for tier in self.tiers:
            if not tier.available:
                continue
            if key in tier.index or (tier.remote is not None and tier.remote.present(key)):
                return tier
        return None

    def _fetch_run(self, keys: list[bytes], start: int, timeout: float | None) -> list[LoadLease]:
        """From ``keys[start]`` on: fetch lower-tier chunks, take cpu hits, stop at a miss."""
        plan: list[tuple[int, bytes, LowerTier | None, int]] = []
        with self._lock:
            for i in range(start, len(keys)):
                key = keys[i]
                if key in self.cpu_index:
                    plan.append((i, key, None, -1))
                    continue
                tier = self._find_below(key)
                slot = self._allocate_slot() if tier is not None else None
                if tier is None or slot is None:
                    break
                plan.append((i, key, tier, slot))
        fetches = [(i, k, t, s) for i, k, t, s in plan if t is not None]
        bound = timeout if timeout is not None else self.config.timeouts.backend_op_s
        run = _FetchRun()
        future = self.loop.submit(self._fetch_all(fetches, run))
        try:
            results = future.result(bound)
        except Exception as exc:  # noqa: BLE001 - a load never raises; TimeoutError included
            if not run.abandon():  # finished in the meantime after all
                results = future.result()
            else:  # the run frees its slots itself once the backends let go of them
                log.debug("load: fetch of %d chunks abandoned: %s", len(fetches), exc)
                return []  # plan starts at the first lower-tier chunk: nothing deliverable
        outcome = {i: r for (i, *_), r in zip(fetches, results, strict=True)}
        return self._promote(plan, outcome)

    async def _fetch_all(self, fetches: list[tuple[int, bytes, LowerTier, int]],
                         run: _FetchRun) -> list[str]:
        results = list(await asyncio.gather(*(self._fetch(k, t, s) for _, k, t, s in fetches)))
        if not run.finish():
            self.pool.free_many(f[3] for f, r in zip(fetches, results, strict=True) if r != GONE)
        return results

    async def _fetch(self, key: bytes, tier: LowerTier, slot: int) -> str:
        """Read one chunk from a lower tier into ``slot`` and verify it: OK, MISS or GONE."""
        out = self.pool.buffer(slot)
        try:
            n = await tier.call("get", tier.backend.get(key.hex(), out))
        except TierUnavailable as exc:
            if isinstance(exc.__cause__, TimeoutError):
                self._quarantine(slot)  # an I/O thread may still be writing into it
                return GONE
            return MISS
        if n is None:
            tier.index.remove([key])
            if tier.remote is not None:
                tier.remote.forget([key])
            self.stats.inc(LOAD_MISSES, 1, tier.name)
            return MISS
        try:
            self._verify(out, n, key)
        except PayloadError as exc:
            await self._reject(tier, key, exc)
            return MISS
        self.stats.inc(BYTES_READ, n, tier.name)
        return OK

    def _quarantine(self, slot: int) -> None:
        """Hold a slot back for ``timeouts.close_s``: a timed-out read may still land in it."""
        asyncio.get_running_loop().call_later(self.config.timeouts.close_s, self.pool.free, slot)

    def _verify(self, out: memoryview, n: int, key: bytes) -> None:
        header = pl.read_header(out[:n])
        if header.compression != "none":  # a backend that stores compressed values as they are
            if pl.HEADER_BYTES + header.raw_len > len(out):
                raise PayloadError(f"payload expands to {header.raw_len} bytes, slot {len(out)}")
            pl.decompress_value(bytes(out[:n]), out)
            n = pl.HEADER_BYTES + header.raw_len
        if n != pl.HEADER_BYTES + self.payload_bytes:
            raise PayloadError(f"payload is {n - pl.HEADER_BYTES} bytes, expected {self.payload_bytes}")
        pl.parse(out[:n], key=key, namespace=self.namespace,
                 shape=self.payload_shape, dtype=self.dtype)

    async def _reject(self, tier: LowerTier, key: bytes, exc: PayloadError) -> None:
        """A bad payload: a miss, deleted from its tier, counted, logged (throttled)."""
        self.stats.inc(CHECKSUM_FAILURES, 1, tier.name)
        suppressed = self._checksum_log.allow(tier.name)
        if suppressed is not None:
            event(log, logging.WARNING, "bad_payload", tier=tier.name, key=key.hex()[:16],
                  error=str(exc), suppressed=suppressed)
        tier.index.remove([key])
        if tier.remote is not None:
            tier.remote.forget([key])
        try:
            await tier.call("delete", tier.backend.delete([key.hex()]))
        except TierUnavailable:
            pass

    def _promote(self, plan: list[tuple[int, bytes, LowerTier | None, int]],
                 outcome: dict[int, str]) -> list[LoadLease]:
        leases: list[LoadLease] = []
        cut = False
        for i, key, tier, slot in plan:
            lease = None
            if not cut:
                lease = self._cpu_lease(i, key) if tier is None else (
                    self._promote_one(i, key, tier, slot) if outcome.get(i) == OK else None)
            if lease is not None:
                leases.append(lease)
                continue
            cut = True
            if tier is not None and outcome.get(i) != GONE:
                self.pool.free(slot)
        return leases

    def _cpu_lease(self, i: int, key: bytes) -> LoadLease | None:
        with self._lock:
            pin = self.cpu_index.pin([key], "load")
            entry = self.cpu_index.get(key)
        if not len(pin) or entry is None:
            pin.release()
            return None
        slot = int(entry.location)
        return LoadLease(key, i, slot, self._payload_view(slot), self.cpu_name, pin)

    def _promote_one(self, i: int, key: bytes, tier: LowerTier, slot: int) -> LoadLease | None:
        with self._lock:
            if not self.cpu_index.insert(key, self.pool.slot_bytes, location=slot):
                return None  # caller frees the slot
            pin = self.cpu_index.pin([key], "load")
        self.stats.inc(PROMOTIONS, 1, tier.name)
        return LoadLease(key, i, slot, self._payload_view(slot), tier.name, pin)

    def end_load(self, leases: Sequence[LoadLease]) -> None:
        """Unpin the slots of finished loads."""
        for lease in leases:
            if lease.pin is not None:
                lease.pin.release()
                lease.pin = None

    # -- state -----------------------------------------------------------------------------
    def tier_states(self) -> dict[str, str]:
        """Breaker state of every lower tier (``closed`` = in service)."""
        return {t.name: t.breaker.state for t in self.tiers}

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for queued write-behind and demotions; False when the bound ran out."""
        bound = timeout if timeout is not None else self.config.timeouts.close_s

        async def _all() -> None:
            for tier in self.tiers:
                await tier.queue.drain()
                await self._process_doomed(tier)

        try:
            self.loop.run(_all(), bound)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        """Drain write-behind (bounded by ``timeouts.close_s``), close backends, free the pool."""
        if self._closed:
            return
        drained = self.drain()
        self._closed = True
        if not drained:
            event(log, logging.WARNING, "close_undrained",
                  pending=sum(t.queue.pending for t in self.tiers))
        for tier in self.tiers:
            try:
                self.loop.run(tier.backend.close(), self.config.timeouts.close_s)
            except Exception as exc:  # noqa: BLE001 - closing must finish
                event(log, logging.WARNING, "tier_close_failed", tier=tier.name, error=str(exc))
            tier.index.close()
        self.loop.stop(self.config.timeouts.close_s)
        self.cpu_index.close()
        self.pool.free_many(int(e.location) for e in self.cpu_index.clear())
        self.pool.close()


def _itemsize(dtype: Any) -> int:
    size = getattr(dtype, "itemsize", None)
    if size is None:
        import torch

        size = torch.empty((), dtype=dtype).element_size()
    return int(size)


def _leading_ones(mask: int, n: int) -> int:
    """How many low bits of ``mask`` are set before the first clear one (at most n)."""
    run = (~mask & (mask + 1)).bit_length() - 1
    return min(run, n)


class _FetchRun:
    """Who frees the slots of a load's fetches: the caller, or the run if the caller gave up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "running"

    def abandon(self) -> bool:
        """Caller timed out: True when the run will free the slots (it has not finished)."""
        with self._lock:
            if self._state == "finished":
                return False
            self._state = "abandoned"
            return True

    def finish(self) -> bool:
        """Run finished: True when the caller still takes the results (and the slots)."""
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "finished"
            return True
