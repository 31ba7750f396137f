"""Shared test configuration: collection rules and marker-based skips only.

A test marked ``gpu`` skips without CUDA, ``vllm`` without vLLM, ``redis`` without a
``redis-server`` binary, ``s3`` without moto; the reason names what to install.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable

import pytest

# The example plugin package is a separate project with its own tests: its test module runs
# them in a subprocess after pip-installing the package (tests/plugin_example/test_*.py).
collect_ignore = ["plugin_example/src", "plugin_example/tests"]


def _cuda_missing() -> str | None:
    import torch

    return None if torch.cuda.is_available() else "needs a CUDA device"


def _module_missing(module: str, install: str) -> Callable[[], str | None]:
    return lambda: None if importlib.util.find_spec(module) else f"needs {module}: {install}"


def _redis_missing() -> str | None:
    return (
        None
        if shutil.which("redis-server")
        else "needs redis-server: apt-get install -y redis-server"
    )


_CHECKS: dict[str, Callable[[], str | None]] = {
    "gpu": _cuda_missing,
    "vllm": _module_missing("vllm", "scripts/install-vllm.sh"),
    "redis": _redis_missing,
    "s3": _module_missing("moto", 'pip install "moto[server]"'),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons: dict[str, str | None] = {}
    for item in items:
        for marker, check in _CHECKS.items():
            if item.get_closest_marker(marker) is None:
                continue
            if marker not in reasons:  # each check runs once, and only when a test needs it
                reasons[marker] = check()
            if reasons[marker]:
                item.add_marker(pytest.mark.skip(reason=reasons[marker]))
