"""A circuit breaker per tier: repeated failures take the tier out of service for a while.

States: ``closed`` (normal) -> ``open`` after ``failure_threshold`` consecutive failures (every
call is skipped, the tier answers as a miss) -> ``half_open`` once ``reset_after_s`` has passed,
when exactly one probe call is let through -> ``closed`` if the probe succeeds, ``open`` again
(for another ``reset_after_s``) if it fails. Thread-safe; the clock is injectable for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Literal

State = Literal["closed", "open", "half_open"]
Transition = Callable[[str, State, State, str], None]


class CircuitBreaker:
    """Counts consecutive failures of one tier and decides whether a call may run."""

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_after_s: float = 30.0,
        on_transition: Transition | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_after_s = reset_after_s
        self._on_transition = on_transition
        self._clock = clock
        self._lock = threading.Lock()
        self._state: State = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.last_error = ""

    @property
    def state(self) -> State:
        """The current state (``open`` turns ``half_open`` only when a call asks)."""
        return self._state

    @property
    def available(self) -> bool:
        """Whether a call would be allowed now, without claiming the half-open probe."""
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open":
                return self._clock() - self._opened_at >= self.reset_after_s
            return not self._probing

    def allow(self) -> bool:
        """True when a call may run now; in half-open state only one probe at a time."""
        change = None
        with self._lock:
            if self._state == "closed":
                return True
            if self._state == "open":
                if self._clock() - self._opened_at < self.reset_after_s:
                    return False
                change = self._set("half_open")
            if self._probing:
                allowed = False
            else:
                self._probing = allowed = True
        self._notify(change)
        return allowed

    def success(self) -> None:
        """A call succeeded: reset the failure count, close after a good probe."""
        change = None
        with self._lock:
            self._failures = 0
            self._probing = False
            if self._state != "closed":
                change = self._set("closed")
        self._notify(change)

    def failure(self, error: str = "") -> None:
        """A call failed or timed out: count it, open at the threshold or on a failed probe."""
        change = None
        with self._lock:
            self._failures += 1
            self.last_error = error
            probe_failed = self._state == "half_open"
            self._probing = False
            if probe_failed or (
                self._state == "closed" and self._failures >= self.failure_threshold
            ):
                self._opened_at = self._clock()
                change = self._set("open")
        self._notify(change)

    def force_open(self, error: str) -> None:
        """Open now (e.g. a failed health check at start)."""
        change = None
        with self._lock:
            self.last_error = error
            self._opened_at = self._clock()
            self._probing = False
            if self._state != "open":
                change = self._set("open")
        self._notify(change)

    def _set(self, new: State) -> tuple[State, State]:
        old, self._state = self._state, new
        return old, new

    def _notify(self, change: tuple[State, State] | None) -> None:
        if change is not None and self._on_transition is not None:
            self._on_transition(self.name, change[0], change[1], self.last_error)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state}, failures={self._failures})"
