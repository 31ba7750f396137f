"""Red-team findings on configuration and the CLI: each test failed before its fix.

Secrets in URLs, the first-tier rule at load, ``options:`` precedence, messages instead of
tracebacks, the demo's too-short prompts, provenance of JSON env variables, sizes, tier names,
infinite timeouts and the ``kvortex stats`` table.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from pydantic import Field, field_validator
from typer.testing import CliRunner

from kvortex_core import ConfigError, KVortexConfig, hookimpl
from kvortex_core.cli.app import app
from kvortex_core.cli.stats_cmd import parse_metrics, render
from kvortex_core.cli.stats_cmd import register as register_stats
from kvortex_core.config import TierConfig
from kvortex_core.config.backends import backend_options
from kvortex_core.config.provenance import Source, provenance
from kvortex_core.control.stats import Stats
from kvortex_core.metrics import MetricsExporter
from kvortex_core.plugins import PluginManager
from kvortex_core.storage.protocol import BackendOptions
from kvortex_core.testing import MemoryBackend

MiB = 1024**2
CPU = "  cpu: {type: cpu, capacity: 1MiB}\n"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("KVORTEX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "kvortex.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(app, list(args), env=env)


# --- B2: a URL's password is never shown --------------------------------------------------


class UrlOptions(BackendOptions):
    url: str = "mem://localhost"
    cluster: list[str] = Field(default_factory=list)
    password: str = ""

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.startswith("mem://"):
            raise ValueError(f"url {v!r} must start with mem://")  # echoes the URL, as redis's
        return v


class UrlBackend(MemoryBackend):
    Options = UrlOptions  # type: ignore[assignment]


class UrlPlugin:
    @hookimpl
    def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
        register("urlmem", UrlBackend)


URL_TIERS = {
    "cpu": {"type": "cpu", "capacity": "1MiB"},
    "r": {
        "type": "urlmem",
        "capacity": "1MiB",
        "url": "mem://user:hunter2@h:6379/0",
        "cluster": ["mem://u:hunter5@h1:1", "mem://:hunter6@h2:2"],
        "password": "hunter9",
    },
}


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("redis://user:hunter2@h:6379/0", "redis://user:********@h:6379/0"),
        ("x 'rediss://:pw@h' y", "x 'rediss://:********@h' y"),
        ("redis://h:6379/0", "redis://h:6379/0"),  # a port is not a password
        ("http://user@h/", "http://user@h/"),
    ],
)
def test_redact_urls(text: str, shown: str) -> None:
    from kvortex_core.config.messages import redact_urls

    assert redact_urls(text) == shown


def test_repr_and_str_redact_url_passwords_but_backend_gets_them() -> None:
    config = KVortexConfig.load(plugins=[UrlPlugin()], tiers=URL_TIERS)
    for text in (repr(config), str(config), repr(config.tiers["r"])):
        assert "hunter" not in text
        assert "mem://user:********@h:6379/0" in text
    options = backend_options(config, "r", PluginManager([UrlPlugin()]))
    assert options.url == "mem://user:hunter2@h:6379/0"  # type: ignore[attr-defined]
    assert options.cluster[1] == "mem://:hunter6@h2:2"  # type: ignore[attr-defined]


def test_config_show_redacts_url_passwords(tmp_path: Path) -> None:
    text = (
        "tiers:\n"
        + CPU
        + '  r: {type: redis, capacity: 1MiB, url: "redis://user:hunter2@h:6379/0"}\n'
    )
    path = str(write(tmp_path, text))
    shown = invoke("config", "show", "-f", path, "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["tiers.r.url"]["value"] == "redis://user:********@h:6379/0"
    table = invoke("config", "show", "-f", path)
    assert table.exit_code == 0 and "hunter2" not in table.stdout
    assert "redis://user:********@h:6379/0" in table.stdout


def test_config_show_redacts_cluster_urls(tmp_path: Path) -> None:
    nodes = '["redis://u:hunter5@h1:1", "redis://u:hunter5@h2:2"]'
    text = "tiers:\n" + CPU + f"  r: {{type: redis, capacity: 1MiB, cluster: {nodes}}}\n"
    shown = invoke("config", "show", "-f", str(write(tmp_path, text)), "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["tiers.r.cluster"]["value"] == [
        "redis://u:********@h1:1",
        "redis://u:********@h2:2",
    ]


def test_validation_message_redacts_url_passwords() -> None:
    tiers = {**URL_TIERS, "r": {**URL_TIERS["r"], "url": "http://u:hunter6@h:1/0"}}
    with pytest.raises(ConfigError) as err:
        KVortexConfig.load(plugins=[UrlPlugin()], tiers=tiers)
    message = str(err.value)
    assert "hunter6" not in message
    assert "http://u:********@h:1/0" in message and "must start with mem://" in message


def test_validate_cli_redacts_url_password_in_message(tmp_path: Path) -> None:
    text = "tiers:\n" + CPU + '  r: {type: redis, capacity: 1MiB, url: "http://u:hunter6@h:1/0"}\n'
    result = invoke("config", "validate", str(write(tmp_path, text)))
    assert result.exit_code == 2
    assert "hunter6" not in result.output and "u:********@h" in result.output


# --- B3: the first tier must be a cpu tier, checked at load -------------------------------


def test_first_tier_not_cpu_is_rejected_at_load(tmp_path: Path) -> None:
    path = write(tmp_path, "tiers:\n  d: {type: disk, capacity: 1MiB, path: /tmp/x}\n")
    with pytest.raises(ConfigError) as err:
        KVortexConfig.load(path)
    message = str(err.value)
    assert "tiers.d.type = 'disk'" in message and "must have type 'cpu'" in message
    assert "KVORTEX_TIERS__D__TYPE" in message and f"in {path}" in message
    assert "fix: put a cpu tier first" in message
    result = invoke("config", "validate", str(path))
    assert result.exit_code == 2 and "must have type 'cpu'" in result.stderr


def test_a_second_cpu_tier_is_rejected_at_load(tmp_path: Path) -> None:
    path = write(tmp_path, "tiers:\n  cpu: {type: cpu, capacity: 1MiB}\n  more: {type: cpu, capacity: 1MiB}\n")
    with pytest.raises(ConfigError) as err:
        KVortexConfig.load(path)
    message = str(err.value)
    assert "tiers.more.type = 'cpu': only the first tier ('cpu') may be a cpu tier" in message
    assert "KVORTEX_TIERS__MORE__TYPE" in message and "raise tiers.cpu.capacity" in message


def test_cpu_tier_first_then_others_is_valid() -> None:
    config = KVortexConfig(
        tiers={
            "cpu": {"type": "cpu", "capacity": "1MiB"},
            "m": {"type": "memory", "capacity": "1MiB"},
        }
    )
    assert config.tier_names == ["cpu", "m"]


def test_tier_order_comes_from_the_source_listing_the_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One env variable adjusting the lower tier must not move it above the cpu tier (the
    # merge alone ordered tiers by the lowest source naming them: m, cpu).
    monkeypatch.setenv("KVORTEX_TIERS__M__CAPACITY", "2MiB")
    tiers = {
        "cpu": {"type": "cpu", "capacity": "1MiB"},
        "m": {"type": "memory", "capacity": "1MiB"},
    }
    config = KVortexConfig(tiers=tiers)
    assert config.tier_names == ["cpu", "m"] and config.tiers["m"].capacity == MiB
    text = "tiers:\n" + CPU + "  m: {type: memory, capacity: 1MiB}\n"
    assert KVortexConfig.load(write(tmp_path, text)).tier_names == ["cpu", "m"]


# --- B5: options: and flat keys follow the source order; a clash in one source is an error --

BASE_FLAT = "tiers:\n" + CPU + "  disk: {type: disk, capacity: 1MiB, path: /tmp/rt_yaml}\n"
BASE_NESTED = (
    "tiers:\n" + CPU + "  disk: {type: disk, capacity: 1MiB, options: {path: /tmp/rt_yaml}}\n"
)


@pytest.mark.parametrize("yaml_text", [BASE_FLAT, BASE_NESTED])
@pytest.mark.parametrize(
    "env_name", ["KVORTEX_TIERS__DISK__OPTIONS__PATH", "KVORTEX_TIERS__DISK__PATH"]
)
def test_env_beats_yaml_whatever_the_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, yaml_text: str, env_name: str
) -> None:
    monkeypatch.setenv(env_name, "/tmp/from_env")
    path = write(tmp_path, yaml_text)
    config = KVortexConfig.load(path)
    assert backend_options(config, "disk", PluginManager()).path == Path("/tmp/from_env")  # type: ignore[attr-defined]
    assert provenance(config)["tiers.disk.path"] == ("/tmp/from_env", Source("env", env_name))
    shown = json.loads(invoke("config", "show", "-f", str(path), "--json").stdout)
    assert shown["tiers.disk.path"] == {"value": "/tmp/from_env", "source": f"env {env_name}"}


def test_argument_options_beat_yaml_flat(tmp_path: Path) -> None:
    config = KVortexConfig.load(
        write(tmp_path, BASE_FLAT),
        tiers={"disk": {"options": {"path": "/tmp/arg"}}},
    )
    assert config.tier_names == ["cpu", "disk"]
    assert config.tiers["disk"].options == {"path": "/tmp/arg"}
    assert provenance(config)["tiers.disk.path"][1] == Source("argument")


def test_flat_and_options_in_one_source_is_an_error(tmp_path: Path) -> None:
    text = "tiers:\n" + CPU + "  d: {type: disk, capacity: 1MiB, path: /a, options: {path: /b}}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        KVortexConfig.load(path)
    message = str(err.value)
    assert "tiers.d.path = '/a' and tiers.d.options.path = '/b'" in message
    assert f"both from YAML {path}" in message
    assert "KVORTEX_TIERS__D__PATH" in message and "KVORTEX_TIERS__D__OPTIONS__PATH" in message
    with pytest.raises(
        ConfigError, match=r"\(both from argument\): the same option is given twice"
    ):
        KVortexConfig(
            tiers={
                "cpu": {"type": "cpu", "capacity": "1MiB"},
                "d": {"type": "disk", "capacity": "1MiB", "path": "/a", "options": {"path": "/b"}},
            }
        )
    with pytest.raises(ValueError, match="'path' is given twice, as 'path' and as 'options.path'"):
        TierConfig(type="disk", capacity=1, path="/a", options={"path": "/b"})
    assert TierConfig(type="disk", capacity=1, options={"path": "/b"}).options == {"path": "/b"}


def test_tier_key_under_options_is_an_error(tmp_path: Path) -> None:
    text = "tiers:\n" + CPU + "  d: {type: disk, path: /a, options: {capacity: 1MiB}}\n"
    with pytest.raises(ConfigError, match="'capacity' is a key of the tier, not a backend"):
        KVortexConfig.load(write(tmp_path, text))


# --- B6: messages and exit status 2, never a traceback ------------------------------------


def test_non_utf8_yaml_is_a_message(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe bad utf")
    with pytest.raises(ConfigError, match="is not UTF-8 text .*0xff.*save it as UTF-8"):
        KVortexConfig.load(path)
    result = invoke("config", "validate", str(path))
    assert result.exit_code == 2 and "not UTF-8" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("name", "value", "fix"),
    [
        ("KVORTEX_TIERS", "not json", "KVORTEX_TIERS__CPU__CAPACITY=8GiB"),
        ("KVORTEX_EVICTION", "{bad", "KVORTEX_EVICTION__POLICY="),
        ("KVORTEX_METRICS", "[1, 2]", "KVORTEX_METRICS__ENABLED="),
    ],
)
def test_bad_json_section_env_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fix: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        KVortexConfig()
    message = str(err.value)
    assert f"environment variable {name}=" in message and "JSON object" in message
    assert fix in message
    result = invoke("config", "show")
    assert result.exit_code == 2 and name in result.stderr
    assert "Traceback" not in result.output


def _stats_app() -> typer.Typer:
    sub = typer.Typer()

    @sub.callback()
    def root() -> None:
        """test app"""

    register_stats(sub)
    return sub


def test_stats_rejects_a_non_url() -> None:
    result = CliRunner().invoke(_stats_app(), ["stats", "--url", "notaurl", "--once"])
    assert result.exit_code == 2
    assert "notaurl" in result.output and "http://" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.fixture
def html_server() -> Iterator[str]:
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!DOCTYPE html><html><body>not metrics</body></html>\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_stats_on_a_non_prometheus_page_is_a_message(html_server: str) -> None:
    result = CliRunner().invoke(_stats_app(), ["stats", "--url", html_server, "--once"])
    assert result.exit_code == 1  # as for an unreachable URL (docs/cli.md)
    assert "not in the Prometheus text format" in result.output
    assert isinstance(result.exception, SystemExit)


def test_demo_unknown_device_is_a_usage_error() -> None:
    result = invoke("demo", "--device", "tpu")
    assert result.exit_code == 2
    assert "--device tpu" in result.output and "cpu, cuda or cuda:N" in result.output
    assert isinstance(result.exception, SystemExit)


# --- B7: a prompt shorter than one chunk is refused up front ------------------------------


def test_demo_rejects_fewer_tokens_than_a_chunk() -> None:
    result = invoke("demo", "--tokens", "100", "--layers", "2", "--device", "cpu")
    assert result.exit_code == 2
    assert "--tokens 100 is fewer than one chunk (chunk_tokens = 256, from default)" in (
        result.stderr
    )
    assert "--tokens >= 256" in result.stderr
    assert "NO" not in result.stdout and "FAILED" not in result.output


# --- B8: provenance of a section given as JSON --------------------------------------------


def test_json_env_is_credited_only_with_what_it_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, BASE_FLAT)
    monkeypatch.setenv("KVORTEX_TIERS", '{"cpu": {"type": "cpu", "capacity": "2MiB"}}')
    monkeypatch.setenv("KVORTEX_EVICTION", '{"policy": "lru"}')
    monkeypatch.setenv("KVORTEX_EVICTION__POLICY", "s3fifo")  # the nested variable wins
    config = KVortexConfig.load(path)
    rows = provenance(config)
    assert rows["tiers.cpu.capacity"] == (2 * MiB, Source("env", "KVORTEX_TIERS"))
    assert rows["tiers.cpu.write_through"][1] == Source("default")
    for leaf in ("type", "capacity", "path"):
        assert rows[f"tiers.disk.{leaf}"][1] == Source("yaml", str(path)), leaf
    assert rows["eviction.policy"] == ("s3fifo", Source("env", "KVORTEX_EVICTION__POLICY"))
    assert rows["eviction.high_watermark"][1] == Source("default")


# --- nits: sizes, file messages, tier names, timeouts ---------------------------------------


def _capacity(value: Any) -> int:
    config = KVortexConfig(tiers={"cpu": {"type": "cpu", "capacity": value}})
    return int(config.tiers["cpu"].capacity)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("4096", 4096), (4096, 4096), (4096.0, 4096), ("1e6", 10**6), (" 2MiB ", 2 * MiB)],
)
def test_unitless_sizes_are_byte_counts(value: Any, expected: int) -> None:
    assert _capacity(value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("1.5", "not a whole number of bytes; add a unit, e.g. '1.5GiB'"),
        (1.5, "not a whole number of bytes; add a unit, e.g. '1.5GiB'"),
        (True, "True is not a size"),
        (-5, "cannot be negative"),
        ("-5", "cannot be negative"),
        ("-1GiB", "cannot be negative"),
    ],
)
def test_bad_sizes_say_what_is_wrong(value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        _capacity(value)
    message = str(err.value)
    assert fragment in message and "tiers.cpu.capacity" in message
    assert "KVORTEX_TIERS__CPU__CAPACITY" in message


def test_staging_bytes_rejects_bool_and_fractions() -> None:
    for value in (True, "0.5"):
        with pytest.raises(ConfigError, match="transfer.staging_bytes"):
            KVortexConfig(transfer={"staging_bytes": value})


def test_missing_file_given_explicitly_does_not_blame_the_env(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        KVortexConfig.load(tmp_path / "nope.yaml")
    assert "does not exist" in str(err.value) and "KVORTEX_CONFIG_FILE" not in str(err.value)
    result = invoke("config", "show", "-f", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "KVORTEX_CONFIG_FILE" not in result.stderr


def test_integer_tier_name_is_a_clear_error(tmp_path: Path) -> None:
    text = "tiers:\n" + CPU + "  1: {type: disk, capacity: 1MiB, path: /tmp/x}\n"
    with pytest.raises(ConfigError) as err:
        KVortexConfig.load(write(tmp_path, text))
    message = str(err.value)
    assert "tiers.1: the tier name 1 is a number, not a string" in message
    assert "[key]" not in message and "KVORTEX_TIERS__1" in message
    assert "quote it" in message


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "inf"])
def test_timeouts_must_be_finite(value: Any) -> None:
    with pytest.raises(ConfigError) as err:
        KVortexConfig(timeouts={"backend_op_s": value})
    assert "timeouts.backend_op_s" in str(err.value) and "finite" in str(err.value)


# --- nits: kvortex stats -------------------------------------------------------------------


def test_alloc_failures_are_pressure_not_errors() -> None:
    stats = Stats()
    stats.inc("alloc_failures", 4, "cpu")
    stats.inc("tier_timeouts", 1, "disk")
    with MetricsExporter(stats).start() as exp:
        view = parse_metrics(exp.scrape())
    assert view.errors == 1 and view.alloc_failures == 4
    assert view.tiers["cpu"].errors == 0 and view.tiers["cpu"].alloc_failures == 4


def test_stats_headers_are_whole_at_80_columns() -> None:
    from rich.console import Console

    stats = Stats()
    stats.set_gauge("used_bytes", 1000 * MiB, "cpu")
    stats.set_gauge("capacity_bytes", 4096 * MiB, "cpu")
    stats.set_gauge("capacity_bytes", 500 * 1024 * MiB, "disk")
    stats.inc("alloc_failures", 2, "cpu")
    stats.set_gauge("breaker_state", 2, "disk")
    with MetricsExporter(stats).start() as exp:
        view = parse_metrics(exp.scrape())
    console = Console(width=80, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(render(view, view, 1.0))
    text = console.export_text()
    assert "…" not in text
    for header in ("tier", "used", "capacity", "chunks", "saved", "loaded", "evicted", "errors"):
        assert f" {header} " in text, header
    assert "MB/s" in text and "half-open" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "alloc failures 2 (pressure)" in " ".join(text.split())


def test_a_typo_of_a_plain_setting_shows_its_value_a_misspelt_credential_stays_masked(tmp_path: Path) -> None:
    """``chunk_token`` (for chunk_tokens) holds "token" but is no credential: its value is shown;
    ``pasword`` (for password) is masked. Both are named unknown keys."""
    path = tmp_path / "kvortex.yaml"
    path.write_text("chunk_token: 512\n")
    with pytest.raises(ConfigError, match=r"chunk_token = 512 .*unknown key"):
        KVortexConfig.load(config_file=path)
    with pytest.raises(ConfigError) as err:
        KVortexConfig(tiers={"cpu": {"type": "cpu"}, "r": {"type": "redis", "url": "redis://h:1",
                                                         "pasword": "hunter2"}})
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(("field", "value"), [("chunk_tokens", True), ("chunk_tokens", False)])
def test_a_bool_where_a_number_belongs_is_refused(field: str, value: bool) -> None:
    with pytest.raises(ConfigError, match=rf"{field} = {value}.*boolean, not a number"):
        KVortexConfig(**{field: value})
    with pytest.raises(ConfigError, match="boolean, not a number"):
        KVortexConfig(eviction={"high_watermark": True})


def test_a_tier_added_by_env_or_keywords_goes_below_the_yaml_stack(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A YAML with the cpu tier plus a disk tier from env variables or keyword arguments (vLLM's
    kv_connector_extra_config): the disk tier goes below (it went first, and the config was
    refused as having no cpu tier first)."""
    path = write(tmp_path, "tiers:\n" + CPU)
    disk = {"type": "disk", "capacity": "1MiB", "path": str(tmp_path / "d")}
    assert KVortexConfig.load(path, tiers={"disk": disk}).tier_names == ["cpu", "disk"]
    for key, value in disk.items():
        monkeypatch.setenv(f"KVORTEX_TIERS__DISK__{key.upper()}", value)
    assert KVortexConfig.load(path).tier_names == ["cpu", "disk"]


def test_env_tweaks_of_every_tier_keep_the_yaml_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Environment variables carry no order: one tweak per tier must not reorder the stack
    (cpu, m, disk became cpu, disk, m: the env's order won a tie)."""
    text = ("tiers:\n" + CPU + "  m: {type: memory, capacity: 1MiB}\n"
            f"  disk: {{type: disk, capacity: 1MiB, path: {tmp_path / 'd'}}}\n")
    for name in ("DISK", "CPU", "M"):  # set in an order other than the file's
        monkeypatch.setenv(f"KVORTEX_TIERS__{name}__CAPACITY", "2MiB")
    assert KVortexConfig.load(write(tmp_path, text)).tier_names == ["cpu", "m", "disk"]


def test_tiers_named_only_by_env_put_the_cpu_tier_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_TIERS__DISK__TYPE", "disk")
    monkeypatch.setenv("KVORTEX_TIERS__DISK__CAPACITY", "1MiB")
    monkeypatch.setenv("KVORTEX_TIERS__DISK__PATH", str(tmp_path / "d"))
    monkeypatch.setenv("KVORTEX_TIERS__CPU__CAPACITY", "1MiB")
    assert KVortexConfig().tier_names == ["cpu", "disk"]


def test_a_tier_called_cpu_of_another_type_gets_a_fix_that_is_valid_yaml() -> None:
    with pytest.raises(ConfigError) as err:
        KVortexConfig(tiers={"cpu": {"type": "memory", "capacity": "1MiB"}})
    fix = str(err.value).split("fix: ")[1]
    assert "{cpu: {type: cpu, capacity: 8GiB}, memory: {type: memory, ...}}" in fix
    assert fix.count("cpu:") == 1  # one key per name: the hint parses as YAML
