"""Tools for backend authors: the conformance suite and an in-memory reference backend.

``BackendConformance`` needs pytest and is imported on first use, so the ``memory`` backend
(registered through kvortex-core's own entry point) loads in installs without pytest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvortex_core.testing.memory import MemoryBackend
from kvortex_core.testing.scenario import run_scenario

if TYPE_CHECKING:
    from kvortex_core.testing.conformance import BackendConformance

__all__ = ["BackendConformance", "MemoryBackend", "run_scenario"]


def __getattr__(name: str) -> Any:
    if name == "BackendConformance":
        from kvortex_core.testing.conformance import BackendConformance

        return BackendConformance
    raise AttributeError(f"module 'kvortex_core.testing' has no attribute {name!r}")
