"""The module the `kvortex` entry point names: it only registers classes, it does no I/O."""

from __future__ import annotations

from collections.abc import Callable

from kvortex_core import hookimpl
from kvortex_example_backend.backend import ExampleBackend, ExampleRemoteBackend


@hookimpl
def kvortex_register_backends(register: Callable[[str, type], None]) -> None:
    register("example", ExampleBackend)
    register("example-remote", ExampleRemoteBackend)
