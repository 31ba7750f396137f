"""Stats: counters, histograms, snapshot, hit rate, Prometheus exposition, thread safety."""

from __future__ import annotations

import json
import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kvortex_core.control import stats as S
from kvortex_core.control.stats import Stats


def test_counters_by_tier_and_snapshot_is_a_copy() -> None:
    st = Stats()
    st.inc("errors", tier="redis")
    st.inc("errors", 2, tier="redis")
    st.inc("errors", tier="s3")
    st.record_saved(1000, "cpu")
    st.record_loaded(300, "disk")
    st.record_eviction(3, 4096, "cpu")
    snap = st.snapshot()
    assert snap.counter("errors", "redis") == 3 and snap.counter("errors") == 4
    assert snap.counter(S.BYTES_SAVED, "cpu") == 1000
    assert snap.counter(S.BYTES_LOADED, "disk") == 300
    assert snap.counter(S.EVICTIONS, "cpu") == 3 and snap.counter(S.EVICTED_BYTES, "cpu") == 4096
    st.inc("errors", tier="redis")
    assert snap.counter("errors", "redis") == 3  # the snapshot does not move
    assert snap.counter("never") == 0


def test_hit_rate_from_tokens_then_chunks() -> None:
    st = Stats()
    assert st.snapshot().hit_rate == 0.0
    st.record_chunks(4, 3)
    assert st.snapshot().hit_rate == pytest.approx(0.75)
    st.record_lookup(total_tokens=1000, hit_tokens=250, total_chunks=4, hit_chunks=1)
    st.record_lookup(total_tokens=1000, hit_tokens=750)
    snap = st.snapshot()
    assert snap.hit_rate == pytest.approx(0.5)
    assert snap.counter(S.LOOKUPS) == 2 and snap.counter(S.MISS_TOKENS) == 1000
    assert snap.counter(S.MISS_CHUNKS) == 1 + 3


def test_histogram_buckets_and_time() -> None:
    st = Stats()
    for s in (5e-7, 3e-6, 3e-6, 0.2, 99.0):
        st.observe("load", s, tier="cpu")
    with st.time("lookup"):
        pass
    h = st.snapshot().histograms["load"]["cpu"]
    assert h.count == 5 and sum(h.counts) == 5 and h.sum == pytest.approx(99.2000065)
    assert h.counts[0] == 1 and h.counts[S.LATENCY_BUCKETS.index(5e-6)] == 2
    assert h.counts[-1] == 1  # beyond the last bucket
    assert h.quantile(0.5) == 5e-6 and h.quantile(1.0) == float("inf")
    assert st.snapshot().histograms["lookup"][""].count == 1


def test_snapshot_is_json_able_and_gauges_read_live() -> None:
    st = Stats()
    box = {"v": 1}
    st.register_gauge("used_bytes", lambda: box["v"], "cpu")
    st.register_gauge("broken", lambda: 1 / 0, "cpu")  # must not break reporting
    st.observe("save", 0.01, "cpu")
    st.inc(S.HIT_TOKENS, 5)
    box["v"] = 42
    data = json.loads(json.dumps(st.snapshot().to_dict()))
    assert data["gauges"]["used_bytes"]["cpu"] == 42 and "broken" not in data["gauges"]
    assert data["histograms"]["save"]["cpu"]["count"] == 1
    st.unregister_gauge("used_bytes", "cpu")
    st.reset()
    assert st.snapshot().to_dict()["counters"] == {}


def test_prometheus_exposition_has_tier_labels() -> None:
    st = Stats()
    st.inc(S.BYTES_SAVED, 100, "cpu")
    st.inc("checksum_failures", 1, "disk")
    st.observe("load", 0.003, "redis")
    st.register_gauge("used_bytes", lambda: 7, "cpu")
    reg = CollectorRegistry()
    reg.register(st.collector())
    text = generate_latest(reg).decode()
    assert 'kvortex_bytes_saved_total{tier="cpu"} 100.0' in text
    assert 'kvortex_checksum_failures_total{tier="disk"} 1.0' in text
    assert 'kvortex_used_bytes{tier="cpu"} 7.0' in text
    assert 'kvortex_load_seconds_bucket{le="0.005",tier="redis"} 1.0' in text
    assert 'kvortex_load_seconds_count{tier="redis"} 1.0' in text
    assert "kvortex_hit_rate" in text


def test_concurrent_increments_are_not_lost() -> None:
    st = Stats()

    def work() -> None:
        for _ in range(5000):
            st.inc("n", tier="cpu")
            st.observe("t", 1e-5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = st.snapshot()
    assert snap.counter("n", "cpu") == 20000 and snap.histograms["t"][""].count == 20000
