"""DMA time of one chunk copy by destination: the engine's pool slots against plain pinned buffers.

CUDA events around each of 32 chunk copies (MLA 8K: 17.2 MiB each, Llama: 32 MiB), per
destination kind, alternating kinds; prints the median GPU time per copy and its GB/s.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/slot_probe.py [mla|llama]
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys

import torch

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import make_engine
from kvortex_core.data.layouts import detect_layout


def timed_copies(pairs, reps=5):
    """Median GPU ms of each copy (dst, src) over ``reps`` passes."""
    per = []
    for _ in range(reps):
        evs = [torch.cuda.Event(enable_timing=True) for _ in range(len(pairs) + 1)]
        torch.cuda.synchronize()
        evs[0].record()
        for i, (dst, src) in enumerate(pairs):
            dst.copy_(src, non_blocking=True)
            evs[i + 1].record()
        torch.cuda.synchronize()
        per += [a.elapsed_time(b) for a, b in itertools.pairwise(evs)]
    return statistics.median(per)


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "mla"
    shape = tp.DEEPSEEK_V3 if which == "mla" else tp.LLAMA_8B
    dev = torch.device("cuda")
    tokens = 8192
    caches = tp.make_caches(shape, 2 * tokens // shape.block, dev, unified=which != "mla")
    layout = detect_layout(caches)
    eng = make_engine(caches, layout, tokens, 64 << 20, None)
    tiers = eng._reg.tiers
    nbytes = layout.chunk_bytes(256)
    n = tokens // 256
    keys = [os.urandom(16) for _ in range(n)]
    leases = tiers.begin_save(keys)
    slots = [lease.payload for lease in leases]
    print(which, "chunk", nbytes, "slot payload ptr % 4096:", {s.data_ptr() % 4096 for s in slots},
          "numa node:", tiers.pool.numa_node, flush=True)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    plain = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(n)]
    span = tiers.pool.view(0)
    big = torch.empty(0, dtype=torch.uint8).set_(span.untyped_storage(), span.storage_offset(), (n * nbytes,))
    contiguous = list(big.split(nbytes))
    for rnd in range(3):
        for label, dsts in (("pool slots", slots), ("plain pinned", plain), ("pool contiguous", contiguous)):
            d2h = timed_copies([(d, src) for d in dsts])
            h2d = timed_copies([(src, d) for d in dsts])
            print(f"  round {rnd} {label:16s} d2h {d2h * 1e3:7.1f} us ({nbytes / d2h / 1e6:5.1f} GB/s)  "
                  f"h2d {h2d * 1e3:7.1f} us ({nbytes / h2d / 1e6:5.1f} GB/s)", flush=True)
    tiers.abort_save(leases)
    eng.close()


if __name__ == "__main__":
    main()
