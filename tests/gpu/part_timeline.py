"""Host steps of each part of one KVortexEngine save or load, against the GPU start of each DMA.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/part_timeline.py [mla|llama] [tokens] [unified|per-layer]

Per call: host time (us from the call) when each part's keys, slot reservation (begin_*) and
transfer enqueue start and end, and per DMA its host enqueue time / GPU start time (a timing event
on the copy stream, aligned by an event recorded at the call's start on the idle device). A DMA
whose GPU start is within ~30 us of its enqueue found the copy engine idle, waiting for the host.
Not collected by pytest.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from itertools import pairwise

import torch
from probes import engine_probe, mark_dmas, probe_args

import kvortex_core.data.transfer as transfer_mod
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence

MARKS: list[tuple[str, float, object]] = []


def patch(obj, name, label):
    fn = getattr(obj, name, None)
    if fn is None:  # older code (A/B runs): nothing to mark
        return

    def wrapped(*a, **k):
        MARKS.append((label + ">", time.perf_counter(), None))
        try:
            return fn(*a, **k)
        finally:
            MARKS.append((label + "<", time.perf_counter(), None))

    setattr(obj, name, wrapped)


def main() -> None:
    pr = engine_probe(*probe_args(sys.argv))
    eng, reg, blocks, other, raw, dev = pr.engine, pr.engine._reg, pr.blocks, pr.other, pr.raw, pr.device
    print(pr.describe(), flush=True)
    stored = _sequence(pr.tokens, 99)
    eng.save(stored, blocks)
    seqs = pr.sequences()
    mark_dmas(lambda t, ev: MARKS.append(("dma", t, ev)))  # right before each DMA, on the copy stream
    for obj, name, label in ((reg.tiers, "begin_save", "slots"), (reg.tiers, "begin_load", "slots"),
                             (reg.hasher, "keys", "hash"), (reg.transfer, "save", "te"),
                             (reg.transfer, "load", "te"), (reg.tiers, "prepare_save", "prep"),
                             (reg.tiers, "commit_save", "commit"), (reg.tiers, "end_load", "unpin"),
                             (transfer_mod.TransferHandle, "wait", "wait"), (transfer_mod, "event_finish", "finish"),
                             (transfer_mod.TransferHandle, "_retire", "retire")):
        patch(obj, name, label)

    for what, call, rawfn in (("save", lambda: eng.save(next(seqs), blocks), raw.d2h),
                              ("load", lambda: eng.load(stored, other), raw.h2d)):
        ratios = []
        budget: list[tuple[float, ...]] = []
        for rep in range(int(os.environ.get("REPS", "8"))):
            tp.sync(dev)
            t = time.perf_counter()
            rawfn()
            tp.sync(dev)
            r = time.perf_counter() - t
            MARKS.clear()
            start = torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            call()
            MARKS.append(("ret", time.perf_counter(), None))
            torch.cuda.synchronize()
            MARKS.append(("synced", time.perf_counter(), None))
            w = time.perf_counter() - t0
            ratios.append(r / w)
            gpu = [start.elapsed_time(ev) * 1e3 for _, _, ev in MARKS if ev is not None]
            if len(gpu) > 1:  # the copies of one call: start, DMA phase (one DMA added at the end), tail
                gaps = [b - a for a, b in pairwise(gpu)]
                step = min(gaps)
                phase = gpu[-1] - gpu[0] + step
                budget.append((r * 1e6, w * 1e6, gpu[0], phase, w * 1e6 - gpu[0] - phase,
                               sum(g - step for g in gaps)))
            if rep in (3, 6):
                out = []
                for lbl, ts, ev in MARKS:
                    h = (ts - t0) * 1e6
                    if ev is None:
                        out.append(f"{lbl}{h:.0f}")
                    else:
                        g = start.elapsed_time(ev) * 1e3
                        out.append(f"[dma {h:.0f}/{g:.0f}{'*' if g - h < 30 else ''}]")
                line = " ".join(out)
                if os.environ.get("TAIL"):  # the end of the call only: from the last DMA on
                    line = line[line.rfind("[dma"):]
                print(f"  {what} rep {rep} ratio {r / w:.3f} wall {w * 1e6:.0f}: " + line, flush=True)
        print(f"{what}: median ratio {statistics.median(ratios):.3f} over {len(ratios)}", flush=True)
        if budget:
            cols = [statistics.median(c) for c in zip(*budget, strict=True)]
            print(f"{what}: medians, us: raw {cols[0]:.0f}, call {cols[1]:.0f} = first DMA at {cols[2]:.0f} + "
                  f"DMA phase {cols[3]:.0f} (of which above the shortest DMA interval: {cols[5]:.0f}) "
                  f"+ tail {cols[4]:.0f}", flush=True)
    eng.close()


if __name__ == "__main__":
    main()
