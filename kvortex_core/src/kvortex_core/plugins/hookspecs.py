"""Hook specifications. Hooks register classes; they never do I/O."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvortex_core.plugins.marker import hookspec

#: ``register(name, backend_class)``: ``backend_class`` subclasses ``StorageBackend``.
Register = Callable[[str, Any], None]


@hookspec
def kvortex_register_backends(register: Register) -> None:
    """Register storage backend classes by name, e.g. ``register("disk", DiskBackend)``.

    Called once per plugin manager. Importing optional dependencies (redis, boto3) must be
    deferred to the backend's ``open()`` so that registration always succeeds.
    """
