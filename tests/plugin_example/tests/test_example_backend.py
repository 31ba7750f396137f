"""The example backend proves itself with KVortex's conformance suite (one fixture)."""

from __future__ import annotations

import pytest

from kvortex_core import BackendContext
from kvortex_core.testing import BackendConformance
from kvortex_example_backend import ExampleBackend, ExampleOptions


class TestExampleBackend(BackendConformance):
    @pytest.fixture
    def backend_factory(self):  # type: ignore[no-untyped-def]
        def make(capacity: int) -> ExampleBackend:
            return ExampleBackend(ExampleOptions(), capacity=capacity, context=BackendContext())

        return make


class TestExampleBackendWithPrefix(BackendConformance):
    """The same contract holds with a non-default option."""

    sizes = (1, 70_000)

    @pytest.fixture
    def backend_factory(self):  # type: ignore[no-untyped-def]
        def make(capacity: int) -> ExampleBackend:
            opts = ExampleOptions(key_prefix="tenant-a/")
            return ExampleBackend(opts, capacity=capacity, context=BackendContext(tier="t"))

        return make
