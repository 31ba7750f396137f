"""Time ``SchedulerTiers.present`` over a real disk tier: what the vLLM scheduler's look at a
local tier's files costs per lookup (every key a queued write of ours whose file is absent, so
each one is stat'ed on every rank). Run: ``python tests/vllm/file_look_cost.py [tp]``.

Not collected by pytest.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

from kvortex_core.config import KVortexConfig
from kvortex_vllm.lower import scheduler_tiers

d = tempfile.mkdtemp()
cfg = KVortexConfig.model_validate({"tiers": {"cpu": {"type": "cpu", "capacity": "64KiB"},
        "disk": {"type": "disk", "capacity": "64MiB", "path": d, "fsync": False}}})
st = scheduler_tiers(cfg, b"n" * 32, (2, 4), torch.float16, 4096, int(sys.argv[1]) if len(sys.argv) > 1 else 1)
time.sleep(0.5)
for n in (1, 32, 512):
    ts = []
    for r in range(40):
        keys = [os.urandom(32) for _ in range(n)]
        for k in keys:
            st.note_written(k)
        t = time.perf_counter(); st.present(keys); ts.append(time.perf_counter() - t)
    print(f"keys {n}: median {statistics.median(ts)*1e6:.0f} us  p90 {sorted(ts)[int(.9*len(ts))]*1e6:.0f} us")
st.close()
