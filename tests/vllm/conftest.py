"""Harness modules beside this file importable (pytest runs with --import-mode=importlib).

The ``vllm`` marker's skip when vLLM is missing lives in the root ``tests/conftest.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread while these tests run.

    The fake model's idle OpenMP workers spin and starve the transfer and tiering threads on
    a 2-core machine; restored afterwards so other test directories keep torch's default.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _close_harnesses() -> Iterator[None]:
    """Shut down the connectors every test built (their tier loops and pools), pass or fail."""
    yield
    if "vllm_harness" in sys.modules:
        sys.modules["vllm_harness"].close_all()
