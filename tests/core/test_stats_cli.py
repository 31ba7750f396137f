"""``kvortex stats``: reads a live metrics endpoint and shows what the cache did."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kvortex_core.cli.stats_cmd import parse_metrics, register
from kvortex_core.control.index import ChunkIndex
from kvortex_core.control.stats import Stats
from kvortex_core.data import payload as pl
from kvortex_core.metrics import MetricsExporter


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:  # keep "stats" a subcommand, as in the real CLI
        """test app"""

    register(app)
    return app


def _run(*args: str, columns: int = 200) -> str:
    result = CliRunner().invoke(_app(), ["stats", *args], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("columns", [200, 80, 60, 50])
def test_every_header_is_whole_at_any_terminal_width(columns: int) -> None:
    """At 60 columns the two-table layout cut headers short ("brea"); a narrower one follows."""
    stats = Stats()
    indexes = [ChunkIndex(name, 1 << 30, policy="lru", stats=stats) for name in ("cpu", "disk@r1", "redis")]
    with MetricsExporter(stats, port=0).start() as exp:
        assert exp.url is not None
        out = _run("--url", exp.url, "--once", columns=columns)
    for index in indexes:
        index.close()
    assert max(len(line) for line in out.splitlines()) <= columns
    for header in ("tier", "used", "capacity", "use %", "evicted", "errors", "breaker", "chunks", "saved",
                   "loaded", "save", "load", "MB/s"):
        assert header in out, (header, out)
    assert "disk@r1" in out


def test_once_shows_live_values_that_change() -> None:
    stats = Stats()
    cpu = ChunkIndex("cpu", 4096, policy="prefix-lru", stats=stats)
    disk = ChunkIndex("disk", 1 << 20, policy="lru", stats=stats)
    with MetricsExporter(stats, port=0).start() as exp:
        assert exp.url is not None
        first = _run("--url", exp.url, "--once")
        assert "hit rate 0.0%" in first
        assert "cpu" in first and "4.0 KiB" in first  # capacity
        cpu.insert(b"a" * 32, 1024)
        stats.record_lookup(total_tokens=1024, hit_tokens=768)
        stats.record_saved(1024, "cpu")
        stats.inc("errors", 3, "disk")
        stats.set_gauge("breaker_state", 1, "disk")
        second = _run("--url", exp.url, "--once")
        assert "hit rate 75.0%" in second
        assert "25.0%" in second  # cpu usage 1024/4096
        disk_row = next(line for line in second.splitlines() if "disk" in line)
        assert "open" in disk_row and " 3 " in disk_row
    cpu.close()
    disk.close()


def test_parse_reduces_families_per_tier() -> None:
    stats = Stats()
    stats.set_gauge("used_bytes", 10, "cpu")
    stats.set_gauge("capacity_bytes", 40, "cpu")
    stats.inc("bytes_loaded", 7, "cpu")
    stats.inc("tier_bytes_read", 5, "disk")
    stats.inc("tier_timeouts", 1, "disk")
    stats.inc("checksum_failures", 2, "disk")
    stats.set_gauge("breaker_state", 2, "disk")
    exp = MetricsExporter(stats).start()
    view = parse_metrics(exp.scrape())
    exp.close()
    assert view.tiers["cpu"].used_bytes == 10 and view.tiers["cpu"].capacity_bytes == 40
    assert view.tiers["cpu"].bytes_loaded == 7
    assert view.tiers["disk"].bytes_loaded == 5
    assert view.tiers["disk"].errors == 3 and view.errors == 3
    assert view.tiers["disk"].breaker == "half-open"


def test_unreachable_url_is_a_clear_error() -> None:
    result = CliRunner().invoke(_app(), ["stats", "--url", "http://127.0.0.1:1/metrics", "--once"])
    assert result.exit_code == 1
    assert "cannot read metrics from http://127.0.0.1:1/metrics" in result.stderr
    assert result.stdout == "", "errors go to stderr"


def test_no_url_and_no_port_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KVORTEX_METRICS__PORT", "KVORTEX_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(_app(), ["stats", "--once"])
    assert result.exit_code != 0
    assert "KVORTEX_METRICS__PORT" in result.output


def test_port_0_says_each_engine_picks_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """With metrics.port 0 it read http://127.0.0.1:0/metrics and asked whether KVortex runs
    (a red-team finding): the port is each engine's pick, so only --url can say it."""
    monkeypatch.delenv("KVORTEX_CONFIG_FILE", raising=False)
    monkeypatch.setenv("KVORTEX_METRICS__PORT", "0")
    result = CliRunner().invoke(_app(), ["stats", "--once"])
    assert result.exit_code == 2
    assert "metrics.port is 0" in result.output and "metrics_url" in result.output
    assert ":0/metrics" not in result.output


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_stats_of_a_real_engine_with_two_tiers(tmp_path: Path) -> None:
    """The engine's own Stats, served over HTTP, shown per tier after real saves and loads."""
    import torch

    from kvortex_core import KVortexConfig, KVortexEngine
    from kvortex_core.data import kv_samples as ks

    caches, hints, _ = ks.flash_attn(2, 64, 16, 2, 8, torch.bfloat16)
    config = KVortexConfig(
        model_id="stats/test",
        chunk_tokens=64,
        tiers={
            "cpu": {"type": "cpu", "capacity": "1MiB"},
            "disk": {
                "type": "disk",
                "capacity": "8MiB",
                "path": str(tmp_path),
                "write_through": True,
            },
        },
    )
    engine = KVortexEngine.create(config)
    engine.register_kv_caches(caches, hints)
    with engine, MetricsExporter(engine.stats_recorder, port=0).start() as exp:
        assert exp.url is not None
        tokens = list(range(256))
        engine.save(tokens, list(range(16)))
        assert engine.load(tokens, list(range(16, 32))) == 256
        assert engine.lookup(tokens + list(range(1000, 1064))) == 256
        live = parse_metrics(fetch_text(exp.url))
        cpu = live.tiers["cpu"]
        # 4 chunks, one save: KV bytes both ways (the slots also hold a header each)
        assert cpu.bytes_saved == cpu.bytes_loaded == engine.layout.chunk_bytes(256)
        assert cpu.used_bytes == cpu.bytes_saved + 4 * pl.HEADER_BYTES
        assert cpu.capacity_bytes > 0 and live.tiers["disk"].capacity_bytes == 8 << 20
        assert live.hit_tokens == 256 and live.lookup_tokens == 320
        out = _run("--url", exp.url, "--once")
        assert "disk" in out and "cpu" in out and "hit rate 80.0%" in out
        engine.drain() if hasattr(engine, "drain") else engine.close()  # write-behind lands
        after = parse_metrics(fetch_text(exp.url))
        assert after.tiers["disk"].bytes_saved > 0  # written behind to disk


def fetch_text(url: str) -> str:
    from kvortex_core.cli.stats_cmd import fetch

    return fetch(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc/metrics", "http://[::1/metrics"])
def test_a_malformed_url_is_a_usage_error(url: str) -> None:
    result = CliRunner().invoke(_app(), ["stats", "--url", url, "--once"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "is not a valid URL" in result.output and "Traceback" not in result.output
