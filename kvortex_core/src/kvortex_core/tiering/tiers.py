"""One lower tier as the TierManager sees it: backend + index + breaker + queue + remote cache.

Every backend call goes through :meth:`LowerTier.call`: skipped while the breaker is open, bounded
by a timeout, and its failure counted (never raised past the TierManager).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from kvortex_core.errors import BackendFullError, BadValueError
from kvortex_core.logs import Throttle, event
from kvortex_core.tiering.counters import (
    TIER_CALLS_SKIPPED,
    TIER_ERRORS,
    TIER_OP_SECONDS,
    TIER_TIMEOUTS,
    TIER_WRITES_REFUSED,
    WRITE_BEHIND_SKIPPED,
)

if TYPE_CHECKING:
    from kvortex_core.control.index import ChunkIndex, IndexEntry
    from kvortex_core.control.stats import Stats
    from kvortex_core.storage.protocol import StorageBackend
    from kvortex_core.tiering.breaker import CircuitBreaker
    from kvortex_core.tiering.loop import WorkQueue

log = logging.getLogger("kvortex_core.tiering")
T = TypeVar("T")



#: Timed-out writes still running that a tier may have before it takes no more writes.
MAX_LATE_WRITES = 4


class TierUnavailable(Exception):
    """The call was not made or failed; the caller treats it as a miss / a skipped write."""

    #: The call timed out and was left to finish: it may still read or write the caller's
    #: buffer until its ``on_late`` runs (``LowerTier.call``).
    still_running: bool = False


@dataclass(eq=False)
class LowerTier:
    """A tier below cpu."""

    name: str
    backend: StorageBackend
    index: ChunkIndex
    breaker: CircuitBreaker
    queue: WorkQueue
    stats: Stats
    op_timeout_s: float
    write_through: bool
    shared: bool = False
    remote: RemoteCache | None = None
    doomed: list[IndexEntry] = field(default_factory=list)
    #: Keys evicted here whose delete failed: retried with the next deletes (a store that keeps
    #: them charges them to this instance's capacity until they are gone).
    undeleted: list[bytes] = field(default_factory=list)
    #: Keys indexed here whose put has not landed yet (a read of one finds nothing, for now).
    putting: set[bytes] = field(default_factory=set)
    #: Writes here that timed out and still run (their I/O thread cannot be stopped): each
    #: holds its cpu slot until it ends, so past ``MAX_LATE_WRITES`` the tier takes no more.
    late_writes: int = 0
    open_timeout_s: float = 60.0
    opened: bool = False
    #: The open in progress (one at a time: a probe while the first open still runs waits for it).
    opening: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Open the backend and rebuild the index from its ``scan()`` (once)."""
        await self.backend.open()
        for key, size in await self.backend.scan() or ():
            try:
                self.index.insert(bytes.fromhex(key), size)
            except ValueError:
                continue  # not one of our keys
        self.opened = True

    async def ensure_open(self) -> None:
        """Open once; a call while an open runs waits for that one (never two opens at once).

        The open is shielded: a caller that gives up (``open_timeout_s``, engine start's
        ``timeouts.open_s``) leaves it running, and the next caller waits for the same one.
        """
        if self.opened:
            return
        if self.opening is None or (self.opening.done() and not self.opened):
            self.opening = asyncio.ensure_future(self.open())
            self.opening.add_done_callback(_retrieve)
        await asyncio.wait_for(asyncio.shield(self.opening), self.open_timeout_s)

    async def call(self, op: str, awaitable: Awaitable[T], timeout: float | None = None, *,
                   on_late: Callable[[], None] | None = None) -> T:
        """Run one backend call under the breaker and a timeout; TierUnavailable on failure.

        A tier that could not open at start is opened by its first allowed call (the probe).
        ``on_late``: on a timeout the call is not cancelled but left to finish, and ``on_late``
        runs once it did (a read into a buffer: a backend's I/O thread cannot be stopped, so the
        buffer may be reused only after that).
        """
        if not self.breaker.allow():
            _close(awaitable)
            self.stats.inc(TIER_CALLS_SKIPPED, 1, self.name)
            raise TierUnavailable(f"tier {self.name} is out of service")
        task: asyncio.Future[T] | None = None
        start = time.perf_counter()
        try:
            if not self.opened:
                await self.ensure_open()
            if on_late is None:
                result = await asyncio.wait_for(awaitable, timeout or self.op_timeout_s)
            else:
                task = asyncio.ensure_future(awaitable)
                result = await asyncio.wait_for(asyncio.shield(task), timeout or self.op_timeout_s)
        except (BackendFullError, BadValueError) as exc:
            self.breaker.success()  # the tier answered; this value just does not fit
            if isinstance(exc, BackendFullError):
                self.stats.inc(TIER_WRITES_REFUSED, 1, self.name)
            raise TierUnavailable(str(exc)) from exc
        except TimeoutError as exc:
            timed_out = TierUnavailable(f"tier {self.name}: {op} timed out")
            if task is not None and on_late is not None:
                task.add_done_callback(lambda t: _settled(t, on_late))
                timed_out.still_running = True
            else:
                _close(awaitable)
            self._failed(op, f"{op} timed out", TIER_TIMEOUTS)
            raise timed_out from exc
        except Exception as exc:
            _close(awaitable)
            self._failed(op, f"{type(exc).__name__}: {exc}", TIER_ERRORS)
            raise TierUnavailable(f"tier {self.name}: {op} failed: {exc}") from exc
        finally:  # failures and timeouts too: a slow tier shows in its latency histogram
            self.stats.observe(TIER_OP_SECONDS.format(op=op), time.perf_counter() - start, self.name)
        self.breaker.success()
        return result

    def _failed(self, op: str, detail: str, counter: str) -> None:
        self.stats.inc(counter, 1, self.name)
        log.debug("tier %s: %s failed: %s", self.name, op, detail)
        self.breaker.failure(detail)

    @property
    def available(self) -> bool:
        """A call would be let through now (in service, or out of it long enough for a probe)."""
        return self.breaker.available

    @property
    def takes_writes(self) -> bool:
        """A write would be let through (:attr:`available`) and the tier's timed-out writes still
        running are few: a tier whose writes hang would otherwise pin one more cpu slot with
        every write (and every probe), until none was left for saves or loads."""
        return self.late_writes < MAX_LATE_WRITES and self.available

    def refuses_write_behind(self) -> bool:
        """True, counted in ``write_behind_skipped``, when a write-behind copy may not start now
        (:attr:`takes_writes` is false); False when it may."""
        if self.takes_writes:
            return False
        self.stats.inc(WRITE_BEHIND_SKIPPED, 1, self.name)
        return True

    @property
    def in_service(self) -> bool:
        """The tier serves: its breaker is closed (not out of service, nor being probed)."""
        return self.breaker.state == "closed"


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a background task's outcome as seen (its caller reports it, or gave up waiting)."""
    if not task.cancelled():
        task.exception()


def _settled(task: asyncio.Future[Any], then: Callable[[], None]) -> None:
    """A late call finished: retrieve its outcome (no "never retrieved" warning), run ``then``."""
    _retrieve(task)
    then()


def _close(awaitable: Awaitable[Any]) -> None:
    close = getattr(awaitable, "close", None)
    if close is not None:
        close()  # a coroutine never awaited would warn


class RemoteCache:
    """Recent answers of a shared tier's ``contains``, so lookups never wait on the network.

    ``mask`` answers from the cache at once and asks the loop to refresh keys it does not know
    or knows only from an expired answer; the next lookup sees the result.
    """

    def __init__(self, ttl_s: float, max_keys: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._known: dict[bytes, tuple[bool, float]] = {}
        self._wanted: set[bytes] = set()
        #: Until then an expired "present" answer does not count (see :meth:`distrust`).
        self._distrust_until = 0.0

    def mask(self, keys: Sequence[bytes]) -> tuple[int, list[bytes]]:
        """(bitmask of keys known present, keys to refresh).

        An expired "present" answer still counts while its refresh is on its way, unless the
        tier lately failed a refresh or a load (:meth:`distrust`): a store that went down kept
        being promised from answers it gave before (a red-team finding: each promise a failed
        load, and under vLLM's ``kv_load_failure_policy`` "fail" a failed request)."""
        now, mask, stale = time.monotonic(), 0, []
        trust_expired = now >= self._distrust_until
        for i, k in enumerate(keys):
            hit = self._known.get(k)
            if hit is None or hit[1] < now:
                stale.append(k)
            if hit is not None and hit[0] and (trust_expired or hit[1] >= now):
                mask |= 1 << i
        fresh = [k for k in stale if k not in self._wanted]
        self._wanted.update(fresh)
        return mask, fresh

    def record(self, keys: Sequence[bytes], present: Sequence[bool]) -> None:
        if len(self._known) > self.max_keys:
            self._known.clear()  # bounded memory; a cold cache only costs background lookups
        expires = time.monotonic() + self.ttl_s
        for k, p in zip(keys, present, strict=True):
            self._known[k] = (p, expires)
            self._wanted.discard(k)

    def forget(self, keys: Sequence[bytes]) -> None:
        for k in keys:
            self._known.pop(k, None)
            self._wanted.discard(k)

    def fresh(self, key: bytes) -> bool:
        """True when the cache holds an unexpired answer (present or absent) about ``key``."""
        hit = self._known.get(key)
        return hit is not None and hit[1] >= time.monotonic()

    def present(self, key: bytes) -> bool:
        hit = self._known.get(key)
        return hit is not None and hit[0]

    def give_up(self, keys: Sequence[bytes]) -> None:
        """A refresh failed: let a later lookup ask again, and trust no expired answer a while."""
        for k in keys:
            self._wanted.discard(k)
        self.distrust()

    def distrust(self) -> None:
        """The tier failed a refresh or a load: for ``ttl_s``, only unexpired answers count."""
        self._distrust_until = time.monotonic() + self.ttl_s


#: A tier still down after a failed probe is reminded of at most this often (WARNING).
STILL_DOWN_EVERY_S = 300.0


def log_transition(name: str, old: str, new: str, error: str, still_down: Throttle) -> None:
    """The breaker's transitions, one line each where they change what an operator should know.

    ``tier_down`` (WARNING) when a serving tier goes out of service, ``tier_up`` (INFO) when it
    serves again. A probe that fails (half-open -> open) is no new outage: it was logged as
    another ``tier_down`` at every ``reset_after_s`` for as long as the outage lasted, so an
    alert counting them saw one outage as many (a red-team finding). Now it is a
    ``tier_still_down`` WARNING at most every 5 minutes (with the failed probes since), DEBUG
    otherwise; the probe itself is DEBUG.
    """
    if new == "open" and old == "half_open":
        suppressed = still_down.allow(name)  # (one throttle per tier manager)
        level = logging.WARNING if suppressed is not None else logging.DEBUG
        event(log, level, "tier_still_down", tier=name, failed_probes=(suppressed or 0) + 1,
              error=error or "-")
    elif new == "open":
        still_down.restart(name)  # the first reminder comes STILL_DOWN_EVERY_S after this line
        event(log, logging.WARNING, "tier_down", tier=name, previous=old, error=error or "-")
    elif new == "half_open":
        event(log, logging.DEBUG, "tier_probe", tier=name, previous=old)
    else:
        event(log, logging.INFO, "tier_up", tier=name, previous=old)
