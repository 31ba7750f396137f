"""``kvortex bench backends`` end to end on tiny payloads against the test servers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvortex_core.cli.app import app

pytestmark = [pytest.mark.redis, pytest.mark.s3]
pytest.importorskip("redis")
pytest.importorskip("boto3")


def test_bench_backends_writes_ratios_for_every_cell(redis_server, moto_s3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "bench", "backends", "--sizes", "4K,64K", "--concurrency", "1,3", "--reps", "1",
        "--targets", "redis,s3", "--part-bytes", "16K", "--redis-url", redis_server.url,
        "--s3-endpoint", moto_s3.endpoint_url, "--out", str(out), "--quiet",
    ])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "backends.json").read_text())
    cells = {(r["target"], r["op"], r["size"], r["concurrency"]) for r in data["rows"]}
    for target in ("redis", "redis parts 16K", "s3"):  # 16 KiB is below 1 MiB: named in bytes
        assert {c for c in cells if c[0].startswith(target.split(" ")[0])}, target
    assert len([c for c in cells if c[0] == "s3"]) == 2 * 2 * 2  # ops x sizes x concurrency
    assert all(r["ours_gbps"] > 0 and r["raw_gbps"] > 0 and r["ratio"] > 0 for r in data["rows"])
    assert all(r["ratio_vs_raw_copy"] is not None for r in data["rows"] if r["op"] == "get")
    # redis: the faster of raw redis-py's two shapes (one pipeline, or concurrent commands)
    assert {r["raw_shape"] for r in data["rows"] if r["target"] == "redis"} <= {"pipeline", "concurrent"}
    assert all(r["raw_shape"] for r in data["rows"] if r["target"] == "redis")
    assert data["disk"] is None and "redis" in (out / "backends.md").read_text()
    assert (out / "backends-s3.png").exists()


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--redis-url", "http://127.0.0.1:6379", "must start with redis:// or rediss://"),
    ("--s3-endpoint", "127.0.0.1:5000", "is not an http(s) URL"),
])
def test_a_bad_server_url_is_a_usage_error_before_anything_runs(tmp_path: Path, option: str, value: str,
                                                                 says: str) -> None:
    result = CliRunner().invoke(app, ["bench", "backends", "--targets", "redis,s3", option, value,
                                      "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert says in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_an_s3_endpoint_without_credentials_is_a_usage_error_before_redis_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    result = CliRunner().invoke(app, ["bench", "backends", "--targets", "redis,s3", "--s3-endpoint",
                                      "http://127.0.0.1:9", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert "no AWS credentials" in " ".join(result.output.split())
