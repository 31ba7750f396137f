"""Skip the vLLM connector tests cleanly when vLLM is not installed (see scripts/install-vllm.sh)."""

from __future__ import annotations

import importlib.util

import pytest

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM is not installed: run scripts/install-vllm.sh 0.33.0 in a separate venv")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)
