"""The plugin manager: entry-point discovery, registration rules, env switches, errors."""

from __future__ import annotations

import importlib.metadata
import logging
import os
from typing import Any

import pytest

from kvortex_core import MissingDependencyError, PluginError, hookimpl
from kvortex_core.plugins import PluginManager
from kvortex_core.plugins.manager import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, TRACE_ENV
from kvortex_core.testing import MemoryBackend
from kvortex_core.testing import memory as memory_plugin


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("KVORTEX_"):
            monkeypatch.delenv(name)


class Other(MemoryBackend):
    pass


def plugin_registering(**backends: type) -> object:
    class Plugin:
        @hookimpl
        def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
            for name, cls in backends.items():
                register(name.replace("_", "-"), cls)

    return Plugin()


def test_hookimpl_is_the_kvortex_marker() -> None:
    import kvortex_core

    assert kvortex_core.hookimpl.project_name == "kvortex"


def test_builtins_come_through_entry_points() -> None:
    names = {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert {"kvortex-core", "kvortex-backends"} <= names
    backends = PluginManager().backends()
    assert backends["memory"].distribution == "kvortex-core"
    for name in ("cpu", "disk"):
        assert backends[name].distribution == "kvortex-backends"
        assert backends[name].plugin == "kvortex-backends"
        assert backends[name].version


def test_each_manager_is_independent() -> None:
    first = PluginManager([plugin_registering(extra=Other)])
    second = PluginManager()
    assert "extra" in first.backends()
    assert "extra" not in second.backends()


def test_disable_autoload_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch drops third-party entry points only: the error of a broken plugin advises it,
    and it used to drop the built-in tiers too, so every config then failed with "install
    kvortex-backends" (a red-team finding). autoload=False drops them all."""
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    kept = PluginManager().backends()
    assert {"cpu", "disk", "memory"} <= set(kept)
    assert {info.distribution for info in kept.values()} <= {"kvortex-core", "kvortex-backends"}
    assert PluginManager(autoload=False).backends() == {}
    explicit = PluginManager([memory_plugin], autoload=False)
    assert list(explicit.backends()) == ["memory"]
    assert explicit.backends()["memory"].distribution is None


def test_autoload_argument_overrides_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    assert "memory" in PluginManager(autoload=True).backends()


def test_trace_env_logs_hook_calls(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(TRACE_ENV, "1")
    with caplog.at_level(logging.DEBUG, logger="kvortex_core.plugins"):
        PluginManager().backends()
    traced = [r.getMessage() for r in caplog.records if r.name == "kvortex_core.plugins"]
    assert any("kvortex_register_backends" in line for line in traced)


def test_no_trace_without_env(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kvortex_core.plugins"):
        PluginManager().backends()
    assert not [r for r in caplog.records if "kvortex_register_backends" in r.getMessage()]


def test_duplicate_name_names_both_classes() -> None:
    manager = PluginManager([plugin_registering(memory=Other)])
    with pytest.raises(PluginError) as err:
        manager.backends()
    message = str(err.value)
    assert "'memory' is registered twice" in message
    assert "kvortex_core.testing.memory.MemoryBackend" in message
    assert f"{__name__}.Other" in message


@pytest.mark.parametrize(
    ("name", "cls", "fragment"),
    [
        ("Bad Name", Other, "names are lowercase"),
        ("fine", dict, "must be a subclass of kvortex_core.StorageBackend"),
        ("fine", type("NoOptions", (MemoryBackend,), {"Options": None}), "Options is None; it must be a subclass"),
        ("fine", type("DictOptions", (MemoryBackend,), {"Options": dict}), "must be a subclass of kvortex_core.BackendOptions"),
    ],
)
def test_bad_registrations(name: str, cls: type, fragment: str) -> None:
    class Plugin:
        @hookimpl
        def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
            register(name, cls)

    with pytest.raises(PluginError, match=fragment):
        PluginManager([Plugin()], autoload=False).backends()


def test_misspelt_hook_fails_at_registration() -> None:
    class Typo:
        @hookimpl
        def kvortex_register_backend(self, register):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(
        PluginError, match="unknown hook 'kvortex_register_backend'.*kvortex_register_backends"
    ):
        PluginManager([Typo()], autoload=False)


def test_unknown_backend_lists_registered_ones() -> None:
    with pytest.raises(
        PluginError, match=r"unknown backend type 'nope'; registered backends: .*memory"
    ):
        PluginManager().backend("nope")


def test_missing_dependency_message() -> None:
    class NeedsSdk(MemoryBackend):
        requires = ("kvortex_no_such_sdk",)
        install_hint = 'pip install "kvortex-backends[s3]"'

    info = PluginManager([plugin_registering(needs=NeedsSdk)], autoload=False).backend("needs")
    assert info.missing_dependencies() == ["kvortex_no_such_sdk"]
    with pytest.raises(
        MissingDependencyError, match=r'install it with: pip install "kvortex-backends\[s3\]"'
    ):
        info.check_dependencies()


def test_broken_entry_point_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = importlib.metadata.EntryPoint(
        "kvortex-broken", "kvortex_no_such_module.plugin", ENTRY_POINT_GROUP
    )
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [broken])
    with pytest.raises(PluginError) as err:
        PluginManager()
    assert "'kvortex-broken'" in str(err.value)
    assert "kvortex_no_such_module" in str(err.value)
    assert DISABLE_AUTOLOAD_ENV in str(err.value)


def test_hook_runs_once_per_manager() -> None:
    calls = []

    class Counting:
        @hookimpl
        def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
            calls.append(1)
            register("counted", Other)

    manager = PluginManager([Counting()], autoload=False)
    assert manager.backends() is manager.backends()
    assert calls == [1]


def test_core_and_registration_need_no_optional_dependency() -> None:
    """kvortex-core installs without redis/boto3 (and without pytest): loading every plugin
    and a config must not import them."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"redis", "boto3", "botocore", "pytest", "vllm"}:
                    raise ImportError(f"blocked {name}")
        sys.meta_path.insert(0, Block())
        from kvortex_core import KVortexConfig
        from kvortex_core.plugins import PluginManager
        backends = PluginManager().backends()
        assert {"memory", "cpu", "disk"} <= set(backends), backends
        KVortexConfig(tiers={"cpu": {"type": "cpu", "capacity": "1MiB"},
                             "m": {"type": "memory", "capacity": "1MiB"}})
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("KVORTEX_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_builtin_name_without_kvortex_backends_gives_install_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(PluginError, match=r"'redis' \(it comes with kvortex-backends: pip install"):
        PluginManager([memory_plugin], autoload=False).backend("redis")


def test_a_hook_that_raises_names_its_plugin() -> None:
    """A third-party hook's bug: a PluginError naming the plugin and the way out (the CLI shows
    it as a usage error), not a bare traceback from inside the hook."""
    class Broken:
        @hookimpl
        def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom in the plugin")

    with pytest.raises(PluginError, match=r"plugin '.*' \(registered in code\) failed in kvortex_register_backends: "
                                          r"RuntimeError: boom in the plugin; fix or uninstall it"):
        PluginManager([Broken()], autoload=False).backends()


def test_a_hook_calling_sys_exit_is_a_plugin_error_not_the_end_of_the_process() -> None:
    class Exits:
        @hookimpl
        def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
            raise SystemExit(4)

    with pytest.raises(PluginError, match=r"failed in kvortex_register_backends: SystemExit: 4"):
        PluginManager([Exits()], autoload=False).backends()


def test_a_hook_returning_its_backends_instead_of_registering_them_is_refused() -> None:
    class Returns:
        @hookimpl
        def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
            return {"mine": object}

    with pytest.raises(PluginError, match=r"returned dict .*it must call register\(name, BackendClass\)"):
        PluginManager([Returns()], autoload=False).backends()


def test_run_scenario_fails_a_hung_backend_call_instead_of_hanging() -> None:
    import asyncio

    from kvortex_core.storage.protocol import BackendContext
    from kvortex_core.testing import run_scenario
    from kvortex_core.testing.memory import MemoryBackend

    backend = MemoryBackend(MemoryBackend.Options(), capacity=1 << 20, context=BackendContext())
    with pytest.raises(TimeoutError, match="MemoryBackend: the scenario did not finish in 0.2 s"):
        run_scenario(backend, lambda b: asyncio.sleep(3600), timeout=0.2)


def test_an_abstract_backend_class_is_refused_at_registration() -> None:
    from kvortex_core.storage.protocol import StorageBackend

    class Half(StorageBackend):  # get, put, ... left out
        pass

    class Registers:
        @hookimpl
        def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
            register("half", Half)

    with pytest.raises(PluginError, match=r"'half' = .*Half, which leaves abstract methods unimplemented: .*get"):
        PluginManager([Registers()], autoload=False).backends()


def test_a_backend_constructor_that_raises_is_named_with_its_tier() -> None:
    import torch

    from kvortex_core import KVortexConfig
    from kvortex_core.control.stats import Stats
    from kvortex_core.testing.memory import MemoryBackend
    from kvortex_core.tiering.manager import TierManager

    class Connects(MemoryBackend):
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise ConnectionError("connected in __init__ and failed")

    class Registers:
        @hookimpl
        def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
            register("eager", Connects)

    tiers = {"cpu": {"type": "cpu", "capacity": "1MiB"}, "far": {"type": "eager", "capacity": "1MiB"}}
    config = KVortexConfig.load(plugins=[Registers()], model_id="m", tiers=tiers)
    with pytest.raises(PluginError, match=r"tier 'far': backend 'eager' \(.*Connects, plugin .*\) failed to "
                                          r"construct: ConnectionError: connected in __init__ and failed"):
        TierManager.create(config, PluginManager(plugins=[Registers()]), namespace=b"n" * 16,
                           payload_shape=(2, 16), dtype=torch.float16, stats=Stats())


def test_a_broken_plugin_is_reported_once_not_as_errors_in_each_tier() -> None:
    from kvortex_core import ConfigError, KVortexConfig

    class Clash:
        @hookimpl
        def kvortex_register_backends(self, register):  # type: ignore[no-untyped-def]
            register("memory", Other)  # the built-in test backend's name

    with pytest.raises(ConfigError) as err:
        KVortexConfig.load(plugins=[Clash()], tiers={"cpu": {"type": "cpu"}, "m": {"type": "memory", "capacity": "1MiB"}})
    text = str(err.value)
    assert "installed plugins: backend name 'memory' is registered twice" in text
    assert "tiers.cpu.type" not in text and text.count("registered twice") == 1


def test_a_plugin_calling_sys_exit_at_import_is_a_plugin_error(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """sys.exit(3) in a plugin's module made every command exit 3 without a word."""
    (tmp_path / "kvortex_exits.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = importlib.metadata.EntryPoint("kvortex-exits", "kvortex_exits", ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [ep])
    with pytest.raises(PluginError, match=r"'kvortex-exits'.*failed to import: SystemExit: 3"):
        PluginManager()
