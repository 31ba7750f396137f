"""Loads: pin cpu hits, fetch lower-tier hits into slots, verify, promote (part of TierManager)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvortex_core.data import payload as pl
from kvortex_core.errors import BadValueError, PayloadError
from kvortex_core.logs import Throttle, event
from kvortex_core.tiering.counters import (
    BYTES_READ,
    CHECKSUM_FAILURES,
    LOAD_MISSES,
    PROMOTIONS,
    TIER_ERRORS,
)
from kvortex_core.tiering.leases import LoadLease
from kvortex_core.tiering.state import TierState
from kvortex_core.tiering.tiers import LowerTier, TierUnavailable

if TYPE_CHECKING:
    import torch


log = logging.getLogger("kvortex_core.tiering")

# Outcome of one lower-tier fetch: verified, a miss (slot reusable), or slot quarantined.
OK, MISS, GONE = "ok", "miss", "gone"


class LoadMixin(TierState):
    """begin_load / end_load."""

    _checksum_log: Throttle
    _quarantined: set[int]  # slots a timed-out read may still write; only the loop touches it
    _demoting_keys: dict[bytes, int]

    if TYPE_CHECKING:  # provided by TierManager / the other mixin

        def _allocate_slot(self) -> int | None: ...
        def _payload_view(self, slot: int) -> torch.Tensor: ...
        def rescue(self, keys: Sequence[bytes]) -> None: ...

    def begin_load(self, keys: Sequence[bytes], timeout: float | None = None) -> list[LoadLease]:
        """Leases for the longest prefix of ``keys`` deliverable now (pinned cpu slots)."""
        keys = list(keys)
        if self._demoting_keys:
            self.rescue(keys)
        # the cpu-resident head needs no I/O: pinned at once, its leases share one pin handle
        # (end_load of them all releases it once; one handle per chunk cost ~3 us each to release)
        with self._lock:
            entries, pin = self.cpu_index.pin_prefix(keys, "load")
        if not entries:
            pin.release()
        leases = [LoadLease(e.key, i, int(e.location), self._payload_view(int(e.location)), self.cpu_name, pin)
                  for i, e in enumerate(entries)]
        if len(leases) < len(keys) and self._find_below(keys[len(leases)]) is not None:
            leases += self._fetch_run(keys, len(leases), timeout)
        return leases

    def _find_below(self, key: bytes) -> LowerTier | None:
        for tier in self.tiers:
            if not tier.available:
                continue
            if key in tier.putting and tier.remote is None:
                # indexed as its write started: nothing to read there yet, and a read would
                # have evicted a cpu chunk for a slot only to miss (a red-team finding: 113
                # such misses with a hung tier). A chunk being demoted is taken from its slot.
                continue
            if key in tier.index or (tier.remote is not None and tier.remote.present(key)):
                return tier
        return None

    def _fetch_run(self, keys: list[bytes], start: int, timeout: float | None) -> list[LoadLease]:
        """From ``keys[start]`` on: fetch lower-tier chunks, take cpu hits, stop at a miss."""
        plan: list[_Step] = []
        with self._lock:
            for i in range(start, len(keys)):
                parent = keys[i - 1] if i else None
                lease = self._cpu_lease(i, keys[i])  # pinned now: slot allocation cannot evict it
                if lease is not None:
                    plan.append(_Step(i, keys[i], parent, None, -1, lease))
                    continue
                tier = self._find_below(keys[i])
                slot = self._allocate_slot() if tier is not None else None
                if tier is None or slot is None:
                    break
                plan.append(_Step(i, keys[i], parent, tier, slot))
        fetches = [p for p in plan if p.tier is not None]
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
                self.end_load([p.lease for p in plan if p.lease is not None])
                return []  # plan starts at the first lower-tier chunk: nothing deliverable
        outcome = {p.i: r for p, r in zip(fetches, results, strict=True)}
        return self._promote(plan, outcome)

    async def _fetch_all(
        self, fetches: list[_Step], run: _FetchRun
    ) -> list[str]:
        outcomes = await asyncio.gather(*(self._fetch(p.key, p.tier, p.slot, p) for p in fetches),
                                        return_exceptions=True)
        results = []
        for p, r in zip(fetches, outcomes, strict=True):
            if isinstance(r, BaseException):  # a bug, here or in a backend: a miss, its slot freed
                log.warning("load: reading chunk %s from tier %s failed: %r", p.key.hex()[:16],
                            p.tier.name if p.tier is not None else "?", r)
                r = MISS
            results.append(r)
        if not run.finish():
            self.pool.free_many(p.slot for p, r in zip(fetches, results, strict=True) if r != GONE)
        return results

    async def _fetch(self, key: bytes, tier: LowerTier | None, slot: int, step: _Step | None = None) -> str:
        """Read one chunk from a lower tier into ``slot`` and verify it: OK, MISS or GONE."""
        assert tier is not None  # fetch steps always name their tier
        out = self.pool.buffer(slot)
        try:
            n = await tier.call("get", tier.backend.get(key.hex(), out),
                                on_late=lambda: self._release_quarantined(slot))
        except TierUnavailable as exc:
            if isinstance(exc.__cause__, TimeoutError):
                self._quarantined.add(slot)  # the read may still write into it: freed once it ended
                return GONE
            if isinstance(exc.__cause__, BadValueError):
                # Longer than any value of this key could be (a slot holds header + payload, and
                # the key fixes the payload's shape), or not a byte value at all: bad bytes, not a
                # passing fault. Deleted, then the next tier that holds the chunk is read.
                await self._reject(tier, key, PayloadError(f"stored value unusable: {exc.__cause__}"))
                return await self._fetch_below(key, tier, slot, step)
            return MISS
        if n is not None and (type(n) is not int or not 0 <= n <= len(out)):
            # a backend breaking the protocol (returned the bytes, say): a tier failure, counted
            # and shown in its breaker's last error; its slot goes back with the miss
            tier._failed("get", f"backend get() returned {type(n).__name__} {str(n)[:40]!r}, not a byte "
                                f"count in [0, {len(out)}] (fix the backend: return len(value))", TIER_ERRORS)
            return MISS
        if n is None:
            if key not in tier.putting:  # a put in flight lands soon: its entry must stay
                tier.index.remove([key])
                if tier.remote is not None:
                    tier.remote.forget([key])
            self.stats.inc(LOAD_MISSES, 1, tier.name)
            return await self._fetch_below(key, tier, slot, step)
        try:
            self._verify(out, n, key)
        except PayloadError as exc:
            await self._reject(tier, key, exc)
            return await self._fetch_below(key, tier, slot, step)
        self.stats.inc(BYTES_READ, n, tier.name)
        return OK

    async def _fetch_below(self, key: bytes, above: LowerTier, slot: int, step: _Step | None) -> str:
        """``above`` no longer had the chunk (deleted by another instance, or bad bytes): read it
        from the next tier that holds it, as the first lookup promised; MISS when none does."""
        later = self.tiers[self.tiers.index(above) + 1:]
        for tier in later:
            if tier.available and (key in tier.index or (tier.remote is not None and tier.remote.present(key))):
                if step is not None:
                    step.tier = tier  # the promotion is counted for the tier it came from
                return await self._fetch(key, tier, slot, step)
        return MISS

    def _release_quarantined(self, slot: int) -> None:
        """A timed-out read into ``slot`` has ended (``LowerTier.call``'s ``on_late``): free it."""
        if slot in self._quarantined:  # close() may have freed it already
            self._quarantined.discard(slot)
            self.pool.free(slot)

    def _verify(self, out: memoryview, n: int, key: bytes) -> None:
        header = pl.read_header(out[:n])
        if header.compression != "none":  # a backend that stores compressed values as they are
            if pl.HEADER_BYTES + header.raw_len > len(out):
                raise PayloadError(f"payload expands to {header.raw_len} bytes, slot {len(out)}")
            pl.decompress_value(bytes(out[:n]), out)
            n = pl.HEADER_BYTES + header.raw_len
        if n != pl.HEADER_BYTES + self.payload_bytes:
            raise PayloadError(
                f"payload is {n - pl.HEADER_BYTES} bytes, expected {self.payload_bytes}"
            )
        pl.parse(
            out[:n], key=key, namespace=self.namespace, shape=self.payload_shape, dtype=self.dtype
        )

    async def _reject(self, tier: LowerTier, key: bytes, exc: PayloadError) -> None:
        """A bad payload: a miss, deleted from its tier, counted, logged (throttled)."""
        self.stats.inc(CHECKSUM_FAILURES, 1, tier.name)
        suppressed = self._checksum_log.allow(tier.name)
        if suppressed is not None:
            event(
                log,
                logging.WARNING,
                "bad_payload",
                tier=tier.name,
                key=key.hex()[:16],
                error=str(exc),
                suppressed=suppressed,
            )
        tier.index.remove([key])
        if tier.remote is not None:
            tier.remote.forget([key])
        try:
            await tier.call("delete", tier.backend.delete([key.hex()]))
        except TierUnavailable:
            pass

    def _promote(self, plan: list[_Step], outcome: dict[int, str]) -> list[LoadLease]:
        """Leases up to the first failed step; the steps after it are unpinned or freed."""
        leases: list[LoadLease] = []
        cut = False
        for step in plan:
            lease = None
            if not cut and step.tier is None:
                lease = step.lease
            elif not cut and outcome.get(step.i) == OK:
                lease = self._promote_one(step)
            if lease is not None:
                leases.append(lease)
                continue
            cut = True
            if step.lease is not None:
                self.end_load([step.lease])
            elif outcome.get(step.i) != GONE:
                self.pool.free(step.slot)
        return leases

    def _cpu_lease(self, i: int, key: bytes) -> LoadLease | None:
        with self._lock:
            entries, pin = self.cpu_index.pin_prefix([key], "load")
        if not entries:
            pin.release()
            return None
        slot = int(entries[0].location)
        return LoadLease(key, i, slot, self._payload_view(slot), self.cpu_name, pin)

    def _promote_one(self, step: _Step) -> LoadLease | None:
        i, key, tier, slot = step.i, step.key, step.tier, step.slot
        assert tier is not None
        with self._lock:
            if key in self.cpu_index:  # a concurrent load promoted it first: use that copy
                existing = self._cpu_lease(i, key)
                if existing is not None:
                    self.pool.free(slot)
                return existing  # None: the caller frees the slot
            if not self.cpu_index.insert(
                key, self.pool.slot_bytes, location=slot, parent=step.parent
            ):
                return None  # caller frees the slot
            pin = self.cpu_index.pin([key], "load")
        self.stats.inc(PROMOTIONS, 1, tier.name)
        return LoadLease(key, i, slot, self._payload_view(slot), tier.name, pin)

    def end_load(self, leases: Sequence[LoadLease]) -> None:
        """Unpin the slots of finished loads, under one index lock.

        The cpu-hit leases of one ``begin_load`` share a pin handle: end them together.
        """
        pins = []
        for lease in leases:
            if lease.pin is not None:
                pins.append(lease.pin)
                lease.pin = None
        self.cpu_index.release_all(pins)  # a shared handle is released once


@dataclass(eq=False)
class _Step:
    """One chunk of a load plan: a pinned cpu hit (``lease``) or a fetch into ``slot``."""

    i: int
    key: bytes
    parent: bytes | None
    tier: LowerTier | None
    slot: int
    lease: LoadLease | None = None


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
