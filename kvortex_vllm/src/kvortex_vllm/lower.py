"""The tiers below cpu (disk, redis, s3, plugins) for the connector, over ``TierManager``.

The connector's cpu tier is split: the scheduler owns its index and assigns slots, every rank
owns an identical pool. The lower tiers are exactly the engine's: each rank builds a
:class:`~kvortex_core.tiering.manager.TierManager` over its own pool and uses only its lower
tiers (backend, index, circuit breaker, write-behind queue, eviction below, remote cache), so
failure isolation and capacity handling are the same code as the standalone engine's.

- :class:`WorkerTiers` (per rank): writes a saved slot behind to the lower tiers (from a copy
  taken under a slot generation check, so a slot reused meanwhile is never written half-new),
  and fetches chunks from a lower tier into scheduler-assigned slots, verified end to end.
- :class:`SchedulerTiers` (scheduler process): answers "is this chunk below?" without waiting:
  keys this engine wrote, indexes rebuilt from what earlier runs left (disk), and shared tiers'
  answers from a cache refreshed in the background. A chunk counts only when every rank has it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from kvortex_core.config import KVortexConfig
from kvortex_core.control.keys import rank_keys
from kvortex_core.control.stats import Stats
from kvortex_core.data import payload as pl
from kvortex_core.data.pool import PinnedPool, per_rank_capacity
from kvortex_core.errors import BadValueError, PayloadError
from kvortex_core.logs import event
from kvortex_core.plugins.manager import PluginManager
from kvortex_core.tiering.counters import FILE_CHECKS_GIVEN_UP, WRITE_BEHIND_SKIPPED
from kvortex_core.tiering.manager import TierManager
from kvortex_core.tiering.tiers import TierUnavailable

log = logging.getLogger(__name__)


def has_lower_tiers(config: KVortexConfig) -> bool:
    return len(config.tier_names) > 1


def open_tiers(config: KVortexConfig, namespace: bytes, payload_shape: tuple[int, ...], dtype: torch.dtype,
               pool: PinnedPool, *, rank: int, world_size: int, stats: Stats | None = None,
               every_rank: bool = False, context: dict[str, Any] | None = None) -> TierManager:
    """A TierManager over ``pool`` with every configured lower tier opened (failures isolated).

    ``every_rank`` (the scheduler): a local tier (disk: one directory per rank) is opened once
    per rank, as ``<name>@r<rank>`` beyond rank 0, so its view holds every rank's chunks; as
    an observer (``BackendContext.observer``): the ranks own their directories, the scheduler
    only reads what is there. ``context``: the engine's ``BackendContext`` fields (``instance``
    among data-parallel engines, ``engine_id``).
    """
    own = dict(context or {})
    watch = {**own, "observer": True}
    names = config.tier_names
    mgr = TierManager(config=config, namespace=namespace, payload_shape=payload_shape, dtype=dtype,
                      stats=stats or Stats(), pool=pool, cpu_name=names[0])
    plugins = PluginManager()
    ranks = config.ranks_per_node or world_size
    try:
        for name in names[1:]:
            cap = per_rank_capacity(int(config.tiers[name].capacity), ranks)
            tier = mgr.add_tier(name, plugins, cap, rank=rank, world_size=world_size,
                                context=watch if every_rank else own)
            if every_rank and tier.remote is None:
                for other in range(world_size):
                    if other != rank:
                        mgr.add_tier(name, plugins, cap, rank=other, world_size=world_size,
                                     label=f"{name}@r{other}", context=watch)
    except BaseException:
        mgr.close()
        raise
    return mgr


class WorkerTiers:
    """Write-behind and fetch for one rank (slots are the scheduler's, bytes are this rank's)."""

    def __init__(self, mgr: TierManager, rank: int) -> None:
        self.mgr = mgr
        self.rank = rank
        self.pool = mgr.pool
        self._gen = [0] * mgr.pool.num_slots
        # Slots a timed-out lower-tier read may still write into (a backend's I/O thread cannot
        # be stopped): slot -> reads still running. Touched by the loop thread (a read timing out
        # or ending) and read by the worker thread, which neither saves into such a slot nor
        # loads from it until every late read ended and its magic was zeroed.
        self._late: dict[int, int] = {}
        self._late_lock = threading.Lock()
        targets = [t for t in mgr.tiers if t.write_through]
        self.targets = targets or mgr.tiers[:1]

    def slot_reused(self, slot: int) -> None:
        """A new save goes into ``slot``: any write-behind copy taken across this is discarded."""
        self._gen[slot] += 1

    def busy(self, slot: int) -> bool:
        """True while a timed-out read may still write into ``slot`` (nothing may use it)."""
        with self._late_lock:
            return slot in self._late

    def _late_started(self, slot: int) -> None:
        with self._late_lock:
            self._late[slot] = self._late.get(slot, 0) + 1

    def _late_ended(self, slot: int, out: memoryview) -> None:
        """A timed-out read into ``slot`` ended: what it wrote is nobody's chunk."""
        out[:8] = bytes(8)  # zeroed before the slot is usable again: no load trusts it
        with self._late_lock:
            left = self._late.get(slot, 1) - 1
            if left > 0:
                self._late[slot] = left
            else:
                self._late.pop(slot, None)

    def drop(self, keys: list[bytes]) -> None:
        """Delete these rank keys from every lower tier (bad bytes that were written behind).

        Waits a moment for the deletes (a put of the same key queued later must not find the
        old entry and skip); a put already in flight deletes what it wrote once it sees the
        entry gone. A slow tier is not waited for: the step goes on.
        """
        mgr = self.mgr

        async def run() -> None:
            for tier in mgr.tiers:
                tier.index.remove(keys)
                if tier.remote is not None:
                    tier.remote.record(keys, [False] * len(keys))
                if not tier.available:
                    continue
                try:
                    await tier.call("delete", tier.backend.delete([k.hex() for k in keys]))
                except TierUnavailable:
                    pass  # a later scan or the store's expiry reclaims it; the index forgot it

        future = mgr.loop.submit(run())
        try:
            future.result(timeout=min(mgr.config.timeouts.backend_op_s, 0.25))
        except concurrent.futures.TimeoutError:
            log.warning("rank %d: deleting %d chunk(s) from the lower tiers is still running", self.rank, len(keys))
        except Exception:
            log.exception("rank %d: deleting %d chunk(s) from the lower tiers failed", self.rank, len(keys))

    def write_behind(self, slot: int, key: bytes) -> None:
        """Queue the sealed slot (its rank key is ``key``) to the write-behind tiers."""
        gen = self._gen[slot]
        for tier in self.targets:
            # out of service, or 4 timed-out writes still running (each holds a copy of its
            # chunk until its I/O thread ends); checked again when the job runs: writes queued
            # before it may have timed out meanwhile (a burst into a hung tier)
            if tier.refuses_write_behind():
                continue

            async def job(tier: Any = tier) -> None:
                if tier.refuses_write_behind():
                    return
                value = self._snapshot(slot, gen, key)
                if value is not None:
                    await self.mgr.write_value(tier, key, value)

            if not tier.queue.offer(job):
                log.debug("rank %d: write-behind queue of %s is full; chunk skipped", self.rank, tier.name)
                self.mgr.stats.inc(WRITE_BEHIND_SKIPPED, 1, tier.name)

    def _snapshot(self, slot: int, gen: int, key: bytes) -> bytearray | None:
        """A consistent copy of the slot as a stored value (header with its payload checksum)."""
        mgr = self.mgr
        total = pl.HEADER_BYTES + mgr.payload_bytes
        value = bytearray(self.pool.buffer(slot)[:total])
        if self._gen[slot] != gen:
            return None  # rewritten while we copied
        pl.seal(value, key=key, namespace=mgr.namespace, shape=mgr.payload_shape, dtype=mgr.dtype,
                payload_len=mgr.payload_bytes)
        return value

    def fetch(self, items: Sequence[tuple[bytes, int]]) -> concurrent.futures.Future[list[bool]]:
        """Read each ``(rank key, slot)`` from the first lower tier that has it, verified."""
        return self.mgr.loop.submit(self._fetch_all(list(items)))

    async def _fetch_all(self, items: list[tuple[bytes, int]]) -> list[bool]:
        return list(await asyncio.gather(*(self._fetch(k, s) for k, s in items)))

    async def _fetch(self, key: bytes, slot: int) -> bool:
        if self.busy(slot):  # an earlier timed-out read may still write there
            return False
        out = self.pool.buffer(slot)
        if await self._fetch_into(key, slot, out):
            return True
        # Whatever a failed read left there (a header that names this key over bad bytes) must
        # never pass a later load's identity check: zero the magic, as a slot being rewritten.
        out[:8] = bytes(8)
        return False

    async def _fetch_into(self, key: bytes, slot: int, out: memoryview) -> bool:
        mgr = self.mgr
        for tier in mgr.tiers:
            if not tier.available:
                continue
            try:
                n = await tier.call("get", tier.backend.get(key.hex(), out),
                                    on_late=lambda: self._late_ended(slot, out))
            except TierUnavailable as exc:
                if isinstance(exc.__cause__, TimeoutError):
                    # The read goes on in its thread: no other tier may write here too, and
                    # the slot stays unusable on this rank until it ended (see busy()).
                    self._late_started(slot)
                    return False
                if isinstance(exc.__cause__, BadValueError):  # not a payload: deleted, as bad bytes
                    await mgr.reject(tier, key, PayloadError(f"stored value unusable: {exc.__cause__}"))
                continue
            if n is None:
                continue
            try:
                mgr.verify(out, n, key)
            except PayloadError as exc:
                await mgr.reject(tier, key, exc)
                continue
            return True
        return False

    def close(self) -> None:
        self.mgr.close()  # drains (bounded by close_s) first: a drain here too waited 2 x close_s


class _FileLooks:
    """A local tier's file checks (``files_present``, a stat per key) on a daemon thread of their
    own, each waited for at most ``wait_s``: a stat on a hung mount (a stalled NFS server, a dying
    disk) blocks that thread, never the vLLM scheduler, and never the interpreter's exit.

    While a check given up on still runs, the tier answers nothing (``None``) without starting
    another, so a hung mount costs one thread, not one per step.
    """

    def __init__(self, tier: str, check: Any, wait_s: float, stats: Stats | None) -> None:
        self.tier, self.check, self.wait_s, self.stats = tier, check, wait_s, stats
        self._jobs: queue.SimpleQueue[tuple[list[str], concurrent.futures.Future[list[bool]]] | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None
        self._stuck: concurrent.futures.Future[list[bool]] | None = None
        self._stuck_since = 0.0
        self._done_at = 0.0  # when the thread last finished a check

    def __call__(self, hex_keys: list[str]) -> list[bool] | None:
        """Each key's file there now, or None when the tier did not answer in time."""
        if self._stuck is not None:
            if not self._stuck.done():
                return None
            event(log, logging.WARNING, "file_check_recovered", tier=self.tier,
                  seconds=round(self._done_at - self._stuck_since, 3))
            self._stuck = None
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kvortex-files-{self.tier}", daemon=True)
            self._thread.start()
        fut: concurrent.futures.Future[list[bool]] = concurrent.futures.Future()
        self._jobs.put((hex_keys, fut))
        try:
            return fut.result(self.wait_s)
        except concurrent.futures.TimeoutError:
            self._stuck, self._stuck_since = fut, time.monotonic() - self.wait_s
            if self.stats is not None:
                self.stats.inc(FILE_CHECKS_GIVEN_UP, 1, self.tier)
            event(log, logging.WARNING, "file_check_slow", tier=self.tier, waited_s=self.wait_s,
                  hint="a stat in this tier's directory did not return (a hung network mount or disk?); "
                       "its chunks count as not stored until it does")
            return None
        except Exception as exc:  # noqa: BLE001 - a plugin's check failing is a miss, not a crash
            event(log, logging.DEBUG, "file_check_failed", tier=self.tier, error=repr(exc))
            return None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            keys, fut = job
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(list(self.check(keys)))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                    fut.set_exception(exc)
            self._done_at = time.monotonic()

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)  # a thread stuck in a stat is a daemon: it ends with the process


class SchedulerTiers:
    """The scheduler's non-blocking view of what the lower tiers hold, for every rank."""

    #: Where every lower tier is shared (each answers ``contains``), how long our own queued
    #: write counts as stored before the tiers' own answers decide: the time for it to land.
    #: After that a store that refused it (full, no eviction), expired it (ttl) or evicted it
    #: answers absent, and the chunk is no longer promised (a red-team finding: with vLLM's
    #: ``kv_load_failure_policy`` "fail" each such promise failed a request).
    SHARED_WRITE_GRACE_S = 1.0
    #: How long a chunk whose files were found on every rank is trusted without another look
    #: (a request waiting for KV blocks is asked about every step; a stat costs 5-15 us).
    FILE_CHECK_TTL_S = 1.0

    def __init__(self, mgr: TierManager, tp_size: int, max_keys: int, *, file_check_s: float = 0.05,
                 stats: Stats | None = None) -> None:
        self.mgr = mgr
        self.tp_size = tp_size
        self.written: OrderedDict[bytes, float] = OrderedDict()  # key -> when its write was queued
        self.max_keys = max(max_keys, 1)
        self.all_shared = bool(mgr.tiers) and all(t.remote is not None for t in mgr.tiers)
        self._checked: OrderedDict[bytes, float] = OrderedDict()  # key -> when found on every rank
        # a local tier's file checks, off this thread (``file_check_s``: how long one may take)
        self.file_check_s, self._stats = file_check_s, stats
        self._looks: dict[str, _FileLooks] = {}

    def note_written(self, key: bytes) -> None:
        """This engine queued ``key`` for write-behind (optimistic: where every lower tier is
        shared, only for ``SHARED_WRITE_GRACE_S``; with a local tier, only once its files are
        there, see :meth:`present`)."""
        self.written[key] = time.monotonic()
        self.written.move_to_end(key)
        while len(self.written) > self.max_keys:
            self.written.popitem(last=False)

    def forget(self, keys: Sequence[bytes], *, load_failed: bool = False) -> None:
        """A load of these chunks failed (or they were dropped): promise none of them again until
        they are written anew (a file deleted below stayed in the start-up view for ever).
        ``load_failed``: a shared tier's expired answers are not trusted for a while either."""
        for k in keys:
            self.written.pop(k, None)
            self._checked.pop(k, None)
        for rank in range(self.tp_size):
            rk = rank_keys(keys, rank)
            for tier in self.mgr.tiers:
                tier.index.remove(rk)
                if tier.remote is not None:
                    tier.remote.forget(rk)
                    if load_failed:  # this store may be down: its old answers are suspect
                        tier.remote.distrust()

    def present(self, keys: Sequence[bytes], wanted: Sequence[bool] | None = None) -> list[bool]:
        """Per key: below on every rank (never waits; shared tiers answer from their cache).

        ``wanted``: the keys whose answer counts (the caller's leading run: not in the cpu
        tier). Those a local tier is to serve are checked on disk, in order, up to the first
        one below on no rank: the ranks evict their directories (a full disk tier evicts from
        its high watermark down), which neither the view's start-up scan nor our list of
        queued writes learns; each such promise was an async load bound to fail, and under
        vLLM's ``kv_load_failure_policy`` "fail" a failed request (a red-team finding).
        """
        mask = (1 << len(keys)) - 1
        for rank in range(self.tp_size):
            mask &= self.mgr.contains(rank_keys(keys, rank))
        # Our own queued writes count only while some lower tier is in service: with every
        # one down they never land, and each claimed hit would be an async load bound to fail.
        # In service means closed: a tier out of service long enough for its next probe is
        # "available", yet until that probe succeeds its writes still fail (CI caught a second
        # server promising writes to a disk directory another server owned, in that window).
        written = self.written if any(t.in_service for t in self.mgr.tiers) else {}
        now = time.monotonic()
        if self.all_shared:
            young = now - self.SHARED_WRITE_GRACE_S
            return [bool(mask >> i & 1) or written.get(k, young) > young for i, k in enumerate(keys)]
        out = [k in written or bool(mask >> i & 1) for i, k in enumerate(keys)]
        todo = []  # the keys whose files are looked at: one look per local tier for all of them
        for i, k in enumerate(keys):
            if wanted is not None and not wanted[i]:
                continue  # in the cpu tier: this answer does not count
            if not out[i]:
                if wanted is not None:
                    break  # the caller's run ends here: later answers do not count
                continue
            if self._checked.get(k, 0.0) <= now - self.FILE_CHECK_TTL_S:
                todo.append(i)  # not found on every rank a moment ago
        held = self._on_every_rank([keys[i] for i in todo]) if todo else []
        for i, ok in zip(todo, held, strict=True):
            k = keys[i]
            if ok:
                self._checked[k] = now
                self._checked.move_to_end(k)
                while len(self._checked) > self.max_keys:
                    self._checked.popitem(last=False)
                continue
            out[i] = False
            self.written.pop(k, None)
            if wanted is not None:
                break  # the caller's run ends here: later answers do not count
        return out

    def _on_every_rank(self, keys: list[bytes]) -> list[bool]:
        """Per key: whether some lower tier in service holds it for each rank: a shared one by
        its cached answer, a local one by its file (a stat, on that tier's own thread, see
        :class:`_FileLooks`; a local plugin without ``files_present`` by its index). A file
        found gone is dropped from that tier's view; a tier that did not answer in time holds
        nothing this time, and its view is kept."""
        alive = list(range(len(keys)))  # held on every rank so far
        for rank in range(self.tp_size):
            rks = rank_keys(keys, rank)
            want = alive  # not found for this rank yet
            for tier in self.mgr.tiers:
                if not want:
                    break
                if not tier.in_service:
                    continue
                looks = self._file_looks(tier)
                if tier.remote is not None:
                    held = [tier.remote.present(rks[j]) for j in want]
                elif looks is not None:
                    answer = looks([rks[j].hex() for j in want])
                    if answer is None:
                        continue
                    held = answer
                    tier.index.remove([rks[j] for j, h in zip(want, held, strict=True) if not h])
                else:
                    held = [rks[j] in tier.index for j in want]
                want = [j for j, h in zip(want, held, strict=True) if not h]
            if want:
                gone = set(want)
                alive = [j for j in alive if j not in gone]
            if not alive:
                break
        ok = set(alive)
        return [j in ok for j in range(len(keys))]

    def _file_looks(self, tier: Any) -> _FileLooks | None:
        looks = self._looks.get(tier.name)
        if looks is None and tier.remote is None and getattr(tier.backend, "files_present", None) is not None:
            # the method looked up at each call: a test or plugin may swap it on the class
            looks = self._looks[tier.name] = _FileLooks(
                tier.name, lambda keys: tier.backend.files_present(keys), self.file_check_s, self._stats)
        return looks

    def unknown(self, key: bytes) -> bool:
        """True while some shared tier has no fresh answer about ``key`` on every rank."""
        for tier in self.mgr.tiers:
            if tier.remote is None or not tier.available:
                continue
            for k in rank_keys([key], 0) + rank_keys([key], self.tp_size - 1):
                if not tier.remote.fresh(k):
                    return True
        return False

    def close(self) -> None:
        for looks in self._looks.values():
            looks.close()
        self.mgr.close()


def scheduler_tiers(config: KVortexConfig, namespace: bytes, payload_shape: tuple[int, ...], dtype: torch.dtype,
                    slot_bytes: int, tp_size: int, context: dict[str, Any] | None = None,
                    stats: Stats | None = None) -> SchedulerTiers | None:
    """Lower-tier lookups for the scheduler, or None when only the cpu tier is configured.
    ``stats``: where it counts the file checks it gave up on (a hung mount)."""
    if not has_lower_tiers(config):
        return None
    # The TierManager needs a pool; the scheduler never moves bytes: one small pageable slot.
    pool = PinnedPool(slot_bytes, slot_bytes, pin=False, alignment=128, name="scheduler")
    mgr = open_tiers(config, namespace, payload_shape, dtype, pool, rank=0, world_size=tp_size, every_rank=True,
                     context=context)
    cap = sum(int(config.tiers[n].capacity) for n in config.tier_names[1:])
    return SchedulerTiers(mgr, tp_size, cap // slot_bytes, file_check_s=config.timeouts.remote_lookup_s,
                          stats=stats)
