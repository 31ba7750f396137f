"""Run one async scenario against a backend: open it, run, always close (no pytest needed)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from kvortex_core.storage.protocol import StorageBackend

B = TypeVar("B", bound=StorageBackend)


def run_scenario(backend: B, scenario: Callable[[B], Awaitable[Any]]) -> Any:
    """``open()`` the backend, await ``scenario(backend)`` on a fresh event loop, ``close()``."""

    async def main() -> Any:
        await backend.open()
        try:
            return await scenario(backend)
        finally:
            await backend.close()

    return asyncio.run(main())
