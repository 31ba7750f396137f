"""Host timestamps (us from the call's start) of each phase of one save/load, no profiler.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/host_phases.py [tokens] [llama|mla]
Prints, per case, the median over 7 calls of wall time, raw copy time and phase marks.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import threading
import time

import torch

import kvortex_core.data.transfer as transfer_mod
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence, make_engine
from kvortex_core.data.layouts import detect_layout

MARKS: list[tuple[str, float]] = []


def patch(obj, name, label):
    fn = getattr(obj, name)

    def wrapped(*a, **k):
        MARKS.append((label + ">", time.perf_counter()))
        try:
            return fn(*a, **k)
        finally:
            MARKS.append((label + "<", time.perf_counter()))

    setattr(obj, name, wrapped)


def run(label, fn, raw_s, reps=7):
    walls, phases = [], {}
    for _ in range(reps + 1):
        torch.cuda.synchronize()
        MARKS.clear()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
        counts: dict[str, int] = {}
        for name, _ in MARKS:
            counts[name] = counts.get(name, 0) + 1
        seen: dict[str, int] = {}
        for name, ts in MARKS:
            k = seen[name] = seen.get(name, 0) + 1
            if k <= 2 or k == counts[name]:  # a repeated phase: its first two and its last
                tag = "" if k == 1 else ("#2" if k == 2 else "#last")
                phases.setdefault(f"{name}{tag}", []).append((ts - t0) * 1e6)
    wall = statistics.median(walls[1:])
    marks = " ".join(f"{k}{statistics.median(v[1:] or v):.0f}" for k, v in phases.items())
    print(f"{label:12s} wall {wall * 1e6:7.0f} raw {raw_s * 1e6:7.0f} ratio {raw_s / wall:.3f} | {marks}",
          flush=True)


def main() -> None:
    if os.environ.get("GCOFF"):  # hypothesis check: collections inside a call
        gc.disable()
    dev = torch.device("cuda")
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    which = sys.argv[2] if len(sys.argv) > 2 else "llama"
    shape = tp.DEEPSEEK_V3 if which == "mla" else tp.LLAMA_8B
    caches = tp.make_caches(shape, 2 * tokens // shape.block, dev, unified=which != "mla")
    layout = detect_layout(caches)
    nbytes = layout.chunk_bytes(tokens)
    raw = tp.raw_copy(nbytes, dev, 7)
    d2h, h2d = raw["d2h"].median_s, raw["h2d"].median_s
    eng = make_engine(caches, layout, 8 * tokens, 64 << 20, None)  # room for every rep's save
    reg = eng._reg
    te = reg.transfer
    patch(transfer_mod, "event_wait", "ew")
    for name in ("_check", "_units", "_index_tensors", "_enqueue_save", "_gather", "_load_batch"):
        patch(te, name, name)
    if te._rows is not None:
        patch(te._rows, "call_rows", "rows")
    print("gather:", te.gather_mode, flush=True)
    patch(reg.hasher, "keys", "hash")
    patch(reg.tiers, "begin_save", "bsave")
    patch(reg.tiers, "begin_load", "bload")
    patch(eng, "_commit_as_ready", "commit")
    patch(reg.tiers, "end_load", "unpin")
    patch(transfer_mod.TransferHandle, "wait", "hw")
    patch(transfer_mod.TransferHandle, "_retire", "retire")
    patch(transfer_mod, "event_finish", "finish")
    patch(eng, "save", "SAVE")
    patch(eng, "load", "LOAD")
    import kvortex_core.engine as engine_mod

    patch(engine_mod, "_tokens", "tokens")
    patch(engine_mod, "_blocks", "blocks")
    chunks = tp.random_chunks(layout.num_blocks, tokens, shape.block, 256, 1)
    other = tp.random_chunks(layout.num_blocks, tokens, shape.block, 256, 2)
    slot = layout.chunk_bytes(256)
    dst = list(tp.pinned(slot * len(chunks), dev).split(slot))
    run("te save", lambda: te.save(chunks, dst).wait(), d2h)
    run("te save inl", lambda: te.save(chunks, dst, inline=True).wait(), d2h)
    run("te load inl", lambda: te.load(dst, other, inline=True).wait(), h2d)
    blocks = [b for c in chunks for b in c]
    oblocks = [b for c in other for b in c]
    seqs = iter([_sequence(tokens, i) for i in range(20)])
    stored = _sequence(tokens, 999)
    eng.save(stored, blocks)
    print("threads:", sorted(t.name for t in threading.enumerate()), flush=True)
    run("engine save", lambda: eng.save(next(seqs), blocks), d2h)
    run("engine load", lambda: eng.load(stored, oblocks), h2d)
    eng.close()


if __name__ == "__main__":
    main()
