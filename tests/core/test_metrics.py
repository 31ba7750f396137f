"""Prometheus export: a real HTTP endpoint, values that follow the cache's operations."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvortex_core.config import KVortexConfig
from kvortex_core.control.index import ChunkIndex
from kvortex_core.control.stats import Stats
from kvortex_core.metrics import MetricsExporter, start_metrics


def _scrape(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, s.labels.get("tier", "") + s.labels.get("le", ""))] = s.value
    return out


def _index_traffic(index: ChunkIndex, stats: Stats, n: int) -> None:
    keys = [bytes([i]) * 32 for i in range(n)]
    for i, k in enumerate(keys):
        index.insert(k, 100, parent=keys[i - 1] if i else None)
    hit = index.lookup(keys + [b"\xff" * 32])
    stats.record_lookup(total_tokens=(n + 1) * 256, hit_tokens=hit * 256)
    stats.record_saved(100 * n, "cpu")
    stats.observe("load", 0.002, "cpu")


def test_http_endpoint_follows_operations() -> None:
    stats = Stats()
    index = ChunkIndex("cpu", 1000, policy="lru", stats=stats)
    with MetricsExporter(stats, port=0).start() as exp:
        assert exp.url is not None and exp.url.startswith("http://127.0.0.1:")
        before = _scrape(exp.url)
        assert before[("kvortex_used_bytes", "cpu")] == 0
        assert before[("kvortex_capacity_bytes", "cpu")] == 1000
        _index_traffic(index, stats, 5)
        after = _scrape(exp.url)
        assert after[("kvortex_used_bytes", "cpu")] == 500
        assert after[("kvortex_entries", "cpu")] == 5
        assert after[("kvortex_inserts_total", "cpu")] == 5
        assert after[("kvortex_bytes_saved_total", "cpu")] == 500
        assert after[("kvortex_hit_tokens_total", "")] == 5 * 256
        assert after[("kvortex_hit_rate", "")] == pytest.approx(5 / 6)
        assert after[("kvortex_load_seconds_count", "cpu")] == 1
        # Filling past capacity evicts: the eviction counter and usage follow.
        for i in range(20):
            index.insert(b"\xee" * 31 + bytes([i]), 100)
        evicted = _scrape(exp.url)
        assert evicted[("kvortex_evictions_total", "cpu")] > 0
        assert evicted[("kvortex_used_bytes", "cpu")] <= 1000
    index.close()


def test_close_stops_server_and_global_registration() -> None:
    from prometheus_client import REGISTRY, generate_latest

    stats = Stats(namespace="kvortex_globaltest")
    stats.inc("lookups", 3)
    exp = MetricsExporter(stats, port=0, expose_global=True).start()
    url = exp.url
    assert url is not None
    assert b'kvortex_globaltest_lookups_total{tier=""} 3.0' in generate_latest(REGISTRY)
    exp.close()
    assert b"kvortex_globaltest_lookups" not in generate_latest(REGISTRY)
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)


def test_start_metrics_follows_config() -> None:
    stats = Stats()
    assert start_metrics(stats, KVortexConfig()) is None  # disabled by default
    cfg = KVortexConfig(metrics={"enabled": True, "port": 0})
    exp = start_metrics(stats, cfg)
    assert exp is not None
    try:
        stats.inc("errors", 2, "disk")
        assert _scrape(exp.url)[("kvortex_errors_total", "disk")] == 2
    finally:
        exp.close()



@pytest.mark.parametrize("host, event_name", [("127.0.0.1", "metrics_port_busy"),
                                              ("no-such-host.invalid", "metrics_server_failed"),
                                              ("192.0.2.1", "metrics_server_failed")])
def test_a_metrics_server_that_cannot_start_names_its_cause(
        host: str, event_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every failure to start the server was logged as a busy port, also a host name that does
    not resolve or an address not on this machine (a red-team finding): a typo in
    metrics.host read as a second rank. The engine carries on without a server either way."""
    import logging
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = KVortexConfig(metrics={"enabled": True, "host": host, "port": port})
        with caplog.at_level(logging.WARNING, logger="kvortex_core"):
            exp = start_metrics(Stats(), cfg)
    try:
        lines = [r.getMessage() for r in caplog.records if "event=metrics_" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith(f"event={event_name} "), lines
        assert exp is not None and exp.url is None
    finally:
        if exp is not None:
            exp.close()


_WORKER = textwrap.dedent("""
    import sys
    from kvortex_core.control.stats import Stats
    from kvortex_core.metrics import MetricsExporter
    stats = Stats()
    exp = MetricsExporter(stats, interval_s=0.05).start()
    rank = int(sys.argv[1])
    stats.inc("hit_tokens", 100 * (rank + 1))
    stats.set_gauge("used_bytes", 1000 * (rank + 1), "cpu")
    stats.observe("load", 0.003, "cpu")
    if sys.argv[2] == "close":
        exp.close()   # last flush; this process's live gauges are dropped
    else:
        exp.mirror.flush()  # like a rank still running
""")

_READER = textwrap.dedent("""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess
    reg = CollectorRegistry()
    multiprocess.MultiProcessCollector(reg)
    print(generate_latest(reg).decode())
""")


def test_multiprocess_mode_aggregates_ranks(tmp_path: Path) -> None:
    """Two 'ranks' in their own processes; a third serves the directory, as vLLM does."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for rank, end in ((0, "close"), (1, "flush")):
        subprocess.run(
            [sys.executable, "-c", _WORKER, str(rank), end], env=env, check=True, timeout=60
        )
    out = subprocess.run(
        [sys.executable, "-c", _READER],
        env=env,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    ).stdout
    samples = {
        (s.name, s.labels.get("tier", "") + s.labels.get("le", "")): s.value
        for fam in text_string_to_metric_families(out)
        for s in fam.samples
    }
    assert samples[("kvortex_hit_tokens_total", "")] == 300  # 100 + 200, summed over ranks
    assert samples[("kvortex_load_seconds_count", "cpu")] == 2
    assert samples[("kvortex_load_seconds_bucket", "cpu0.005")] == 2
    assert samples[("kvortex_load_seconds_bucket", "cpu0.0025")] == 0
    # Gauges sum over live processes: rank 0 closed its exporter, rank 1 still counts.
    assert samples[("kvortex_used_bytes", "cpu")] == 2000


_STATE_WORKER = textwrap.dedent("""
    import sys
    from kvortex_core.control.stats import Stats
    from kvortex_core.metrics import MetricsExporter
    stats = Stats()
    exp = MetricsExporter(stats, interval_s=3600).start()
    rank = int(sys.argv[1])
    stats.inc("lookup_tokens", 1000)
    stats.inc("hit_tokens", 800 if rank == 0 else 600)
    stats.set_gauge("breaker_state", 1 if rank == 0 else 2, "redis")  # open / half-open
    stats.set_gauge("tier_in_service", 0 if rank == 0 else 1, "redis")
    exp.mirror.flush()  # a rank still running
""")


def test_multiprocess_gauges_of_per_process_state_are_not_summed(tmp_path: Path) -> None:
    """Two ranks' hit rates (0.8, 0.6) were summed to 1.4 and shown as "hit rate 140%", two
    open breakers read 2, "half-open" (a red-team finding). Now the hit rate and the breaker
    state are per live process, in service is the minimum, and `kvortex stats` reduces them:
    the hit rate from the summed counters, the breaker as the least available rank's."""
    from kvortex_core.cli.stats_cmd import parse_metrics

    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for rank in (0, 1):
        subprocess.run([sys.executable, "-c", _STATE_WORKER, str(rank)], env=env, check=True, timeout=60)
    out = subprocess.run([sys.executable, "-c", _READER], env=env, check=True, timeout=60,
                         capture_output=True, text=True).stdout
    samples = [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(out) for s in fam.samples]
    rates = sorted(v for n, _, v in samples if n == "kvortex_hit_rate")
    assert rates == [0.6, 0.8], samples
    states = sorted(v for n, lab, v in samples if n == "kvortex_breaker_state" and lab.get("tier") == "redis")
    assert states == [1.0, 2.0]
    assert [v for n, lab, v in samples if n == "kvortex_tier_in_service" and lab.get("tier") == "redis"] == [0.0]
    view = parse_metrics(out)
    assert view.hit_rate == pytest.approx(0.7)  # 1400 / 2000
    assert view.tiers["redis"].breaker == "open"


def test_logs_quiet_by_default_then_one_line_per_event() -> None:
    import io
    import logging

    from kvortex_core import logs

    log = logs.get_logger("kvortex_core.tiering.fake")
    stream = io.StringIO()
    logs.event(log, logging.WARNING, "tier_down", tier="redis", error="timed out")  # no handler yet
    logs.configure("INFO", stream=stream)
    logs.configure("WARNING", stream=stream)  # idempotent: still one handler, new level
    try:
        handlers = [
            h
            for h in logging.getLogger("kvortex_core").handlers
            if not isinstance(h, logging.NullHandler)
        ]
        assert len(handlers) == 1
        log.info("not shown at WARNING")
        logs.event(log, logging.WARNING, "tier_down", tier="redis", error="timed out")
        lines = stream.getvalue().splitlines()
        assert len(lines) == 1
        assert lines[0].endswith(
            "kvortex_core.tiering.fake: event=tier_down tier=redis error='timed out'"
        )
        with pytest.raises(Exception, match="log_level 'LOUD'"):
            logs.configure("LOUD")
        assert logging.getLogger("kvortex_core").propagate  # the app's own handlers still see it
    finally:
        for name in logs.ROOT_LOGGERS:
            logger = logging.getLogger(name)
            for h in [h for h in logger.handlers if getattr(h, "_kvortex_handler", False)]:
                logger.removeHandler(h)
            logger.setLevel(logging.NOTSET)


def test_throttle_and_storm_detector() -> None:
    from kvortex_core.logs import StormDetector, Throttle

    throttle = Throttle(interval_s=3600)
    assert throttle.allow("disk") == 0
    assert throttle.allow("disk") is None and throttle.allow("disk") is None
    assert throttle.allow("redis") == 0  # keys are independent
    storms = StormDetector(threshold=100, window_s=3600)
    assert storms.record(60) is None
    assert storms.record(60) == 120  # crossed: report once
    assert storms.record(500) is None  # same storm, no second line


def test_every_tier_and_engine_series_is_exported_at_zero_before_its_first_event(tmp_path: Path) -> None:
    """An alert on ``kvortex_tier_errors_total`` (or a ``rate()`` over it) needs the series
    before the first failure: they used to appear only at their first increment."""
    import torch

    from kvortex_core import KVortexEngine
    from kvortex_core.data import kv_samples as ks

    tiers = {"cpu": {"type": "cpu", "capacity": "4MiB"},
             "disk": {"type": "disk", "capacity": "8MiB", "path": str(tmp_path / "d")}}
    with KVortexEngine.create({"model_id": "m", "chunk_tokens": 64, "tiers": tiers,
                               "metrics": {"enabled": True, "port": 0}}) as engine:
        caches, hints, _ = ks.flash_attn(2, 32, 16, 2, 8, torch.bfloat16)
        engine.register_kv_caches(caches, hints)
        got = _scrape(engine._metrics.url)  # type: ignore[union-attr]
    for name, tier in [("kvortex_tier_errors_total", "disk"), ("kvortex_tier_timeouts_total", "disk"),
                       ("kvortex_checksum_failures_total", "disk"), ("kvortex_breaker_transitions_total", "disk"),
                       ("kvortex_tier_writes_refused_total", "disk"), ("kvortex_demotions_total", "disk"),
                       ("kvortex_tier_get_seconds_count", "disk"), ("kvortex_tier_put_seconds_count", "disk"),
                       ("kvortex_evictions_total", "cpu"), ("kvortex_removals_total", "disk"),
                       ("kvortex_bytes_loaded_total", "cpu"), ("kvortex_alloc_failures_total", "cpu"),
                       ("kvortex_lookups_total", ""), ("kvortex_hit_tokens_total", ""),
                       ("kvortex_engine_save_calls_total", ""), ("kvortex_engine_load_seconds_count", "")]:
        assert got.get((name, tier)) == 0, (name, tier, got.get((name, tier)))
