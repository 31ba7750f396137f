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
from kvortex_core.logs import Throttle, event
from kvortex_core.plugins.manager import PluginManager
from kvortex_core.tiering.counters import FILE_CHECKS_GIVEN_UP, WRITE_BEHIND_SKIPPED
from kvortex_core.tiering.manager import TierManager
from kvortex_core.tiering.tiers import TierUnavailable

log = logging.getLogger(__name__)


def has_lower_tiers(config: KVortexConfig) -> bool:
    return len(config.tier_names) > 1


def open_tiers(config: KVortexConfig, namespace: bytes, payload_shape: tuple[int, ...], dtype: torch.dtype,
               pool: PinnedPool, *, rank: int, world_size: int, stats: Stats | None = None,
               every_rank: bool = False, context: dict[str, Any] | None = None,
               tier_ranks: dict[str, int] | None = None) -> TierManager:
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
            if tier.remote is None and tier_ranks is not None:
                tier_ranks[tier.name] = rank
            if every_rank and tier.remote is None:
                for other in range(world_size):
                    if other != rank:
                        view = mgr.add_tier(name, plugins, cap, rank=other, world_size=world_size,
                                            label=f"{name}@r{other}", context=watch)
                        if tier_ranks is not None:
                            tier_ranks[view.name] = other
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


class _Look:
    """One look at a tier's files: its answers so far, in key order (appended by the look thread)."""

    __slots__ = ("answers", "done", "done_at", "error", "keys", "stop_at_missing")

    def __init__(self, keys: list[str], stop_at_missing: bool) -> None:
        self.keys, self.stop_at_missing = keys, stop_at_missing
        self.answers: list[bool] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.done_at = 0.0


class _FileLooks:
    """A local tier's file checks (``files_present``, a stat per key) on a daemon thread of its
    own: a stat on a hung mount (a stalled NFS server, a dying disk) blocks that thread, never the
    vLLM scheduler, and never the interpreter's exit.

    The thread answers in batches of :attr:`BATCH` keys, in order, and a waiter past its deadline
    uses the answers so far: a slow but working mount still serves the leading chunks, and the
    answers that come in after the deadline serve the next looks for :attr:`LATE_ANSWERS_S`, so
    the run grows step by step. While a look given up on still runs, the tier starts no other
    one: a hung mount costs one thread, not one per step.
    """

    BATCH = 16
    #: At most one ``file_check_slow`` (or ``file_check_failed``) WARNING per tier this often.
    WARN_EVERY_S = 300.0
    #: How long the answers of a look that finished after its deadline serve later looks (as
    #: ``SchedulerTiers.FILE_CHECK_TTL_S`` trusts a chunk found), and how many are kept.
    LATE_ANSWERS_S = 1.0
    MAX_LATE_ANSWERS = 1 << 16

    def __init__(self, tier: str, check: Any, stats: Stats | None) -> None:
        self.tier, self.check, self.stats = tier, check, stats
        self._jobs: queue.SimpleQueue[_Look | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stuck: _Look | None = None
        self._stuck_since = 0.0
        self._warned = False  # the stuck look's file_check_slow went out at WARNING
        self._throttle = Throttle(self.WARN_EVERY_S)
        self._late: OrderedDict[str, tuple[bool, float]] = OrderedDict()  # key -> (answer, when)

    def submit(self, hex_keys: list[str], stop_at_missing: bool) -> _Look | None:
        """Start a look (None while an earlier one given up on still runs)."""
        stuck = self._stuck
        if stuck is not None:
            if not stuck.done.is_set():
                return None
            event(log, logging.WARNING if self._warned else logging.DEBUG, "file_check_recovered",
                  tier=self.tier, seconds=round(stuck.done_at - self._stuck_since, 3))
            self._stuck = None
            self._keep_late(stuck)
        look = _Look(hex_keys, stop_at_missing)
        if self._late:  # the leading keys a late look answered a moment ago: no stat again
            fresh = time.monotonic() - self.LATE_ANSWERS_S
            for k in hex_keys:
                hit = self._late.get(k)
                if hit is None or hit[1] < fresh:
                    break
                look.answers.append(hit[0])
                if stop_at_missing and not hit[0]:
                    break
            if len(look.answers) == len(hex_keys) or (look.answers and stop_at_missing and not look.answers[-1]):
                look.done_at = time.monotonic()
                look.done.set()
                return look
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kvortex-files-{self.tier}", daemon=True)
            self._thread.start()
        self._jobs.put(look)
        return look

    def _keep_late(self, look: _Look) -> None:
        """Keep a look's answers that came in after its deadline, for the next looks: a mount
        slower than the deadline then still serves a run longer than one look's worth."""
        late = self._late
        for k, found in zip(look.keys, look.answers, strict=False):
            late[k] = (found, look.done_at)
            late.move_to_end(k)
        while len(late) > self.MAX_LATE_ANSWERS:
            late.popitem(last=False)

    def settle(self, look: _Look, started: float) -> list[bool]:
        """The look's answers once its waiter's deadline passed (a prefix when it still runs)."""
        answers = look.answers[:]  # the thread only appends: a consistent prefix
        if not look.done.is_set():
            self._stuck, self._stuck_since = look, started
            if self.stats is not None:
                self.stats.inc(FILE_CHECKS_GIVEN_UP, 1, self.tier)
            skipped = self._throttle.allow("slow")
            self._warned = skipped is not None
            event(log, logging.WARNING if self._warned else logging.DEBUG, "file_check_slow", tier=self.tier,
                  waited_s=round(time.monotonic() - started, 3), answered=f"{len(answers)}/{len(look.keys)}",
                  not_logged=skipped or 0,
                  hint="stats in this tier's directory did not return in time (a hung or slow network "
                       "mount?); chunks not answered for count as not stored this time")
        elif look.error is not None:
            skipped = self._throttle.allow("failed")
            event(log, logging.WARNING if skipped is not None else logging.DEBUG, "file_check_failed",
                  tier=self.tier, error=repr(look.error), not_logged=skipped or 0,
                  hint="the tier's files_present raised or answered the wrong number of keys; chunks "
                       "not answered for count as not stored")
        return answers

    def _run(self) -> None:
        while (look := self._jobs.get()) is not None:
            try:
                keys = look.keys
                for i in range(len(look.answers), len(keys), self.BATCH):
                    part = keys[i:i + self.BATCH]
                    got = [bool(x) for x in self.check(part)]
                    if len(got) != len(part):
                        raise ValueError(f"files_present answered {len(got)} keys for {len(part)}")
                    look.answers.extend(got)
                    if look.stop_at_missing and not all(got):
                        break  # the caller's run ends at that key
            except BaseException as exc:  # noqa: BLE001 - reported by settle()
                look.error = exc
            look.done_at = time.monotonic()
            look.done.set()

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
                 stats: Stats | None = None, tier_ranks: dict[str, int] | None = None) -> None:
        self.mgr = mgr
        self.tp_size = tp_size
        self.written: OrderedDict[bytes, float] = OrderedDict()  # key -> when its write was queued
        self.max_keys = max(max_keys, 1)
        self.all_shared = bool(mgr.tiers) and all(t.remote is not None for t in mgr.tiers)
        self._checked: OrderedDict[bytes, float] = OrderedDict()  # key -> when found on every rank
        # a local tier's file checks, off this thread; ``file_check_s``: how long one lookup
        # waits for them all; ``tier_ranks``: the rank whose directory each local tier views
        # (a rank's chunk is looked for there only; None: in every local tier)
        self.file_check_s, self._stats = file_check_s, stats
        self._tier_ranks = tier_ranks
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
        held = self._on_every_rank([keys[i] for i in todo], ordered=wanted is not None) if todo else []
        for i, ok in zip(todo, held, strict=True):
            k = keys[i]
            if ok:
                self._checked[k] = now
                self._checked.move_to_end(k)
                while len(self._checked) > self.max_keys:
                    self._checked.popitem(last=False)
                continue
            out[i] = False
            if ok is False:  # found missing on some rank (not merely unanswered): our write is gone
                self.written.pop(k, None)
            if wanted is not None:
                break  # the caller's run ends here: later answers do not count
        return out

    def _on_every_rank(self, keys: list[bytes], *, ordered: bool) -> list[bool | None]:
        """Per key: True when some lower tier in service holds it for every rank, False when on
        some rank every tier answered and none holds it, None when that is not known this time.

        A shared tier answers from its cache, a local plugin without ``files_present`` from its
        index, a local tier by its files: one look per tier (each rank's directory its own tier,
        on its own thread, see :class:`_FileLooks`), all started at once and waited for with one
        deadline, ``file_check_s`` (answers in by then count; the rest are unknown). ``ordered``:
        the caller's run ends at its first key not held, so a look stops at its first missing
        file. A file found gone is dropped from that tier's view.
        """
        n, tp = len(keys), self.tp_size
        rks = [rank_keys(keys, r) for r in range(tp)]
        held = [[False] * n for _ in range(tp)]
        unanswered = [[False] * n for _ in range(tp)]
        started = time.monotonic()
        looks = []
        for tier in self.mgr.tiers:
            if not tier.in_service:
                continue
            own = None if tier.remote is not None or self._tier_ranks is None else self._tier_ranks.get(tier.name)
            files = self._file_looks(tier)
            for r in range(tp) if own is None else (own,):
                h, rk = held[r], rks[r]
                if tier.remote is not None:
                    for j in range(n):
                        h[j] = h[j] or tier.remote.present(rk[j])
                elif files is None:
                    for j in range(n):
                        h[j] = h[j] or rk[j] in tier.index
                else:
                    look = files.submit([k.hex() for k in rk], ordered)
                    if look is None:  # an earlier look still hangs: nothing known here
                        unanswered[r] = [True] * n
                    else:
                        looks.append((r, tier, files, look))
        deadline = started + self.file_check_s
        for r, tier, files, look in looks:
            look.done.wait(max(0.0, deadline - time.monotonic()))
            answers = files.settle(look, started)
            h, rk = held[r], rks[r]
            gone = []
            for j, found in enumerate(answers):
                if found:
                    h[j] = True
                else:
                    gone.append(rk[j])
            tier.index.remove(gone)
            u = unanswered[r]
            for j in range(len(answers), n):
                u[j] = True
        out: list[bool | None] = []
        for j in range(n):
            if all(held[r][j] for r in range(tp)):
                out.append(True)
            elif any(not held[r][j] and not unanswered[r][j] for r in range(tp)):
                out.append(False)
            else:
                out.append(None)
        return out

    def _file_looks(self, tier: Any) -> _FileLooks | None:
        looks = self._looks.get(tier.name)
        if looks is None and tier.remote is None and getattr(tier.backend, "files_present", None) is not None:
            # the method looked up at each call: a test or plugin may swap it on the class
            looks = self._looks[tier.name] = _FileLooks(
                tier.name, lambda keys: tier.backend.files_present(keys), self._stats)
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
    ranks: dict[str, int] = {}
    mgr = open_tiers(config, namespace, payload_shape, dtype, pool, rank=0, world_size=tp_size, every_rank=True,
                     context=context, tier_ranks=ranks)
    cap = sum(int(config.tiers[n].capacity) for n in config.tier_names[1:])
    return SchedulerTiers(mgr, tp_size, cap // slot_bytes, file_check_s=config.timeouts.remote_lookup_s,
                          stats=stats, tier_ranks=ranks)
