"""Registers the built-in backends through the same hook a third-party plugin uses.

Each backend module imports its optional client library only in ``open()``, so registering
every built-in always succeeds; a missing library fails only when that tier is configured.
"""

from __future__ import annotations

from kvortex_core import hookimpl


@hookimpl
def kvortex_register_backends(register) -> None:  # type: ignore[no-untyped-def]
    from kvortex_backends.cpu import CpuBackend
    from kvortex_backends.disk import DiskBackend

    register("cpu", CpuBackend)
    register("disk", DiskBackend)

    # shared tiers (issue 6)
    from kvortex_backends.redis import RedisBackend
    from kvortex_backends.s3 import S3Backend

    register("redis", RedisBackend)
    register("s3", S3Backend)
