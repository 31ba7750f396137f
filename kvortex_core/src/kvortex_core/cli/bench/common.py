"""Shared benchmark plumbing: repetitions, min/median/max, ratios, JSON results, hardware name."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Measurement:
    """One benchmarked quantity over repetitions (seconds per repetition)."""

    name: str
    seconds: list[float] = field(default_factory=list)
    nbytes: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def gbps(self) -> dict[str, float]:
        """min/median/max throughput in GB/s (1e9 bytes)."""
        rates = sorted(self.nbytes / s / 1e9 for s in self.seconds if s > 0)
        if not rates:
            return {"min": 0.0, "median": 0.0, "max": 0.0}
        return {"min": rates[0], "median": statistics.median(rates), "max": rates[-1]}


def repeat(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ratio(ours: Measurement, raw: Measurement) -> float:
    """Throughput ratio ours/raw at the median (same bytes): 1.0 = as fast as the baseline."""
    return raw.median_s / ours.median_s if ours.median_s > 0 else 0.0


def hardware() -> dict[str, Any]:
    """Name the hardware the numbers came from."""
    info: dict[str, Any] = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - hardware info is best effort
        pass
    return info


def write_results(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``<out_dir>/<name>.json`` with the hardware attached; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"benchmark": name, "hardware": hardware(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
    return path
