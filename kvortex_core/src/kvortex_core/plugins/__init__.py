"""The pluggy plugin system: marker (``hookimpl``), hook specifications, and the manager."""

from __future__ import annotations

from kvortex_core.plugins.manager import BackendInfo, PluginManager
from kvortex_core.plugins.marker import hookimpl, hookspec

__all__ = ["BackendInfo", "PluginManager", "hookimpl", "hookspec"]
