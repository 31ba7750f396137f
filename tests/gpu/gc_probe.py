"""Runs ``kvortex`` (the CLI) with the garbage collector's pauses logged (or the collector off).

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/gc_probe.py [--off] bench transfer ...
Prints every collection that took more than 5 ms, with its generation and duration, at exit.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import atexit
import gc
import runpy
import sys
import time

PAUSES: list[tuple[int, float, int]] = []
_start: list[float] = []


def _cb(phase: str, info: dict) -> None:
    if phase == "start":
        _start[:] = [time.perf_counter()]
    elif _start:
        took = time.perf_counter() - _start[0]
        if took > 0.005:
            PAUSES.append((info["generation"], took, info.get("collected", 0)))


def _report() -> None:
    print(f"gc pauses > 5 ms: {len(PAUSES)}; longest (generation, ms, collected): "
          f"{sorted(((g, round(t * 1e3, 1), c) for g, t, c in PAUSES), key=lambda x: -x[1])[:8]}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] == "--off":
        gc.disable()
        args = args[1:]
    gc.callbacks.append(_cb)
    atexit.register(_report)
    sys.argv = ["kvortex", *args]
    runpy.run_module("kvortex_core.cli.app", run_name="__main__")
