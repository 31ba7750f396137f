"""Is the engine's pinned pool slower for copies both ways at once than a plain pinned buffer?

``python3 tests/gpu/pool_bidir_probe.py [tokens ...]`` (CUDA): MLA (61 x 576 bf16) chunks of 256
tokens. Every case enqueues all its copies up front from one thread (no Python between copies)
and is paired with the raw baseline (one copy each way at once, plain pinned buffers):
  chunks-plain  one DMA per chunk each way, plain pinned buffers
  chunks-pool   one DMA per chunk each way, the engine pool's slots (saves into slots 0..n-1,
                loads from slots n..2n-1, as the engine's both-directions benchmark does)
  chunks-hostalloc  the same into a pool allocated with cudaHostAlloc (PinnedPool pin_method)
  d2h-pool / h2d-pool  one direction alone, per chunk, pool slots, vs the raw copy that way
REPS (env, default 9) pairs per case.
"""
import os
import statistics
import sys

import torch

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import CHUNK_TOKENS, make_engine
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.pool import PinnedPool


def main() -> None:
    device = torch.device("cuda")
    sizes = [int(a) for a in sys.argv[1:]] or [8192, 16384]
    shape = tp.Shape("deepseek-v3-mla", 61, 1, 576, 64, mla=True)
    caches = tp.make_caches(shape, 2 * max(sizes) // shape.block, device)
    layout = detect_layout(caches, None)
    engine = make_engine(caches, layout, 2 * max(sizes), 64 << 20, None)
    pool = engine._reg.tiers.pool
    other = PinnedPool(pool.slot_bytes, pool.slot_bytes * pool.num_slots, device=0,
                       alignment=4096, pin_method="host_alloc")
    reps = int(os.environ.get("REPS", "9"))
    chunk = layout.chunk_bytes(CHUNK_TOKENS)
    s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)
    for tokens in sizes:
        n = tokens // CHUNK_TOKENS
        nbytes = n * chunk
        raw = tp.RawCopier(nbytes, device)
        gsrc = torch.empty(nbytes, dtype=torch.uint8, device=device)
        gdst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        plain_out, plain_in = tp.pinned(nbytes, device), tp.pinned(nbytes, device)
        slots = [pool.view(i)[:chunk] for i in range(2 * n)]
        hslots = [other.view(i)[:chunk] for i in range(2 * n)]

        def chunks(outs, ins, d2h=True, h2d=True, n=n, gsrc=gsrc, gdst=gdst):
            def run() -> None:
                with torch.cuda.stream(s1):
                    if d2h:
                        for i in range(n):
                            outs[i].copy_(gsrc[i * chunk:(i + 1) * chunk], non_blocking=True)
                with torch.cuda.stream(s2):
                    if h2d:
                        for i in range(n):
                            gdst[i * chunk:(i + 1) * chunk].copy_(ins[i], non_blocking=True)
            return run

        po = list(plain_out.split(chunk))
        pi = list(plain_in.split(chunk))
        cases = {
            "chunks-plain": (chunks(po, pi), raw.both),
            "chunks-pool": (chunks(slots[:n], slots[n:]), raw.both),
            "chunks-hostalloc": (chunks(hslots[:n], hslots[n:]), raw.both),
            "d2h-pool": (chunks(slots[:n], None, h2d=False), raw.d2h),
            "h2d-pool": (chunks(None, slots[n:], d2h=False), raw.h2d),
        }
        for name, (ours, base) in cases.items():
            o, r = tp.paired(ours, base, device, reps, warmup=2)
            ratios = sorted(b / a for a, b in zip(o, r))
            print(f"{tokens:6d} {name:16s} ratio {statistics.median(ratios):.3f} "
                  f"({ratios[0]:.3f}-{ratios[-1]:.3f})  ours {statistics.median(o) * 1e3:.2f} ms "
                  f"raw {statistics.median(r) * 1e3:.2f} ms", flush=True)
    other.close()
    engine.close()


if __name__ == "__main__":
    main()
