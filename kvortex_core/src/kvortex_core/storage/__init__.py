"""The storage-backend protocol that every tier (built-in or third-party) implements."""

from __future__ import annotations

from kvortex_core.storage.protocol import (
    BackendContext,
    BackendOptions,
    Health,
    StorageBackend,
    Usage,
)

__all__ = ["BackendContext", "BackendOptions", "Health", "StorageBackend", "Usage"]
