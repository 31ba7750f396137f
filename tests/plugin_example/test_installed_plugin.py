"""The example third-party package, pip-installed for real, is discovered through its entry point.

The package is copied to a temporary folder and installed with pip into a temporary target
folder put on ``sys.path`` (and ``PYTHONPATH`` for subprocesses), so the shared venv is never
changed. Everything after that goes through the real ``kvortex`` entry-point group.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvortex_core import BackendContext, ConfigError, KVortexConfig, PluginError, hookimpl
from kvortex_core.config.backends import backend_options
from kvortex_core.plugins import PluginManager
from kvortex_core.testing import BackendConformance

PACKAGE = Path(__file__).parent
DIST = "kvortex-example-backend"


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """pip-install the example package into a fresh folder on ``sys.path``."""
    root = tmp_path_factory.mktemp("plugin")
    source = root / "kvortex-example-backend"
    shutil.copytree(
        PACKAGE, source, ignore=shutil.ignore_patterns("test_installed_plugin.py", "__pycache__")
    )
    site = root / "site"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--target",
        str(site),
        str(source),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        for name in [m for m in sys.modules if m.startswith("kvortex_example_backend")]:
            del sys.modules[name]
        importlib.invalidate_caches()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("KVORTEX_"):
            monkeypatch.delenv(name)


def _env_with(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KVORTEX_")}
    env["COLUMNS"] = "200"  # rich folds long cells at 80 columns when not on a terminal
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")]))
    return env


def test_discovered_through_entry_point(site_dir: Path, clean_env: None) -> None:
    backends = PluginManager().backends()
    info = backends["example"]
    assert info.distribution == DIST
    assert info.version == "0.3.1"
    assert info.plugin == DIST  # the entry point is named after its distribution
    assert info.qualname == "kvortex_example_backend.backend.ExampleBackend"
    assert str(site_dir) in sys.modules["kvortex_example_backend"].__file__
    assert "memory" in backends  # kvortex-core's own entry point is loaded the same way


def test_disabling_autoload_hides_it(
    site_dir: Path, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVORTEX_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "example" not in PluginManager().backends()
    module = importlib.import_module("kvortex_example_backend.plugin")
    explicit = PluginManager([module]).backends()
    assert {"example", "example-remote"} <= set(explicit) and "cpu" in explicit  # the built-in tiers stay
    assert explicit["example"].distribution is None  # registered in code, not by a package


#: The first tier must be a cpu tier; the plugin's tiers go below it.
CPU = {"cpu": {"type": "cpu", "capacity": "1MiB"}}


def test_config_validates_its_options(site_dir: Path, clean_env: None) -> None:
    config = KVortexConfig(
        tiers={**CPU, "t": {"type": "example", "capacity": "1MiB", "key_prefix": "a/"}}
    )
    options = backend_options(config, "t", PluginManager())
    assert type(options).__name__ == "ExampleOptions"
    assert options.key_prefix == "a/"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as err:
        KVortexConfig(
            tiers={**CPU, "t": {"type": "example", "capacity": "1MiB", "key_prefx": "a/"}}
        )
    message = str(err.value)
    assert "tiers.t.key_prefx = 'a/'" in message
    assert "did you mean 'key_prefix'" in message
    assert "KVORTEX_TIERS__T__KEY_PREFX" in message
    assert "key_prefix, max_value_bytes" in message  # what would be valid


def test_missing_dependency_fails_only_when_configured(site_dir: Path, clean_env: None) -> None:
    KVortexConfig(
        tiers={**CPU, "t": {"type": "example", "capacity": "1MiB"}}
    )  # registered, not used: fine
    with pytest.raises(ConfigError) as err:
        KVortexConfig(tiers={**CPU, "far": {"type": "example-remote", "capacity": "1MiB"}})
    message = str(err.value)
    assert "kvortex_example_missing_sdk" in message
    assert 'pip install "kvortex-example-backend[remote]"' in message
    assert "tiers.far.type" in message and "KVORTEX_TIERS__FAR__TYPE" in message


def test_duplicate_name_names_both_classes(site_dir: Path, clean_env: None) -> None:
    class Impostor:
        @hookimpl
        def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
            from kvortex_core.testing import MemoryBackend

            register("example", MemoryBackend)

    manager = PluginManager([Impostor()])
    with pytest.raises(PluginError) as err:
        manager.backends()
    assert "kvortex_example_backend.backend.ExampleBackend" in str(err.value)
    assert "kvortex_core.testing.memory.MemoryBackend" in str(err.value)


def _kvortex(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("kvortex")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kvortex_core.cli.app"]
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, env=_env_with(site), timeout=120, check=False
    )


def test_cli_lists_it(site_dir: Path) -> None:
    done = _kvortex(site_dir, "backends", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["example"]["distribution"] == DIST and rows["example"]["version"] == "0.3.1"
    assert rows["example"]["dependencies_installed"] is True
    assert rows["example-remote"]["dependencies_installed"] is False
    assert rows["example-remote"]["missing"] == ["kvortex_example_missing_sdk"]
    table = _kvortex(site_dir, "backends", "list")
    assert table.returncode == 0 and DIST in table.stdout and "example-remote" in table.stdout


def test_package_own_test_suite_passes(site_dir: Path, tmp_path: Path) -> None:
    """What the plugin author runs: pytest in the package folder against the installed code."""
    source = site_dir.parent / "kvortex-example-backend"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=source,
        capture_output=True,
        text=True,
        env=_env_with(site_dir),
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "20 passed" in done.stdout


class TestDiscoveredBackendConformance(BackendConformance):
    """The conformance kit run in-process on the class the entry point delivered."""

    @pytest.fixture
    def backend_factory(self, site_dir: Path, clean_env: None):  # type: ignore[no-untyped-def]
        info = PluginManager().backend("example")

        def make(capacity: int):  # type: ignore[no-untyped-def]
            return info.cls(info.cls.Options(), capacity=capacity, context=BackendContext())

        return make
