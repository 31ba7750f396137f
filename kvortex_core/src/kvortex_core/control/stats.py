"""Statistics: thread-safe counters and latency histograms, labelled by tier.

Every part records into one :class:`Stats` per engine. Recording is a dict update under one lock
(well under a microsecond). :meth:`Stats.snapshot` returns a plain, JSON-able
:class:`StatsSnapshot`; :meth:`Stats.collector` exposes everything to prometheus_client with a
``tier`` label (``""`` for engine-wide values).

Well-known counter names are module constants; any other name is accepted, so tiering, transfer
and the connector record their own events (``errors``, ``checksum_failures``, ...) with
:meth:`Stats.inc` and :meth:`Stats.observe`.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

LOOKUPS = "lookups"
LOOKUP_CHUNKS = "lookup_chunks"
HIT_CHUNKS = "hit_chunks"
MISS_CHUNKS = "miss_chunks"
LOOKUP_TOKENS = "lookup_tokens"
HIT_TOKENS = "hit_tokens"
MISS_TOKENS = "miss_tokens"
BYTES_SAVED = "bytes_saved"
BYTES_LOADED = "bytes_loaded"
INSERTS = "inserts"
INSERT_REJECTS = "insert_rejects"
EVICTIONS = "evictions"
#: Entries removed from an index other than by eviction (a write that failed, a bad payload, a
#: drop): inserts - evictions - removals = entries.
REMOVALS = "removals"
EVICTED_BYTES = "evicted_bytes"
PIN_LEAKS = "pin_leaks"
ALLOC_FAILURES = "alloc_failures"
#: Per-tier counters of every index, started at zero (:meth:`Stats.declare`).
INDEX_COUNTERS = (INSERTS, INSERT_REJECTS, EVICTIONS, EVICTED_BYTES, REMOVALS, PIN_LEAKS,
                  LOOKUP_CHUNKS, HIT_CHUNKS, MISS_CHUNKS)
#: Request-level counters (tier ""), started at zero.
REQUEST_COUNTERS = (LOOKUPS, LOOKUP_TOKENS, HIT_TOKENS, MISS_TOKENS, LOOKUP_CHUNKS, HIT_CHUNKS, MISS_CHUNKS)

#: Fixed latency buckets (seconds, upper bounds), 1 us .. 10 s, roughly x2.5 apart.
LATENCY_BUCKETS: tuple[float, ...] = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_Label = tuple[str, str]  # (name, tier); tier "" = engine-wide


@dataclass
class HistogramSnapshot:
    """Counts per bucket (``counts[i]`` = observations <= ``buckets[i]``, last = +Inf)."""

    buckets: tuple[float, ...]
    counts: list[int]
    count: int
    sum: float

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding quantile ``q`` (``inf`` past the last bucket)."""
        if not self.count:
            return 0.0
        target, seen = q * self.count, 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= target:
                return self.buckets[i] if i < len(self.buckets) else float("inf")
        return float("inf")


@dataclass
class StatsSnapshot:
    """A point-in-time copy of every counter and histogram: ``counters[name][tier]``."""

    counters: dict[str, dict[str, float]] = field(default_factory=dict)
    histograms: dict[str, dict[str, HistogramSnapshot]] = field(default_factory=dict)
    gauges: dict[str, dict[str, float]] = field(default_factory=dict)

    def counter(self, name: str, tier: str | None = None) -> float:
        """One counter; ``tier=None`` sums over all tiers."""
        per_tier = self.counters.get(name, {})
        return sum(per_tier.values()) if tier is None else per_tier.get(tier, 0)

    @property
    def hit_rate(self) -> float:
        """Hit tokens / looked-up tokens (chunks when no tokens were recorded); 0 when idle."""
        total = self.counter(LOOKUP_TOKENS, "")
        if total:
            return self.counter(HIT_TOKENS, "") / total
        return self.tier_hit_rate("")

    def tier_hit_rate(self, tier: str) -> float:
        """Hit chunks / looked-up chunks of one tier's index (``""``: engine-wide)."""
        chunks = self.counter(LOOKUP_CHUNKS, tier)
        return self.counter(HIT_CHUNKS, tier) / chunks if chunks else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (``json.dumps(snapshot.to_dict())``)."""
        hists = {
            n: {t: {"buckets": list(h.buckets), "counts": h.counts, "count": h.count, "sum": h.sum}
                for t, h in per.items()}
            for n, per in self.histograms.items()
        }
        return {"hit_rate": self.hit_rate, "counters": self.counters, "gauges": self.gauges,
                "histograms": hists}


class _Histogram:
    __slots__ = ("count", "counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0


class Stats:
    """Thread-safe counters, gauges and histograms, each labelled by tier."""

    def __init__(self, namespace: str = "kvortex") -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        self._counters: dict[_Label, float] = {}
        self._gauges: dict[_Label, float] = {}
        self._hists: dict[_Label, _Histogram] = {}
        self._gauge_fns: dict[_Label, Callable[[], float]] = {}

    # -- recording ------------------------------------------------------------------------
    def declare(self, tier: str | None = None, *, counters: Sequence[str] = (),
                histograms: Sequence[str] = ()) -> None:
        """Start these series at zero where they do not exist yet, so that a scrape shows them
        before their first event (an alert on ``kvortex_tier_errors_total`` has a series to
        watch from the start, and ``rate()`` sees the first increment)."""
        label = tier or ""
        with self._lock:
            for name in counters:
                self._counters.setdefault((name, label), 0)
            for name in histograms:
                self._hists.setdefault((name, label), _Histogram())

    def inc(self, name: str, value: float = 1, tier: str | None = None) -> None:
        """Add ``value`` to counter ``name`` for ``tier``."""
        label = (name, tier or "")
        with self._lock:
            self._counters[label] = self._counters.get(label, 0) + value

    def set_gauge(self, name: str, value: float, tier: str | None = None) -> None:
        """Set a gauge (bytes used, free slots, ...)."""
        with self._lock:
            self._gauges[(name, tier or "")] = value

    def register_gauge(self, name: str, fn: Callable[[], float], tier: str | None = None) -> None:
        """A gauge read by calling ``fn`` at snapshot time (outside the stats lock)."""
        with self._lock:
            self._gauge_fns[(name, tier or "")] = fn

    def unregister_gauge(self, name: str, tier: str | None = None) -> None:
        with self._lock:
            self._gauge_fns.pop((name, tier or ""), None)

    def record_chunks(self, total: int, hit: int, tier: str | None = None) -> None:
        """One chunk-level lookup against one tier's index."""
        t = tier or ""
        with self._lock:
            c = self._counters
            for name, v in ((LOOKUP_CHUNKS, total), (HIT_CHUNKS, hit), (MISS_CHUNKS, total - hit)):
                c[(name, t)] = c.get((name, t), 0) + v

    def observe(self, name: str, seconds: float, tier: str | None = None) -> None:
        """Record one latency (seconds) in histogram ``name``."""
        label = (name, tier or "")
        i = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        with self._lock:
            h = self._hists.get(label)
            if h is None:
                h = self._hists[label] = _Histogram()
            h.counts[i] += 1
            h.count += 1
            h.sum += seconds

    @contextmanager
    def time(self, name: str, tier: str | None = None) -> Iterator[None]:
        """Context manager observing the wall time of its body into histogram ``name``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe(name, time.perf_counter() - t0, tier)

    def record_lookup(self, total_tokens: int, hit_tokens: int, total_chunks: int = 0,
                      hit_chunks: int = 0, tier: str | None = None) -> None:
        """One request-level lookup (the engine or connector; the index records chunks itself)."""
        t = tier or ""
        with self._lock:
            c = self._counters
            for name, v in ((LOOKUPS, 1), (LOOKUP_TOKENS, total_tokens), (HIT_TOKENS, hit_tokens),
                            (MISS_TOKENS, total_tokens - hit_tokens)):
                c[(name, t)] = c.get((name, t), 0) + v
            if total_chunks:
                for name, v in ((LOOKUP_CHUNKS, total_chunks), (HIT_CHUNKS, hit_chunks),
                                (MISS_CHUNKS, total_chunks - hit_chunks)):
                    c[(name, t)] = c.get((name, t), 0) + v

    def record_saved(self, nbytes: int, tier: str) -> None:
        self.inc(BYTES_SAVED, nbytes, tier)

    def record_loaded(self, nbytes: int, tier: str) -> None:
        self.inc(BYTES_LOADED, nbytes, tier)

    def record_eviction(self, count: int, nbytes: int, tier: str) -> None:
        with self._lock:
            c = self._counters
            c[(EVICTIONS, tier)] = c.get((EVICTIONS, tier), 0) + count
            c[(EVICTED_BYTES, tier)] = c.get((EVICTED_BYTES, tier), 0) + nbytes

    # -- reading --------------------------------------------------------------------------
    def snapshot(self) -> StatsSnapshot:
        """A consistent copy of everything recorded so far."""
        with self._lock:
            counters = dict(self._counters)
            gauges = dict(self._gauges)
            gauge_fns = list(self._gauge_fns.items())
            hists = {k: (list(h.counts), h.count, h.sum) for k, h in self._hists.items()}
        for label, fn in gauge_fns:
            try:
                gauges[label] = float(fn())
            except Exception:  # a closed component must not break reporting
                log.debug("gauge %s of tier %r could not be read", *label, exc_info=True)
        snap = StatsSnapshot()
        for (name, tier), v in counters.items():
            snap.counters.setdefault(name, {})[tier] = v
        for (name, tier), v in gauges.items():
            snap.gauges.setdefault(name, {})[tier] = v
        for (name, tier), (counts, n, s) in hists.items():
            hist = HistogramSnapshot(LATENCY_BUCKETS, counts, n, s)
            snap.histograms.setdefault(name, {})[tier] = hist
        return snap

    def reset(self) -> None:
        """Forget everything (benchmarks between phases)."""
        with self._lock:
            self._counters.clear()
            self._gauges.clear()
            self._hists.clear()  # registered gauges stay: they read live state

    def collector(self) -> Any:
        """A prometheus_client collector exposing every statistic with a ``tier`` label.

        Register it with ``prometheus_client.REGISTRY.register(stats.collector())`` or a
        private ``CollectorRegistry``.
        """
        return _PrometheusCollector(self)


class _PrometheusCollector:
    """prometheus_client custom collector: reads one snapshot per scrape (imported lazily)."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def describe(self) -> list[Any]:
        return []  # unchecked collector: metric names appear as they are recorded

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        snap, ns = self._stats.snapshot(), self._stats.namespace
        for name, per in sorted(snap.counters.items()):
            fam = CounterMetricFamily(f"{ns}_{name}", f"KVortex counter {name}", labels=["tier"])
            for tier, v in sorted(per.items()):
                fam.add_metric([tier], v)
            yield fam
        for name, per in sorted(snap.gauges.items()):
            g = GaugeMetricFamily(f"{ns}_{name}", f"KVortex gauge {name}", labels=["tier"])
            for tier, v in sorted(per.items()):
                g.add_metric([tier], v)
            yield g
        hit = GaugeMetricFamily(f"{ns}_hit_rate", "hit tokens / looked-up tokens", labels=["tier"])
        hit.add_metric([""], snap.hit_rate)
        yield hit
        for name, per in sorted(snap.histograms.items()):
            h = HistogramMetricFamily(f"{ns}_{name}_seconds", f"KVortex latency {name}",
                                      labels=["tier"])
            for tier, hs in sorted(per.items()):
                h.add_metric([tier], _cumulative(hs), hs.sum)
            yield h


def _cumulative(h: HistogramSnapshot) -> list[tuple[str, float]]:
    out, running = [], 0
    for bound, c in zip([*map(repr, h.buckets), "+Inf"], h.counts, strict=True):
        running += c
        out.append((bound, running))
    return out
