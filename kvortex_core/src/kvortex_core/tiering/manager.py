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
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from kvortex_core.config.backends import backend_options
from kvortex_core.control.index import ChunkIndex
from kvortex_core.control.stats import ALLOC_FAILURES, BYTES_LOADED, BYTES_SAVED, REQUEST_COUNTERS
from kvortex_core.data import payload as pl
from kvortex_core.data.pool import PinnedPool, per_rank_capacity
from kvortex_core.errors import ConfigError, PluginError
from kvortex_core.logs import Throttle, event
from kvortex_core.storage.protocol import BackendContext
from kvortex_core.tiering.breaker import CircuitBreaker
from kvortex_core.tiering.counters import (  # re-exported: the counter names of this layer
    BREAKER_STATE,
    BREAKER_TRANSITIONS,
    BYTES_READ,
    BYTES_WRITTEN,
    CHECKSUM_FAILURES,
    DEMOTIONS,
    DEMOTIONS_SKIPPED,
    LOAD_MISSES,
    LOWER_TIER_COUNTERS,
    LOWER_TIER_HISTOGRAMS,
    PROMOTIONS,
    SAVE_SKIPPED,
    TIER_CALLS_SKIPPED,
    TIER_ERRORS,
    TIER_IN_SERVICE,
    TIER_LATE_WRITES,
    TIER_TIMEOUTS,
    WRITE_BEHIND_SKIPPED,
)
from kvortex_core.tiering.loads import LoadMixin

_BREAKER_CODE = {"closed": 0.0, "open": 1.0, "half_open": 2.0}
from kvortex_core.tiering.loop import LoopThread, WorkQueue
from kvortex_core.tiering.saves import SaveMixin
from kvortex_core.tiering.tiers import (
    STILL_DOWN_EVERY_S,
    LowerTier,
    RemoteCache,
    TierUnavailable,
    log_transition,
)

if TYPE_CHECKING:
    import torch

    from kvortex_core.config.settings import KVortexConfig
    from kvortex_core.control.stats import Stats
    from kvortex_core.plugins.manager import PluginManager

log = logging.getLogger("kvortex_core.tiering")


class TierManager(SaveMixin, LoadMixin):
    """Owns the cpu pool and every tier of one rank; see the module docstring."""

    #: Jobs a lower tier's write-behind queue holds before writes are skipped (and counted).
    WRITE_BEHIND_DEPTH = 256
    #: Concurrent backend writes per tier.
    WRITE_BEHIND_WORKERS = 4
    #: open() + scan() of a tier may take this many times max(backend_op_s, close_s) (engine
    #: start waits only timeouts.open_s for it, the rest runs in the background).
    OPEN_TIMEOUT_FACTOR = 6
    #: How long a shared tier's ``contains`` answer is trusted by ``lookup``.
    REMOTE_CACHE_TTL_S = 2.0

    def __init__(
        self,
        *,
        config: KVortexConfig,
        namespace: bytes,
        payload_shape: tuple[int, ...],
        dtype: torch.dtype,
        stats: Stats,
        pool: PinnedPool,
        cpu_name: str,
    ) -> None:
        self.config = config
        self.namespace = namespace
        self.payload_shape = tuple(int(d) for d in payload_shape)
        self.dtype = dtype
        self.stats = stats
        self.pool = pool
        self.payload_offset = pl.HEADER_BYTES
        self.payload_bytes = math.prod(self.payload_shape) * _itemsize(dtype)
        # Every slot's payload tensor and header bytes, made once: each costs a slice (5-20 us of
        # host time on a GPU VM) that a save into never-used slots would otherwise pay per chunk.
        slots = pool.slots_view()
        self._payload_views = list(slots[:, self.payload_offset:self.payload_offset + self.payload_bytes].unbind(0))
        self._header_views = [memoryview(row) for row in slots[:, :self.payload_offset].numpy()]
        self.cpu_name = cpu_name
        ev = config.eviction
        self.cpu_index = ChunkIndex(
            cpu_name,
            pool.capacity_bytes,
            policy=ev.policy,
            high_watermark=ev.high_watermark,
            evict_ratio=ev.evict_ratio,
            on_evict=self._on_cpu_evict,
            stats=stats,
        )
        stats.declare(counters=REQUEST_COUNTERS)
        stats.declare(cpu_name, counters=(BYTES_SAVED, BYTES_LOADED, SAVE_SKIPPED, ALLOC_FAILURES))
        self.tiers: list[LowerTier] = []
        self.loop = LoopThread()
        # Seals (checksums) of write-behind and demotions run here, not in the loop's default
        # executor, which a third-party backend's blocking calls may fill (a hung one then
        # stopped every seal, and with it every write to the healthy tiers).
        self._seal_pool = ThreadPoolExecutor(2, thread_name_prefix="kvortex-seal")
        self._lock = threading.RLock()
        self._saving: set[bytes] = set()
        #: Notified when keys leave ``_saving`` while someone waits (see ``wait_saving``).
        self._saved = threading.Condition(self._lock)
        self._saving_waiters = 0
        self._demoting = 0
        self._drop_victims = False
        self._demoting_lock = threading.Lock()
        #: cpu chunks being demoted: key -> the slot still holding them (see SaveMixin.rescue).
        self._demoting_keys: dict[bytes, int] = {}
        #: Slots of demoting chunks taken back into the cpu index: their demotion must not free them.
        self._rescued: set[int] = set()
        self._checksum_log = Throttle(10.0)
        self._still_down = Throttle(STILL_DOWN_EVERY_S)  # tier_still_down reminders, per tier
        self._quarantined: set[int] = set()
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        config: KVortexConfig,
        plugins: PluginManager,
        *,
        namespace: bytes,
        payload_shape: tuple[int, ...],
        dtype: torch.dtype,
        stats: Stats,
        rank: int = 0,
        world_size: int = 1,
        pool: PinnedPool | None = None,
        device: int | None = None,
    ) -> TierManager:
        """Build the pool and open every tier (a tier that cannot open starts out of service).

        ``pool``: use this pool (slots of at least ``HEADER_BYTES`` + payload bytes) instead of
        allocating one from the cpu tier's capacity, e.g. a pool the vLLM connector shares with
        its scheduler-assigned slots. ``device``: the CUDA device index the pool serves (its
        pages are placed on that GPU's NUMA node).
        """
        names = config.tier_names
        first = config.tiers[names[0]]
        if first.type != "cpu":
            raise ConfigError(
                f"the first tier {names[0]!r} has type {first.type!r}; it must be 'cpu' (pinned "
                f"host memory), e.g. tiers: {{cpu: {{type: cpu, capacity: 8GiB}}, {names[0]}: ...}}"
            )
        ranks = config.ranks_per_node or world_size
        slot = pl.HEADER_BYTES + math.prod(payload_shape) * _itemsize(dtype)
        if pool is None:
            pool = PinnedPool(
                slot,
                per_rank_capacity(int(first.capacity), ranks, 4096),
                pin=getattr(backend_options(config, names[0], plugins), "pin", None),
                alignment=4096,
                device=device,
                stats=stats,
                name=names[0],
            )
        elif pool.slot_bytes < slot:
            raise ConfigError(
                f"the given pool's slots are {pool.slot_bytes} bytes; a chunk needs {slot} "
                f"({pl.HEADER_BYTES} header + payload): build the pool with slot_bytes >= {slot}"
            )
        mgr = cls(
            config=config,
            namespace=namespace,
            payload_shape=payload_shape,
            dtype=dtype,
            stats=stats,
            pool=pool,
            cpu_name=names[0],
        )
        try:
            for name in names[1:]:
                mgr._add_tier(
                    name,
                    plugins,
                    per_rank_capacity(int(config.tiers[name].capacity), ranks),
                    rank,
                    world_size,
                )
        except BaseException:
            mgr.close()
            raise
        return mgr

    def _add_tier(
        self, name: str, plugins: PluginManager, capacity: int, rank: int, world_size: int,
        label: str | None = None, context: dict[str, Any] | None = None,
    ) -> None:
        tc = self.config.tiers[name]
        name, config_name = label or name, name
        info = plugins.backend(tc.type)
        info.check_dependencies()
        context = BackendContext(
            tier=name, namespace=self.namespace.hex(), rank=rank, world_size=world_size,
            **(context or {}),
        )
        options = backend_options(self.config, config_name, plugins)
        try:
            backend = info.cls(options, capacity=capacity, context=context)
        except Exception as exc:  # a backend's constructor must not connect; one that fails is named
            raise PluginError(
                f"tier {name!r}: backend {tc.type!r} ({info.qualname}, plugin {info.plugin!r}) failed "
                f"to construct: {type(exc).__name__}: {exc}; fix its options or the plugin (a "
                "backend connects in open(), where a failure leaves the tier out of service)"
            ) from exc
        ev, cb = self.config.eviction, self.config.circuit_breaker
        position = len(self.tiers)
        index = ChunkIndex(
            name,
            capacity,
            policy=ev.policy,
            high_watermark=ev.high_watermark,
            evict_ratio=ev.evict_ratio,
            stats=self.stats,
            on_evict=lambda victims: self._on_lower_evict(position, victims),
        )
        breaker = CircuitBreaker(
            name,
            failure_threshold=cb.failure_threshold,
            reset_after_s=cb.reset_after_s,
            on_transition=self._on_transition,
        )
        shared = bool(getattr(info.cls, "shared", False))
        tier = LowerTier(
            name=name,
            backend=backend,
            index=index,
            breaker=breaker,
            stats=self.stats,
            queue=WorkQueue(
                self.loop, name, maxsize=self.WRITE_BEHIND_DEPTH, workers=self.WRITE_BEHIND_WORKERS
            ),
            op_timeout_s=self.config.timeouts.backend_op_s,
            write_through=tc.write_through,
            shared=shared,
            remote=RemoteCache(self.REMOTE_CACHE_TTL_S) if shared else None,
            # Opening may rebuild an index from a large directory (one header read per file).
            open_timeout_s=self.OPEN_TIMEOUT_FACTOR
            * max(self.config.timeouts.backend_op_s, self.config.timeouts.close_s),
        )
        self.tiers.append(tier)
        # 1 while the tier serves, 0 while its breaker is open or half-open (Prometheus gauge).
        self.stats.register_gauge(TIER_IN_SERVICE, lambda: float(breaker.state == "closed"), name)
        # 0 closed, 1 open, 2 half-open: what `kvortex stats` shows as the breaker state.
        self.stats.register_gauge(BREAKER_STATE, lambda: _BREAKER_CODE[breaker.state], name)
        # Timed-out writes still running (each holds a cpu slot; the tier takes no writes past 4).
        self.stats.register_gauge(TIER_LATE_WRITES, lambda: float(tier.late_writes), name)
        self.stats.declare(name, counters=LOWER_TIER_COUNTERS, histograms=LOWER_TIER_HISTOGRAMS)
        self._open_tier(tier)

    def _open_tier(self, tier: LowerTier) -> None:
        """Open ``tier``, waiting at most ``timeouts.open_s``: a tier still opening then (a store
        that does not answer, a large disk directory being scanned) goes on in the background,
        out of service until it opened; one that failed is retried in the background."""
        wait = self.config.timeouts.open_s
        future = self.loop.submit(self._first_open(tier))
        try:
            future.result(wait)
        except TimeoutError:
            # the open's own timeout (done: its message stays) or still opening at ``wait``
            if not future.done() and not tier.opened:
                tier.breaker.force_open(f"still opening after {wait:g} s (timeouts.open_s); "
                                        "in service once it opened")
        except Exception:  # noqa: BLE001,S110 - counted and logged by _first_open
            pass

    async def _first_open(self, tier: LowerTier) -> None:
        try:
            await tier.ensure_open()
        except Exception as exc:  # a tier that cannot start is skipped, not fatal
            self.stats.inc(TIER_ERRORS, 1, tier.name)  # `kvortex stats` shows it as an error
            why = (f"did not open within {tier.open_timeout_s:g} s" if isinstance(exc, TimeoutError)
                   else f"{type(exc).__name__}: {exc}")
            tier.breaker.force_open(f"open failed: {why}")
            self._spawn(self._open_later(tier))
            raise
        if tier.breaker.state != "closed":  # engine start stopped waiting for it: in service now
            tier.breaker.success()

    async def _open_later(self, tier: LowerTier) -> None:
        """Retry opening ``tier`` each time its breaker lets a probe through, until it opens.

        Calls that need the tier probe it too, but lookups only read its index and saves that
        fit the cpu tier never reach it: without this a tier that could not start (a disk
        directory another engine still owned during a rolling restart) stayed out of service.
        """
        task = asyncio.current_task()
        if task is not None:
            self.loop.keep(task)  # stop() cancels it
        while not self._closed and not tier.opened:
            await asyncio.sleep(tier.breaker.reset_after_s)
            if self._closed or tier.opened or not tier.breaker.available:
                continue
            try:
                await tier.call("open", _nothing())
            except TierUnavailable:
                pass  # counted and logged by the tier; the breaker is open again

    def _on_transition(self, name: str, old: str, new: str, error: str) -> None:
        self.stats.inc(BREAKER_TRANSITIONS, 1, name)
        log_transition(name, old, new, error, self._still_down)

    # -- lookups ---------------------------------------------------------------------------
    def contains(self, keys: Sequence[bytes]) -> int:
        """Bitmask over all tiers: bit i set when keys[i] is stored somewhere reachable now."""
        mask = 0
        for _, m in self._tier_masks(list(keys)):
            mask |= m
        return mask

    def _tier_masks(self, keys: list[bytes]) -> list[tuple[str, int]]:
        """Per tier in service, the bitmask of ``keys`` it holds (the cpu tier first)."""
        mask = self.cpu_index.contains(keys)
        if self._demoting_keys:  # on their way down, still in memory: loadable (see rescue)
            demoting = self._demoting_keys
            mask |= sum(1 << i for i, k in enumerate(keys) if k in demoting)
        masks = [(self.cpu_name, mask)]
        for tier in self.tiers:
            if not tier.available:
                continue
            m = tier.index.contains(keys)
            if tier.remote is not None:
                m |= self._remote_mask(tier, keys)
            masks.append((tier.name, m))
        return masks

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Longest prefix of ``keys`` present in any tier; never waits on a shared tier.

        Counts, per tier in service, the chunks asked and those it holds (``lookup_chunks``,
        ``hit_chunks``, ``miss_chunks``).
        """
        keys = list(keys)
        mask = 0
        for name, m in self._tier_masks(keys):
            mask |= m
            self.stats.record_chunks(len(keys), m.bit_count(), name)
        n = _leading_ones(mask, len(keys))
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
            # In the background (a lookup answers from the cache at once): the call gets a whole
            # backend_op_s. Cut at remote_lookup_s (50 ms), a healthy S3 tier's listing timed out,
            # its answer was lost, and the timeouts opened the breaker: the tier out of service.
            found = await tier.call("contains", tier.backend.contains([k.hex() for k in keys]))
        except TierUnavailable:
            tier.remote.give_up(keys)
            return
        if not isinstance(found, list | tuple) or len(found) != len(keys):
            tier._failed("contains", f"backend contains() of {len(keys)} keys returned "
                         f"{type(found).__name__} {str(found)[:40]!r}, not {len(keys)} booleans", TIER_ERRORS)
            tier.remote.give_up(keys)
            return
        tier.remote.record(keys, [bool(f) for f in found])

    def _stored_below(self, key: bytes) -> bool:
        return any(
            key in t.index or (t.remote is not None and t.remote.present(key)) for t in self.tiers
        )

    # -- building blocks for callers that own their cpu slots (the vLLM connector) -----------
    def add_tier(
        self,
        name: str,
        plugins: PluginManager,
        capacity: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        label: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> LowerTier:
        """Open one configured lower tier (``config.tiers[name]``) with this byte capacity.

        ``label``: the tier's name in stats and logs when one configured tier is opened more
        than once (the vLLM scheduler views every rank's directory of a local tier).
        ``context``: more fields of the backend's ``BackendContext`` (``observer``, ``instance``,
        ``engine_id``).
        """
        self._add_tier(name, plugins, capacity, rank, world_size, label, context)
        return self.tiers[-1]

    async def write_value(self, tier: LowerTier, key: bytes, value: Any) -> bool:
        """On the loop: store one sealed value in ``tier`` and its index; False if not stored."""
        return await self._put(tier, key, value)

    def verify(self, out: memoryview, n: int, key: bytes) -> None:
        """Check the ``n``-byte value in ``out`` is this chunk (expanding a compressed one in
        place); raises PayloadError otherwise."""
        self._verify(out, n, key)

    async def reject(self, tier: LowerTier, key: bytes, exc: Exception) -> None:
        """On the loop: count, log and delete a bad value found in ``tier``."""
        await self._reject(tier, key, exc)  # type: ignore[arg-type]

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
        """Drain write-behind (bounded by ``timeouts.close_s``), close backends, free the pool.

        Closing the backends and stopping the loop share one more ``close_s``: a backend that
        hangs (or blocks the loop) costs that once, not once per tier and again at the stop.
        """
        if self._closed:
            return
        drained = self.drain()
        deadline = time.monotonic() + self.config.timeouts.close_s

        def left() -> float:
            return max(deadline - time.monotonic(), 0.05)
        self._closed = True
        if not drained:
            event(
                log,
                logging.WARNING,
                "close_undrained",
                pending=sum(t.queue.pending for t in self.tiers),
            )
        for tier in self.tiers:
            try:
                self.loop.run(tier.backend.close(), left())
            except Exception as exc:  # noqa: BLE001 - closing must finish
                event(log, logging.WARNING, "tier_close_failed", tier=tier.name, error=str(exc))
            tier.index.close()
            self.stats.unregister_gauge(TIER_IN_SERVICE, tier.name)
            self.stats.unregister_gauge(BREAKER_STATE, tier.name)
            self.stats.unregister_gauge(TIER_LATE_WRITES, tier.name)
        self.loop.stop(left())
        self._seal_pool.shutdown(wait=False)
        # Backends are closed and the loop is stopped: no late read can land in these now.
        self.pool.free_many(self._quarantined)
        self._quarantined.clear()
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


__all__ = [
    "BREAKER_TRANSITIONS",
    "BYTES_READ",
    "BYTES_WRITTEN",
    "CHECKSUM_FAILURES",
    "DEMOTIONS",
    "DEMOTIONS_SKIPPED",
    "LOAD_MISSES",
    "PROMOTIONS",
    "SAVE_SKIPPED",
    "TIER_CALLS_SKIPPED",
    "TIER_ERRORS",
    "TIER_IN_SERVICE",
    "TIER_LATE_WRITES",
    "TIER_TIMEOUTS",
    "WRITE_BEHIND_SKIPPED",
    "TierManager",
]


async def _nothing() -> None:
    """The call of a background open probe (``LowerTier.call`` opens the tier first)."""
