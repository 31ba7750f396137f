"""Prometheus metrics: serve a :class:`~kvortex_core.control.stats.Stats` over HTTP.

Three ways, picked by :func:`start_metrics` from the config and the environment:

- **single process** (default): ``stats.collector()`` is registered in a private registry,
  served on ``metrics.host:metrics.port`` (port 0 picks a free one; see ``.url``), and, with
  ``expose_global``, also in prometheus_client's global ``REGISTRY``, which is what vLLM serves
  on its own ``/metrics`` when the connector runs in its process.
- **multiprocess** (``PROMETHEUS_MULTIPROC_DIR`` set, as vLLM does when its API server and
  engine run in separate processes): a custom collector lives in one process only, so a
  background :class:`Mirror` copies the collector's families into prometheus_client's
  multiprocess metrics (mmap files in that directory) once per ``interval_s``. Whoever serves
  that directory with ``MultiProcessCollector`` -- vLLM's ``/metrics`` or our own port -- shows
  every rank: counters are summed over processes, gauges summed over live processes.
- **not served**: ``metrics.enabled`` false -> :func:`start_metrics` returns None.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import TYPE_CHECKING, Any, Self

from kvortex_core.logs import get_logger

if TYPE_CHECKING:
    from prometheus_client.registry import Collector, CollectorRegistry

    from kvortex_core.config import KVortexConfig
    from kvortex_core.config.settings import MetricsConfig
    from kvortex_core.control.stats import Stats

log = get_logger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_mode() -> bool:
    """True when prometheus_client writes metric values to ``PROMETHEUS_MULTIPROC_DIR``."""
    return bool(os.environ.get(MULTIPROC_ENV))


def metrics_url(host: str, port: int) -> str:
    """``http://host:port/metrics``, an IPv6 host in brackets."""
    return f"http://{host if ':' not in host else f'[{host}]'}:{port}/metrics"


class MetricsExporter:
    """Exposes one Stats object; ``close()`` undoes everything ``start()`` did."""

    def __init__(
        self,
        stats: Stats,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        expose_global: bool = False,
        interval_s: float = 1.0,
    ) -> None:
        self.stats = stats
        self.host = host
        self.port = port
        self.expose_global = expose_global
        self.interval_s = interval_s
        self.collector: Collector = stats.collector()
        self.registry: CollectorRegistry | None = None
        self.mirror: Mirror | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._global = False

    @property
    def url(self) -> str | None:
        """``http://host:port/metrics`` once serving, else None."""
        if self._server is None:
            return None
        return metrics_url(self.host, self._server.server_port)

    def start(self) -> MetricsExporter:
        from prometheus_client import REGISTRY, CollectorRegistry

        self.registry = CollectorRegistry(auto_describe=True)
        if multiprocess_mode():
            from prometheus_client import multiprocess

            self.mirror = Mirror(self.collector, self.interval_s).start()
            multiprocess.MultiProcessCollector(self.registry)
        else:
            self.registry.register(self.collector)
            if self.expose_global:
                self._register_global(REGISTRY)
        if self.port is not None:
            self._serve()
        return self

    def _register_global(self, registry: CollectorRegistry) -> None:
        try:
            registry.register(self.collector)
            self._global = True
        except ValueError as exc:  # another engine in this process already exposes these names
            log.warning("event=metrics_global_skipped reason=%r", str(exc))

    def _serve(self) -> None:
        from prometheus_client import start_http_server

        assert self.registry is not None
        try:
            self._server, self._thread = start_http_server(
                self.port or 0, addr=self.host, registry=self.registry
            )
        except OSError as exc:
            # Several ranks share one configured port: the first serves all (multiprocess mode
            # aggregates every process); the others carry on without a server. Any other cause
            # (a host name that does not resolve, an address not on this machine) is a
            # configuration error, named as such: the engine still runs, without metrics.
            if exc.errno == errno.EADDRINUSE:
                log.warning("event=metrics_port_busy host=%s port=%s error=%r",
                            self.host, self.port, str(exc))
            else:
                log.warning("event=metrics_server_failed host=%s port=%s error=%r hint=%r",
                            self.host, self.port, str(exc),
                            "metrics.host must be an address of this machine (0.0.0.0 for all)")
            return
        log.info("event=metrics_serving url=%s", self.url)

    def scrape(self) -> str:
        """The text a scrape would return now (no HTTP), for tests and ``kvortex stats``."""
        from prometheus_client import generate_latest

        if self.mirror is not None:
            self.mirror.flush()
        assert self.registry is not None, "call start() first"
        return generate_latest(self.registry).decode()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.mirror is not None:
            self.mirror.stop()
            self.mirror = None
        if self._global:
            from prometheus_client import REGISTRY

            REGISTRY.unregister(self.collector)
            self._global = False

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Gauges that are not summed over live processes: a ratio and a state code are per process
#: (each live process's value, labelled with its ``pid``: two ranks with hit rates of 0.8 read
#: 1.6 summed, two open breakers 2, "half-open"), and a tier is in service only while it is on
#: every rank (the smallest). ``kvortex stats`` reduces the per-process ones.
GAUGE_MODES = {"kvortex_hit_rate": "liveall", "kvortex_breaker_state": "liveall",
               "kvortex_tier_in_service": "livemin"}


class Mirror:
    """Copies a collector's families into multiprocess-mode prometheus_client metrics.

    Counters advance by the delta since the last copy (so a process's total survives its
    exit, as Prometheus counters should); gauges are set, and summed over live processes
    (``livesum``) except those a sum would make meaningless (:data:`GAUGE_MODES`); histogram
    buckets and sums advance by their deltas.
    """

    def __init__(self, collector: Collector, interval_s: float = 1.0) -> None:
        self.collector = collector
        self.interval_s = interval_s
        self._metrics: dict[str, Any] = {}
        self._last: dict[tuple[str, tuple[str, ...], str], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Mirror:
        self._thread = threading.Thread(
            target=self._run, name="kvortex-metrics-mirror", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.flush()
            except Exception as exc:  # noqa: BLE001 - metrics must never take the engine down
                log.warning("event=metrics_mirror_failed error=%r", str(exc))

    def stop(self) -> None:
        """Last flush, then drop this process's live gauges (its counters stay counted)."""
        from prometheus_client import multiprocess

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
        multiprocess.mark_process_dead(os.getpid())

    def flush(self) -> None:
        """Copy every family now."""
        with self._lock:
            for family in self.collector.collect():
                self._copy(family)

    def _metric(self, family: Any) -> Any:
        metric = self._metrics.get(family.name)
        if metric is not None:
            return metric
        from prometheus_client import Counter, Gauge, Histogram

        labels = sorted({k for s in family.samples for k in s.labels if k != "le"})
        if family.type == "counter":
            metric = Counter(
                family.name, family.documentation or family.name, labels, registry=None
            )
        elif family.type == "histogram":
            bounds = sorted(
                {float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")}
            )
            metric = Histogram(
                family.name,
                family.documentation or family.name,
                labels,
                registry=None,
                buckets=bounds or (float("inf"),),
            )
        else:
            metric = Gauge(
                family.name,
                family.documentation or family.name,
                labels,
                registry=None,
                multiprocess_mode=GAUGE_MODES.get(family.name, "livesum"),
            )
        self._metrics[family.name] = metric
        return metric

    def _copy(self, family: Any) -> None:
        if family.type not in ("counter", "gauge", "histogram"):
            return
        metric = self._metric(family)
        names = tuple(metric._labelnames)
        for s in family.samples:
            key_labels = tuple(s.labels.get(n, "") for n in names)
            child = metric.labels(*key_labels) if names else metric
            if family.type == "gauge":
                child.set(s.value)
            elif family.type == "counter" and s.name.endswith("_total"):
                self._advance(child, (s.name, key_labels, ""), s.value)
            elif family.type == "histogram":
                self._copy_bucket(child, s, key_labels)

    def _advance(self, child: Any, key: tuple[str, tuple[str, ...], str], value: float) -> None:
        delta = value - self._last.get(key, 0.0)
        if delta > 0:
            child.inc(delta)
        self._last[key] = max(value, self._last.get(key, 0.0))

    def _copy_bucket(self, child: Any, sample: Any, key_labels: tuple[str, ...]) -> None:
        # prometheus_client keeps per-bucket (non-cumulative) values; the family's buckets are
        # cumulative, so each bucket's own count is its cumulative count minus the previous one.
        key = (sample.name, key_labels, sample.labels.get("le", ""))
        if sample.name.endswith("_sum"):
            delta = sample.value - self._last.get(key, 0.0)
            if delta > 0:
                child._sum.inc(delta)
            self._last[key] = sample.value
        elif sample.name.endswith("_bucket"):
            bounds = child._upper_bounds
            i = bounds.index(float(sample.labels["le"]))
            prev_key = (sample.name, key_labels, f"cum{i - 1}")
            own = sample.value - (self._last.get(prev_key, 0.0) if i else 0.0)
            self._last[(sample.name, key_labels, f"cum{i}")] = sample.value
            delta = own - self._last.get(key, 0.0)
            if delta > 0:
                child._buckets[i].inc(delta)
            self._last[key] = own


def start_metrics(
    stats: Stats, config: KVortexConfig | MetricsConfig, *, expose_global: bool = False
) -> MetricsExporter | None:
    """Start exporting ``stats`` as ``config.metrics`` says; None when metrics are disabled.

    A configured ``metrics.port`` serves HTTP there; without one the metrics are only exposed
    through the global registry (``expose_global``, for vLLM's ``/metrics``) or the
    multiprocess directory.
    """
    metrics = getattr(config, "metrics", config)
    if not metrics.enabled:
        return None
    return MetricsExporter(
        stats, host=metrics.host, port=metrics.port, expose_global=expose_global
    ).start()
