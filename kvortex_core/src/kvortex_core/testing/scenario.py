"""Run one async scenario against a backend: open it, run, always close (no pytest needed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kvortex_core.storage.protocol import StorageBackend

B = TypeVar("B", bound=StorageBackend)


#: Seconds a scenario (open, the calls, close) may take before it fails as hung.
SCENARIO_TIMEOUT_S = 120.0


def run_scenario(backend: B, scenario: Callable[[B], Awaitable[Any]], *,
                 timeout: float = SCENARIO_TIMEOUT_S) -> Any:
    """``open()`` the backend, await ``scenario(backend)`` on a fresh event loop, ``close()``.

    A backend call that never returns fails the scenario with a ``TimeoutError`` after
    ``timeout`` seconds (a hung call would otherwise block the test run for good).
    """

    async def main() -> Any:
        await backend.open()
        try:
            return await scenario(backend)
        finally:
            await backend.close()

    async def bounded() -> Any:
        try:
            return await asyncio.wait_for(main(), timeout)
        except TimeoutError:
            raise TimeoutError(f"{type(backend).__name__}: the scenario did not finish in {timeout:g} s; "
                               "a backend call hangs (every call must return or raise)") from None

    return asyncio.run(bounded())
