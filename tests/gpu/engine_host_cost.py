"""Host cost per chunk of KVortexEngine.save/load on CPU with small MLA-like chunks.

``python tests/gpu/engine_host_cost.py [prof]``: 61 layers of 8-wide bf16 rows, 16K tokens;
prints the time per chunk of a save and a load, and with ``prof`` a cProfile of one of each.
"""
import cProfile
import pstats
import random
import statistics
import sys
import time
import warnings

import torch

from kvortex_core import KVortexConfig, KVortexEngine

warnings.filterwarnings("ignore")
L, HEAD, BLOCK, CT = 61, 8, 64, 256
TOK = 16384
nb = 2 * TOK // BLOCK
caches = [torch.zeros(nb, BLOCK, HEAD, dtype=torch.bfloat16) for _ in range(L)]
cfg = KVortexConfig(model_id="m", chunk_tokens=CT, tiers={"cpu": {"type": "cpu", "capacity": "2GiB"}},
                    eviction={"high_watermark": 1.0})
eng = KVortexEngine.create(cfg)
eng.register_kv_caches(caches)
print(eng.stats()["layout"])
blocks = random.Random(1).sample(range(nb), TOK // BLOCK)
other = random.Random(2).sample(range(nb), TOK // BLOCK)


def seq(s: int) -> list[int]:
    r = random.Random(s)
    return [r.randrange(128000) for _ in range(TOK)]



saves, loads = [], []
for i in range(12):
    s = seq(i)
    t = time.perf_counter()
    eng.save(s, blocks)
    saves.append(time.perf_counter() - t)
    t = time.perf_counter()
    n = eng.load(s, other)
    loads.append(time.perf_counter() - t)
    assert n == TOK
n = TOK // CT
print(f"save {statistics.median(saves)*1e6/n:.0f} us/chunk, load {statistics.median(loads)*1e6/n:.0f} us/chunk ({n} chunks)")
if len(sys.argv) > 1:
    s = seq(100)
    pr = cProfile.Profile()
    pr.enable()
    eng.save(s, blocks)
    eng.load(s, other)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)
eng.close()
