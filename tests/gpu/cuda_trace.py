"""CUPTI activity of one call, for the GPU probe scripts (timeline, bidir_probe, profile_transfer).

Not collected by pytest (no ``test_`` prefix); imported from scripts run as
``python3 tests/gpu/<script>.py`` (their folder is on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


def cuda_events(fn: Callable[[], Any]) -> list[dict[str, Any]]:
    """Chrome-trace events of the CUDA work of one ``fn()`` (the device is synchronized around it)."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def kernels(events: list[dict[str, Any]], name: str | None = None) -> list[dict[str, Any]]:
    """Kernel events in start order (``name``: only those whose name contains it, any case)."""
    found = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"
             and (name is None or name in e["name"].lower())]
    return sorted(found, key=lambda e: e["ts"])


def copies(events: list[dict[str, Any]], min_bytes: int = 1 << 20, kind: str = "") -> list[dict[str, Any]]:
    """Memcpy events of at least ``min_bytes`` in start order (``kind``: e.g. "DtoH")."""
    found = [e for e in events if e.get("cat") == "gpu_memcpy" and e.get("ph") == "X"
             and e.get("args", {}).get("bytes", 0) >= min_bytes and kind in e["name"]]
    return sorted(found, key=lambda e: e["ts"])
