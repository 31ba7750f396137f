"""One plugin manager per engine: discovers plugins and owns backend naming.

Environment switches:
- ``KVORTEX_DISABLE_PLUGIN_AUTOLOAD=1``: load no third-party ``kvortex`` entry point (those
  of KVortex's own distributions, the built-in tiers of kvortex-backends, still load).
- ``KVORTEX_TRACE_PLUGINS=1``: log every hook call (logger ``kvortex_core.plugins``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pluggy

from kvortex_core.errors import MissingDependencyError, PluginError
from kvortex_core.plugins import hookspecs
from kvortex_core.plugins.marker import PROJECT

log = logging.getLogger("kvortex_core.plugins")

ENTRY_POINT_GROUP = "kvortex"
DISABLE_AUTOLOAD_ENV = "KVORTEX_DISABLE_PLUGIN_AUTOLOAD"
TRACE_ENV = "KVORTEX_TRACE_PLUGINS"
#: Built-in backend names and the install line of the package that registers them.
_BUILTIN_BACKENDS = {
    "cpu": "pip install kvortex-backends",
    "disk": "pip install kvortex-backends",
    "redis": 'pip install "kvortex-backends[redis]"',
    "s3": 'pip install "kvortex-backends[s3]"',
}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]{0,63}$")
#: KVortex's own distributions: their entry points load even with autoload disabled by the
#: environment (the switch is the way out of a broken third-party plugin, not off the tiers).
_FIRST_PARTY = frozenset({"kvortex-core", "kvortex-backends", "kvortex-vllm"})


def _canonical(dist_name: str) -> str:
    """A distribution name as PEP 503 compares them (``Kvortex_Backends`` -> ``kvortex-backends``)."""
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class BackendInfo:
    """A registered backend class and where it came from."""

    name: str
    cls: type
    plugin: str
    distribution: str | None
    version: str | None

    @property
    def qualname(self) -> str:
        return f"{self.cls.__module__}.{self.cls.__qualname__}"

    def missing_dependencies(self) -> list[str]:
        """Importable module names the backend declares in ``requires`` that are absent."""
        return [m for m in getattr(self.cls, "requires", ()) if importlib.util.find_spec(m) is None]

    def check_dependencies(self) -> None:
        missing = self.missing_dependencies()
        if missing:
            hint = getattr(self.cls, "install_hint", None) or f"pip install {' '.join(missing)}"
            raise MissingDependencyError(
                f"backend {self.name!r} needs {', '.join(missing)}, which is not installed; "
                f"install it with: {hint}"
            )


class PluginManager:
    """Wraps a ``pluggy.PluginManager`` and the backend registry built from its hooks.

    ``autoload``: True loads every ``kvortex`` entry point, False none (plugins given in code
    only), None (default) every one unless ``KVORTEX_DISABLE_PLUGIN_AUTOLOAD`` is set, then only
    those of KVortex's own distributions.
    """

    def __init__(self, plugins: Iterable[object] = (), *, autoload: bool | None = None) -> None:
        self._pm = pluggy.PluginManager(PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._trace = _truthy(os.environ.get(TRACE_ENV))
        if self._trace:
            self._pm.trace.root.setwriter(lambda msg: log.warning("%s", msg.rstrip()))
            self._pm.enable_tracing()
        first_party_only = False
        if autoload is None:
            first_party_only = _truthy(os.environ.get(DISABLE_AUTOLOAD_ENV))
            autoload = True
        self._dists: dict[int, tuple[str, str]] = {}
        self._backends: dict[str, BackendInfo] | None = None
        if autoload:
            self._load_entry_points(first_party_only)
        for plugin in plugins:
            self.register(plugin)
        self._pm.check_pending()

    def _load_entry_points(self, first_party_only: bool = False) -> None:
        """Register every ``kvortex`` entry point (``first_party_only``: those of KVortex's own
        distributions); a broken one fails naming its package."""
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if self._pm.get_plugin(ep.name) is not None or self._pm.is_blocked(ep.name):
                continue  # the same distribution seen twice on sys.path
            dist = ep.dist
            dist_name, version = (dist.name, dist.version) if dist is not None else (ep.name, "?")
            if first_party_only and _canonical(dist_name) not in _FIRST_PARTY:
                continue
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:  # a plugin's sys.exit() at import too
                raise PluginError(
                    f"plugin entry point {ep.name!r} = {ep.value!r} of {dist_name} {version} "
                    f"failed to import: {type(exc).__name__}: {exc}; fix or uninstall "
                    f"{dist_name}, or set {DISABLE_AUTOLOAD_ENV}=1"
                ) from exc
            self.register(plugin, name=ep.name)
            self._dists[id(plugin)] = (dist_name, version)

    @property
    def pluggy(self) -> pluggy.PluginManager:
        return self._pm

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object (module or instance with ``@hookimpl`` functions).

        A hook implementation with a misspelt name or wrong arguments fails here, at load,
        not later when the hook is called.
        """
        try:
            self._pm.register(plugin, name=name)
            self._pm.check_pending()
        except (pluggy.PluginValidationError, ValueError) as exc:
            if self._pm.is_registered(plugin):
                self._pm.unregister(plugin)
            raise PluginError(
                f"plugin {name or plugin!r} is invalid: {exc}; KVortex hooks are: "
                + ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("kvortex_")))
            ) from exc
        self._backends = None

    def backends(self) -> dict[str, BackendInfo]:
        """All registered backends by name (the hook runs once, then the result is cached)."""
        if self._backends is not None:
            return self._backends
        found: dict[str, BackendInfo] = {}
        # Each implementation is called on its own (not through pluggy's caller) so every
        # registration is attributed to its plugin; the trace switch is honoured by hand.
        for impl in reversed(self._pm.hook.kvortex_register_backends.get_hookimpls()):
            dist, version = self._dists.get(id(impl.plugin), (None, None))
            registrar = _Registrar(impl.plugin_name, dist, version, found)
            try:
                returned = impl.function(register=registrar)
                if returned is not None:  # a hook that returns its backends registers nothing
                    raise PluginError(
                        f"plugin {impl.plugin_name!r}: kvortex_register_backends returned "
                        f"{type(returned).__name__} {str(returned)[:60]!r}; it must call "
                        "register(name, BackendClass) for each backend and return nothing"
                    )
            except PluginError:
                raise
            except (Exception, SystemExit) as exc:  # a third-party hook's bug (or sys.exit()): name
                # the plugin, not a traceback, and never end the host process (a vLLM worker)
                where = f"distribution {dist} {version}" if dist else "registered in code"
                raise PluginError(
                    f"plugin {impl.plugin_name!r} ({where}) failed in kvortex_register_backends: "
                    f"{type(exc).__name__}: {exc}; fix or uninstall it, or set "
                    f"{DISABLE_AUTOLOAD_ENV}=1 to load no third-party plugins"
                ) from exc
            log.log(
                logging.WARNING if self._trace else logging.DEBUG,
                "kvortex_register_backends: plugin %s (%s) registered %s",
                impl.plugin_name,
                dist or "in code",
                ", ".join(registrar.names) or "nothing",
            )
        self._backends = found
        return found

    def backend(self, name: str) -> BackendInfo:
        """The backend registered under ``name``, or a PluginError listing the valid names."""
        backends = self.backends()
        if name not in backends:
            valid = ", ".join(sorted(backends)) or "(none: is kvortex-backends installed?)"
            from kvortex_core.config.messages import did_you_mean

            hint = did_you_mean(name, list(backends))
            if name in _BUILTIN_BACKENDS:
                hint = f" (it comes with kvortex-backends: {_BUILTIN_BACKENDS[name]})"
            raise PluginError(f"unknown backend type {name!r}{hint}; registered backends: {valid}")
        return backends[name]


class _Registrar:
    """The ``register`` callable handed to one plugin's hook: checks names and classes."""

    def __init__(
        self, plugin: str, dist: str | None, version: str | None, found: dict[str, BackendInfo]
    ) -> None:
        self.plugin, self.dist, self.version, self.found = plugin, dist, version, found
        self.names: list[str] = []

    def __call__(self, name: str, backend_class: Any) -> None:
        from kvortex_core.storage.protocol import BackendOptions, StorageBackend

        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(
                f"plugin {self.plugin!r} registered backend name {name!r}; names are "
                "lowercase letters, digits, '-' and '_', starting with a letter"
            )
        if not (isinstance(backend_class, type) and issubclass(backend_class, StorageBackend)):
            raise PluginError(
                f"plugin {self.plugin!r} registered {backend_class!r} as backend "
                f"{name!r}; it must be a subclass of kvortex_core.StorageBackend"
            )
        if inspect.isabstract(backend_class):
            missing = ", ".join(sorted(backend_class.__abstractmethods__))
            raise PluginError(
                f"plugin {self.plugin!r} registered backend {name!r} = {backend_class.__qualname__}, "
                f"which leaves abstract methods unimplemented: {missing}; implement them"
            )
        options = getattr(backend_class, "Options", None)
        if not (isinstance(options, type) and issubclass(options, BackendOptions)):
            raise PluginError(
                f"plugin {self.plugin!r} registered backend {name!r} whose Options is {options!r}; "
                "it must be a subclass of kvortex_core.BackendOptions (unknown or misspelt options "
                "are then refused)"
            )
        info = BackendInfo(name, backend_class, self.plugin, self.dist, self.version)
        if name in self.found:
            first = self.found[name]
            raise PluginError(
                f"backend name {name!r} is registered twice: by {first.qualname} "
                f"(plugin {first.plugin!r}) and by {info.qualname} (plugin {info.plugin!r}); "
                f"uninstall one of the packages or set {DISABLE_AUTOLOAD_ENV}=1 "
                "and register the one you want"
            )
        self.found[name] = info
        self.names.append(name)
