"""An example third-party KVortex backend: values kept in a dict in process memory."""

from __future__ import annotations

from kvortex_example_backend.backend import ExampleBackend, ExampleOptions, ExampleRemoteBackend

__all__ = ["ExampleBackend", "ExampleOptions", "ExampleRemoteBackend"]
__version__ = "0.3.1"
