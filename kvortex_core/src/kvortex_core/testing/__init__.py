"""Tools for backend authors: the conformance suite and an in-memory reference backend."""

from __future__ import annotations

from kvortex_core.testing.conformance import BackendConformance
from kvortex_core.testing.memory import MemoryBackend

__all__ = ["BackendConformance", "MemoryBackend"]
