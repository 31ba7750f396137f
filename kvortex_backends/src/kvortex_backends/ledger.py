"""Capacity accounting of a shared tier: the bytes *this instance* wrote and has not removed.

A shared store (Redis, S3) holds what every instance wrote; its total size says nothing about
the budget of one instance, and asking the server for it is costly (S3) or meaningless (a Redis
shared with other applications). So each instance keeps a ledger of the keys it wrote and their
sizes. ``used`` is the sum of those sizes. An entry leaves the ledger when this instance deletes
the key, when the key's TTL has passed, or when a read or ``contains`` finds the key gone
(evicted by Redis ``maxmemory``, deleted by another instance). Keys written by other instances
never count. A restarted instance starts with an empty ledger: what it wrote before the restart
stays in the store but is no longer charged to it (the store's own eviction or TTL reclaims it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

from kvortex_core.errors import BackendFullError


@dataclass(frozen=True)
class _Entry:
    size: int
    expires: float | None  # time.monotonic() deadline, None = never
    seq: int = 0  # the ledger's stamp when it was charged or landed (see WriteLedger.stamp)
    pending: bool = False  # charged, its write not finished: a read may not see it yet


@dataclass(frozen=True)
class Reservation:
    """What a put changed in the ledger, so that a failed write can be undone."""

    key: str
    previous: _Entry | None
    current: _Entry


class WriteLedger:
    """Sizes of the keys this instance wrote; enforces ``capacity`` on their sum.

    Runs on the tiering event-loop thread only (no awaits inside), so it needs no lock.
    """

    def __init__(self, tier: str, capacity: int, ttl: float | None = None) -> None:
        self.tier = tier
        self.capacity = int(capacity)
        self.ttl = ttl
        self._entries: dict[str, _Entry] = {}
        self._used = 0
        self._next_purge = 0.0
        self._seq = 0

    @property
    def used(self) -> int:
        self._purge_expired()
        return self._used

    @property
    def items(self) -> int:
        self._purge_expired()
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def reserve(self, key: str, size: int) -> Reservation:
        """Charge ``size`` bytes for ``key`` (replacing its old size) or raise BackendFullError."""
        self._purge_expired()
        previous = self._entries.get(key)
        old = previous.size if previous else 0
        if self._used - old + size > self.capacity:
            raise BackendFullError(
                f"tier {self.tier!r} is full for this instance: key {key!r} needs {size} bytes, "
                f"{self.capacity - self._used + old} of its capacity {self.capacity} are free; "
                "raise the tier's capacity or let eviction make room"
            )
        expires = time.monotonic() + self.ttl if self.ttl else None
        self._seq += 1
        current = _Entry(size, expires, self._seq, pending=True)
        self._entries[key] = current
        self._used += size - old
        return Reservation(key, previous, current)

    def rollback(self, reservation: Reservation) -> None:
        """Undo a reservation whose write failed (only if nothing replaced it since)."""
        if self._entries.get(reservation.key) is not reservation.current:
            return
        self._used -= reservation.current.size
        if reservation.previous is None:
            del self._entries[reservation.key]
        else:
            # Not pending any more whatever it was: a write still running when this one started
            # has ended or will land unseen (its landed() found this reservation in its place),
            # and a pending entry is never forgotten by a miss.
            self._entries[reservation.key] = replace(reservation.previous, pending=False)
            self._used += reservation.previous.size

    def landed(self, reservation: Reservation) -> None:
        """The write of a reservation finished: its key is in the store from now on. A read or
        listing sent before this moment may not have seen it; :meth:`forget_missing` with a
        stamp taken before this call spares it."""
        if self._entries.get(reservation.key) is not reservation.current:
            return  # replaced by a later write, or forgotten: nothing of this one is charged
        self._seq += 1
        self._entries[reservation.key] = replace(reservation.current, seq=self._seq, pending=False)

    def forget(self, keys: Iterable[str]) -> None:
        """Stop charging keys that were deleted or found missing."""
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._used -= entry.size

    def stamp(self) -> int:
        """Taken before a read is sent; :meth:`forget_missing` with it spares keys charged since."""
        return self._seq

    def forget_missing(self, keys: Iterable[str], since: int) -> None:
        """Stop charging keys a read (sent at ``since``) found missing, except those whose write
        was still running or landed after the read was sent: the read may have looked before
        the value arrived (a miss answered late, or a listing fetched while a put was in flight,
        used to drop a new write's charge: the budget under-counted)."""
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and not entry.pending and entry.seq <= since:
                del self._entries[key]
                self._used -= entry.size

    def clear(self) -> None:
        self._entries.clear()
        self._used = 0

    def _purge_expired(self) -> None:
        if not self.ttl or not self._entries:
            return
        now = time.monotonic()
        if now < self._next_purge:
            return
        # Re-inserting a key keeps its old dict position, so entries are not in expiry order:
        # scan them all, at most once per second (only when a TTL is configured).
        self._next_purge = now + min(1.0, self.ttl)
        gone = [k for k, e in self._entries.items() if e.expires is not None and e.expires <= now]
        self.forget(gone)
