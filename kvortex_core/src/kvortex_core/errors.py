"""The KVortex exception hierarchy: every error names the offending value and the fix."""

from __future__ import annotations


class KVortexError(Exception):
    """Base class of every error KVortex raises on purpose."""


class ConfigError(KVortexError, ValueError):
    """Invalid configuration; the message names the value, YAML path, env variable and fix."""


class PluginError(KVortexError):
    """A plugin or backend registration problem (duplicate names, unknown type, bad hook)."""


class MissingDependencyError(PluginError, ImportError):
    """A configured backend needs an optional dependency that is not installed."""


class BackendError(KVortexError):
    """A storage backend operation failed (I/O error, timeout, refused connection)."""


class BackendFullError(BackendError):
    """A put would exceed the backend's capacity."""


class BadValueError(BackendError):
    """The backend answered, but what it holds under the key cannot be that key's payload (of
    another kind, say a Redis list). The engine counts it as a bad payload, deletes it and reads
    the next tier; the tier's circuit breaker does not count it as a failure."""


class BufferTooSmallError(BadValueError):
    """The caller-provided buffer cannot hold the stored value (for the engine, whose buffer
    holds the largest payload a key can have: a bad value)."""


class PayloadError(KVortexError):
    """A stored payload is corrupted, truncated, foreign or of the wrong shape."""


class LayoutError(KVortexError, ValueError):
    """The KV cache tensors have an unsupported or inconsistent layout."""
