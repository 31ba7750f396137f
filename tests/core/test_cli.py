"""The ``kvortex`` command: exit codes and output of config, backends, demo; the console script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvortex_core.cli.app import app

GOOD = """
chunk_tokens: 128
tiers:
  hot:
    type: cpu
    capacity: 1GiB
"""
BAD = GOOD.replace("chunk_tokens: 128", "chunk_tokenz: 128")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("KVORTEX_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long cells at 80 columns off a terminal
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def yaml_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kvortex.yaml"
    path.write_text(text)
    return path


def test_version_and_help(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("kvortex-core ")
    help_text = runner.invoke(app, ["--help"]).stdout
    for command in ("config", "backends", "demo", "bench"):
        assert command in help_text


def test_stats_is_wired_when_built(runner: CliRunner) -> None:
    if importlib.util.find_spec("kvortex_core.cli.stats_cmd") is None:
        pytest.skip("kvortex_core.cli.stats_cmd is not built")
    assert runner.invoke(app, ["stats", "--help"]).exit_code == 0


def test_config_show_names_sources(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = yaml_file(tmp_path, GOOD)
    monkeypatch.setenv("KVORTEX_EVICTION__POLICY", "s3fifo")
    result = runner.invoke(app, ["config", "show", "--file", str(path), "--set", "salt=tenant-7"])
    assert result.exit_code == 0, result.stderr
    lines = {
        line.split("│")[1].strip(): line
        for line in result.stdout.splitlines()
        if line.count("│") >= 3
    }
    assert "argument" in lines["salt"] and "tenant-7" in lines["salt"]
    assert "env KVORTEX_EVICTION__POLICY" in lines["eviction.policy"]
    assert f"YAML {path}" in lines["chunk_tokens"] and "128" in lines["chunk_tokens"]
    assert "1 GiB" in lines["tiers.hot.capacity"]  # sizes in human units
    assert "default" in lines["eviction.high_watermark"]


def test_config_show_json_uses_config_file_env(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVORTEX_CONFIG_FILE", str(yaml_file(tmp_path, GOOD)))
    result = runner.invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["chunk_tokens"] == {"value": 128, "source": f"YAML {tmp_path / 'kvortex.yaml'}"}
    assert data["tiers.hot.capacity"]["value"] == {"bytes": 1024**3, "human": "1 GiB"}
    assert data["transfer.num_streams"]["source"] == "default"


def test_config_show_bad_config_exits_with_message(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVORTEX_CHUNK_TOKENS", "lots")
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "chunk_tokens = 'lots' (from env KVORTEX_CHUNK_TOKENS)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_config_show_bad_set_syntax(runner: CliRunner) -> None:
    result = runner.invoke(app, ["config", "show", "--set", "chunk_tokens"])
    assert result.exit_code == 2 and "expected PATH=VALUE" in result.stderr


def test_config_validate_good_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "validate", str(yaml_file(tmp_path, GOOD))])
    assert result.exit_code == 0, result.stderr
    assert "valid" in result.stdout
    assert "chunk_tokens=128" in result.stdout and "hot (cpu, 1 GiB)" in result.stdout


def test_config_validate_bad_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "validate", str(yaml_file(tmp_path, BAD))])
    assert result.exit_code == 2
    assert "chunk_tokenz = 128" in result.stderr
    assert "did you mean 'chunk_tokens'" in result.stderr
    assert result.stdout == ""


def test_config_validate_missing_file(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "validate", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_config_validate_isolated_ignores_env(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = str(yaml_file(tmp_path, GOOD))
    monkeypatch.setenv("KVORTEX_CHUNK_TOKENS", "-1")
    assert runner.invoke(app, ["config", "validate", path]).exit_code == 2
    result = runner.invoke(app, ["config", "validate", "--isolated", path])
    assert result.exit_code == 0, result.stderr
    assert os.environ["KVORTEX_CHUNK_TOKENS"] == "-1"  # restored afterwards


def test_backends_list(runner: CliRunner) -> None:
    result = runner.invoke(app, ["backends", "list"])
    assert result.exit_code == 0, result.stderr
    for fragment in ("memory", "kvortex-core", "cpu", "disk", "kvortex-backends"):
        assert fragment in result.stdout
    rows = {
        r["name"]: r for r in json.loads(runner.invoke(app, ["backends", "list", "--json"]).stdout)
    }
    assert rows["memory"]["distribution"] == "kvortex-core"
    assert rows["memory"]["version"] and rows["memory"]["dependencies_installed"] is True
    assert rows["disk"]["class"] == "kvortex_backends.disk.DiskBackend"


def test_backends_list_reports_missing_dependency(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvortex_core.testing import MemoryBackend

    monkeypatch.setattr(MemoryBackend, "requires", ("kvortex_no_such_sdk",), raising=False)
    monkeypatch.setattr(MemoryBackend, "install_hint", 'pip install "kvortex-x[y]"', raising=False)
    row = {
        r["name"]: r for r in json.loads(runner.invoke(app, ["backends", "list", "--json"]).stdout)
    }["memory"]
    assert row["dependencies_installed"] is False and row["missing"] == ["kvortex_no_such_sdk"]
    table = runner.invoke(app, ["backends", "list"]).stdout
    assert 'missing kvortex_no_such_sdk: pip install "kvortex-x[y]"' in table  # not eaten as markup


def test_backends_list_keeps_the_built_in_tiers_when_autoload_is_disabled(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVORTEX_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = runner.invoke(app, ["backends", "list"])
    assert result.exit_code == 0 and "cpu" in result.stdout and "disk" in result.stdout


def test_backends_list_says_how_to_get_backends_when_none_is_registered(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvortex_core.plugins import manager

    monkeypatch.setattr(manager, "_FIRST_PARTY", frozenset())  # as with kvortex-core alone
    monkeypatch.setenv("KVORTEX_DISABLE_PLUGIN_AUTOLOAD", "1")
    result = runner.invoke(app, ["backends", "list"])
    assert result.exit_code == 0 and "no backends registered" in result.stdout


needs_engine = pytest.mark.skipif(
    importlib.util.find_spec("kvortex_core.engine") is None,
    reason="kvortex_core.engine is not built yet",
)
SMALL = [
    "--layers",
    "2",
    "--kv-heads",
    "2",
    "--head-size",
    "32",
    "--prompts",
    "2",
    "--tokens",
    "600",
    "--device",
    "cpu",
]


@needs_engine
def test_demo_round_trip(runner: CliRunner) -> None:
    result = runner.invoke(app, ["demo", *SMALL])
    assert result.exit_code == 0, result.stdout + result.stderr
    out = result.stdout
    assert "loaded bytes equal saved bytes" in out and "yes" in out.split("loaded bytes equal")[1]
    # 2 prompts of 600 tokens: 2 whole chunks of 256 each are stored; 1 unseen prompt misses
    assert (
        "tokens loaded" in out and " 1024 " in out.split("tokens loaded")[1].splitlines()[0] + " "
    )
    assert "hit rate" in out and "GB/s" in out


@needs_engine
def test_demo_with_config_file(runner: CliRunner, tmp_path: Path) -> None:
    text = "chunk_tokens: 128\ntiers:\n  cpu: {type: cpu, capacity: 64MiB}\n"
    result = runner.invoke(app, ["demo", *SMALL, "--config", str(yaml_file(tmp_path, text))])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "cpu (cpu, 64 MiB)" in result.stdout


@needs_engine
def test_demo_with_two_blocks_in_its_cache(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    """One prompt of one block: the demo's (2, 2, ...) cache is ambiguous by shape alone; the
    demo names its layout (it failed with "pass hints=", which a CLI user cannot do)."""
    monkeypatch.setenv("KVORTEX_CHUNK_TOKENS", "16")
    result = runner.invoke(app, ["demo", "--layers", "1", "--block-size", "16", "--prompts", "1",
                                 "--tokens", "16", "--device", "cpu"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "yes" in result.stdout.split("loaded bytes equal")[1]


@needs_engine
def test_demo_shows_a_tier_that_could_not_open(runner: CliRunner, tmp_path: Path) -> None:
    """A lower tier that never opened showed as "0 B of 1 GiB", like an idle one, and the demo
    said nothing else (a red-team finding): it now shows the tier out of service, and why."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    text = ("tiers:\n  cpu: {type: cpu, capacity: 64MiB}\n"
            f"  disk: {{type: disk, capacity: 64MiB, path: '{blocker}'}}\n")
    result = runner.invoke(app, ["demo", *SMALL, "--config", str(yaml_file(tmp_path, text))])
    assert result.exit_code == 0, result.stdout + result.stderr
    row = " ".join(result.stdout.split("tier disk state")[1].split("│")[1:4])
    assert "out of service" in row, result.stdout


@pytest.mark.parametrize("cmd", [["bench", "core", "--reps", "1"], ["bench", "transfer", "--device", "cpu"],
                                 ["bench", "disk", "--sizes", "1"], ["bench", "simulate"]])
def test_bench_out_that_is_a_file_is_a_usage_error(runner: CliRunner, tmp_path: Path, cmd: list[str]) -> None:
    """--out naming a file: a usage error before any measurement (a traceback after the whole
    run, before)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    result = runner.invoke(app, [*cmd, "--out", str(afile)])
    assert result.exit_code == 2
    assert "is a file, not a directory" in result.stdout + result.stderr


def test_a_bench_refused_for_another_argument_creates_no_out_directory(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "new" / "results"
    result = runner.invoke(app, ["bench", "transfer", "--tokens", "abc", "--out", str(out)])
    assert result.exit_code == 2 and not (tmp_path / "new").exists()


def test_demo_bad_config_exits_with_message(runner: CliRunner, tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", *SMALL, "--config", str(yaml_file(tmp_path, BAD))])
    assert result.exit_code == 2
    assert "chunk_tokenz" in result.stderr and "Traceback" not in result.stderr


def test_demo_rejects_missing_cuda(runner: CliRunner) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    result = runner.invoke(app, ["demo", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.stdout + result.stderr


def test_console_script_bad_config_no_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("kvortex")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kvortex_core.cli.app"]
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KVORTEX_")}
    done = subprocess.run(
        [*cmd, "config", "validate", str(yaml_file(tmp_path, BAD))],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "invalid KVortex configuration" in done.stderr and "Traceback" not in done.stderr
    ok = subprocess.run(
        [*cmd, "config", "validate", str(yaml_file(tmp_path, GOOD))],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert ok.returncode == 0 and "valid" in ok.stdout


def test_config_show_masks_credentials(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    tiers = '{"cpu": {"type": "cpu", "capacity": "1GiB"}, "team": {"type": "redis", "capacity": "1GiB", "password": "hunter2", "username": "svc"}}'
    monkeypatch.setenv("KVORTEX_TIERS", tiers)
    result = runner.invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tiers.team.password"]["value"] == "********"
    assert data["tiers.team.username"]["value"] == "svc"
    assert "hunter2" not in runner.invoke(app, ["config", "show"]).stdout


def test_readme_commands_exist_and_parse() -> None:
    """The README's two commands and CI's entry point are real, executable bash scripts."""
    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    for script in ("scripts/demo", "scripts/test", "scripts/setup", ".ci/run"):
        path = root / script
        assert os.access(path, os.X_OK), f"{script} is missing or not executable"
        done = subprocess.run(
            ["bash", "-n", str(path)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
    assert "./scripts/demo" in readme and "./scripts/test" in readme
    assert "scripts/test" in (root / ".ci/run").read_text()


def test_bench_backends_names_a_missing_client_before_measuring(
        runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injected: the s3 client and moto reported missing (an install without the extras)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("boto3", "moto") else real(name, *a))
    result = runner.invoke(app, ["bench", "backends", "--targets", "s3", "--out", str(tmp_path)])
    assert result.exit_code == 2
    out = result.stdout + result.stderr
    assert "s3 needs the boto3 package" in out and "moto" in out
    assert not (tmp_path / "backends.json").exists()


def test_validate_notes_tls_files_this_machine_lacks(runner: CliRunner, tmp_path: Path) -> None:
    """The docs' own Redis TLS example failed validation on any machine without its CA file
    (a red-team finding): a file of the serving machine is a note here, like the memory check."""
    pytest.importorskip("redis")
    path = yaml_file(tmp_path, "tiers:\n  cpu: {type: cpu, capacity: 1GiB}\n"
                               "  team: {type: redis, capacity: 1GiB, url: 'rediss://cache:6380/0',"
                               " ssl_ca_certs: /etc/kvortex/ca.pem}\n")
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 0, result.stdout + result.stderr
    out = result.stdout.replace("\n", " ")
    assert "note: tiers.team: ssl_ca_certs '/etc/kvortex/ca.pem' is not a file here" in out


def test_validate_notes_a_cpu_tier_larger_than_this_machine(runner: CliRunner, tmp_path: Path) -> None:
    """Valid as a file (it may be meant for a larger server), but an engine here refuses it."""
    path = yaml_file(tmp_path, "tiers:\n  cpu: {type: cpu, capacity: 64PiB}\n")
    result = runner.invoke(app, ["config", "validate", str(path)])
    assert result.exit_code == 0
    assert "more than this machine's" in result.stdout.replace("\n", " ")
