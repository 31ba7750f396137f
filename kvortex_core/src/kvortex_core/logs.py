"""Structured, quiet-by-default logging: one logger per module, one line per notable event.

Modules call ``log = get_logger(__name__)`` and report notable events (a tier going down or
coming back, an eviction storm, a checksum failure) with :func:`event`, which writes one
``key=value`` line. Nothing is printed unless the application configures logging or calls
:func:`configure` (the engine calls it with ``config.log_level``): a library must not write to
the user's terminal on its own. Per-chunk details go to DEBUG only; :class:`Throttle` keeps a
flapping condition from flooding the log.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

#: The top-level loggers of the three distributions; module loggers are their children.
ROOT_LOGGERS = ("kvortex_core", "kvortex_backends", "kvortex_vllm")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_HANDLER_FLAG = "_kvortex_handler"

for _name in ROOT_LOGGERS:
    # Library convention: without this, Python's last-resort handler prints WARNINGs.
    logging.getLogger(_name).addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (pass ``__name__``)."""
    return logging.getLogger(name)


def configure(level: str | int = "WARNING", *, stream: Any = None) -> None:
    """Set the level of every KVortex logger; print to stderr unless the app already logs.

    When the root logger has handlers (the application configured logging, or pytest's
    capture), records propagate to them and nothing else is added. Otherwise (or with an
    explicit ``stream``) one handler of ours is attached, once: calling this twice changes the
    level but never adds a second handler, so each event prints once even with several engines
    in one process. Propagation is never switched off, so the application still sees our logs.
    """
    if isinstance(level, str):
        resolved = logging.getLevelName(level.upper())
        if not isinstance(resolved, int):
            from kvortex_core.errors import ConfigError

            raise ConfigError(
                f"log_level {level!r} is not a level; use DEBUG, INFO, WARNING or ERROR "
                "(KVORTEX_LOG_LEVEL)"
            )
        level = resolved
    own_handler = stream is not None or not logging.getLogger().handlers
    for name in ROOT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if own_handler and not any(getattr(h, _HANDLER_FLAG, False) for h in logger.handlers):
            handler = logging.StreamHandler(stream)
            handler.setFormatter(logging.Formatter(FORMAT))
            setattr(handler, _HANDLER_FLAG, True)
            logger.addHandler(handler)


def format_event(event_name: str, **fields: Any) -> str:
    """``event=tier_down tier=redis error='timed out'``: one greppable line."""
    parts = [f"event={event_name}"]
    for key, value in fields.items():
        text = str(value)
        if not text or any(c.isspace() or c in "='\"" for c in text):
            text = repr(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def event(logger: logging.Logger, level: int, event_name: str, **fields: Any) -> None:
    """Log one notable event as a single ``key=value`` line."""
    if logger.isEnabledFor(level):
        logger.log(level, format_event(event_name, **fields))


class Throttle:
    """Let a repeated event through at most once per ``interval_s`` per key, counting the rest.

    ``allow(key)`` returns the number of events suppressed since the last one let through
    (>= 0) when the event may be logged now, else None. Thread-safe.
    """

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)

    def restart(self, key: str) -> None:
        """Start ``key``'s interval now with nothing suppressed (its first line was just logged
        by other means)."""
        with self._lock:
            self._last[key] = time.monotonic()
            self._suppressed.pop(key, None)


class StormDetector:
    """Flags an eviction storm: more than ``threshold`` evicted chunks within ``window_s``.

    ``record(n)`` adds n evictions and returns the count in the window when it just crossed
    the threshold (so the caller logs one line per storm), else None.
    """

    def __init__(self, threshold: int = 10_000, window_s: float = 10.0) -> None:
        self.threshold = threshold
        self.window_s = window_s
        self._start = time.monotonic()
        self._count = 0
        self._reported = False
        self._lock = threading.Lock()

    def record(self, n: int) -> int | None:
        now = time.monotonic()
        with self._lock:
            if now - self._start > self.window_s:
                self._start, self._count, self._reported = now, 0, False
            self._count += n
            if self._count > self.threshold and not self._reported:
                self._reported = True
                return self._count
            return None
