"""Registers the built-in backends through the same hook a third-party plugin uses."""

from __future__ import annotations

from kvortex_core import hookimpl


@hookimpl
def kvortex_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    from kvortex_backends.redis import RedisBackend

    register("redis", RedisBackend)
