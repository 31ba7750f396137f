"""KVortex core: configuration, plugins, control plane, data plane, tiering and the engine.

Heavy parts (torch, the engine) are imported lazily so ``import kvortex_core`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvortex_core.config import KVortexConfig
from kvortex_core.errors import (
    BackendError,
    BackendFullError,
    BadValueError,
    BufferTooSmallError,
    ConfigError,
    KVortexError,
    LayoutError,
    MissingDependencyError,
    PayloadError,
    PluginError,
)
from kvortex_core.plugins.marker import hookimpl
from kvortex_core.storage.protocol import (
    BackendContext,
    BackendOptions,
    Health,
    StorageBackend,
    Usage,
)

if TYPE_CHECKING:
    from kvortex_core.engine import KVortexEngine

__version__ = "0.1.0"

__all__ = [
    "BackendContext",
    "BackendError",
    "BackendFullError",
    "BackendOptions",
    "BadValueError",
    "BufferTooSmallError",
    "ConfigError",
    "Health",
    "KVortexConfig",
    "KVortexEngine",
    "KVortexError",
    "LayoutError",
    "MissingDependencyError",
    "PayloadError",
    "PluginError",
    "StorageBackend",
    "Usage",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    if name == "KVortexEngine":
        from kvortex_core.engine import KVortexEngine

        return KVortexEngine
    raise AttributeError(f"module 'kvortex_core' has no attribute {name!r}")
