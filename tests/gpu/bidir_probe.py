"""Where a save and a load issued together lose time: per-direction DMA timelines.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/bidir_probe.py [mla|llama] [tokens]

For KVortexEngine save_async + load_async of 8K tokens (the bench's ``bidir`` case), prints
per rep the wall time against the raw bidirectional copy, then one profiled rep: per
direction the delay from the call to its first DMA, DMA busy time, gaps between DMAs, and
the end of its last DMA. Also times save alone and load alone (paired with raw copies).
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import time

from cuda_trace import copies, cuda_events, kernels
from probes import engine_probe, probe_args

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence


def dma_summary(events: list[dict], kind: str, t0: float) -> str:
    dmas = copies(events, kind=kind)
    if not dmas:
        return f"{kind}: none"
    busy = sum(e["dur"] for e in dmas)
    gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in itertools.pairwise(dmas)]
    big_gaps = sorted((round(g) for g in gaps), reverse=True)[:5]
    return (f"{kind}: n={len(dmas)} first@{dmas[0]['ts'] - t0:.0f}us busy={busy:.0f}us "
            f"gaps={sum(g for g in gaps if g > 0):.0f}us top={big_gaps} "
            f"end@{dmas[-1]['ts'] + dmas[-1]['dur'] - t0:.0f}us")


def main() -> None:
    which, tokens, _ = probe_args(sys.argv)
    pr = engine_probe(which, tokens, which != "mla", capacity_tokens=12 * tokens,
                      staging=int(os.environ.get("STAGING", str(64 << 20))))
    eng, blocks, other, raw, dev = pr.engine, pr.blocks, pr.other, pr.raw, pr.device
    stored = _sequence(tokens, 99)
    eng.save(stored, blocks)
    eng.load(stored, other)
    fresh_seqs = pr.sequences()  # made outside the timed calls

    def fresh() -> list[int]:
        return next(fresh_seqs)

    marks: dict[str, float] = {}

    def save_thread(seq: list[int]) -> None:
        marks["save>"] = time.perf_counter()
        eng.save(seq, blocks)
        marks["save<"] = time.perf_counter()

    def load_thread() -> None:
        marks["load>"] = time.perf_counter()
        eng.load(stored, other)
        marks["load<"] = time.perf_counter()

    def both() -> None:
        seq = fresh()
        hs = eng._executor.submit(save_thread, seq)
        hl = eng._executor.submit(load_thread)
        hs.result()
        hl.result()

    for label, fn, base in (("save alone", lambda: eng.save(fresh(), blocks), raw.d2h),
                            ("load alone", lambda: eng.load(stored, other), raw.h2d),
                            ("both", both, raw.both)):
        eng.save(stored, blocks)  # back in the cache if the saves evicted it (the pool is full)
        ours, ref = tp.paired(fn, base, dev, 9)
        ratios = sorted(r / o for o, r in zip(ours, ref, strict=True))
        print(f"{which} {tokens} {label:10s} ratio median {statistics.median(ratios):.3f} "
              f"min {ratios[0]:.3f} max {ratios[-1]:.3f} ours {statistics.median(ours) * 1e3:.2f} ms "
              f"raw {statistics.median(ref) * 1e3:.2f} ms", flush=True)
        if label == "both":
            t0 = min(marks["save>"], marks["load>"])
            print("   host marks (us):", {k: round((v - t0) * 1e6) for k, v in marks.items()}, flush=True)

    if os.environ.get("NOPROFILE"):
        eng.close()
        return
    for _ in range(2):
        start = time.perf_counter()
        events = cuda_events(both)
        gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("gpu_memcpy", "kernel")]
        t0 = min(e["ts"] for e in gpu)
        print(f"profiled both: wall {(time.perf_counter() - start) * 1e3:.2f} ms "
              f"(profiler on); first GPU op at t0", flush=True)
        print("  ", dma_summary(events, "DtoH", t0), flush=True)
        print("  ", dma_summary(events, "HtoD", t0), flush=True)
        ks = kernels(events)
        print(f"   kernels n={len(ks)} total={sum(k['dur'] for k in ks):.0f}us "
              f"max={max((k['dur'] for k in ks), default=0):.0f}us", flush=True)
    eng.close()


if __name__ == "__main__":
    main()
