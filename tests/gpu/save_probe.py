"""Time 24 back-to-back KVortexEngine saves of 32K MLA tokens, one line each (GC and slot
reservation time too): looks for single slow saves, like the outliers seen in the bench.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/save_probe.py
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import gc
import time

import torch

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence, make_engine
from kvortex_core.data.layouts import detect_layout


def main() -> None:
    gc_s, started = [0.0], [0.0]

    def on_gc(phase: str, _info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - started[0]

    gc.callbacks.append(on_gc)
    tokens = 32768
    caches = tp.make_caches(tp.DEEPSEEK_V3, 2 * tokens // 64, torch.device("cuda"))
    engine = make_engine(caches, detect_layout(caches), tokens, 64 << 20, None)
    tiers = engine._reg.tiers
    reserve = tiers.begin_save
    reserve_s = [0.0]

    def timed_reserve(*a, **k):
        t = time.perf_counter()
        try:
            return reserve(*a, **k)
        finally:
            reserve_s[0] += time.perf_counter() - t

    tiers.begin_save = timed_reserve
    blocks = list(range(tokens // 64))
    for i in range(24):
        seq = _sequence(tokens, 500 + i)
        gc_s[0] = reserve_s[0] = 0.0
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.save(seq, blocks)
        torch.cuda.synchronize()
        print(f"{i} {(time.perf_counter() - t) * 1e3:.1f} ms  gc {gc_s[0] * 1e3:.1f} ms  "
              f"begin_save {reserve_s[0] * 1e3:.1f} ms  used {engine.stats()['pool']['used_slots']}", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
