"""Where the time of a save/load goes, from the GPU's own clock: start, DMA phase, tail.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/timeline.py [tokens] [llama|mla]

One marker kernel on the (idle) default stream right before the call and one right after
it returns; CUPTI timestamps of the DMAs in between. Per case, medians over the reps of:
``start`` (call to first DMA), ``dma`` (first DMA start to last DMA end), ``busy`` (sum of
DMA durations), ``tail`` (last DMA end to the call's return), and the raw copy's own. No
other instrumentation (host phase marks would cost more than what they measure).
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys

import torch
from cuda_trace import copies, cuda_events, kernels

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence, make_engine
from kvortex_core.data.layouts import detect_layout


def measure(fn, reps: int) -> dict[str, float]:
    mark = torch.empty(1, device="cuda")
    rows: list[dict[str, float]] = []
    gaps: list[list[tuple[int, int, int]]] = []
    for _ in range(reps):
        def call() -> None:
            mark.fill_(1.0)
            fn()
            mark.fill_(2.0)

        events = cuda_events(call)
        fills, dmas = kernels(events, "fill"), copies(events)
        if len(fills) < 2 or not dmas:
            continue
        t0, t1 = fills[0]["ts"], fills[-1]["ts"]
        first, last = dmas[0]["ts"], max(e["ts"] + e["dur"] for e in dmas)
        rows.append({"start": first - t0, "dma": last - first, "busy": sum(e["dur"] for e in dmas),
                     "tail": t1 - last, "total": t1 - t0, "n": len(dmas)})
        gaps.append([(i + 1, round(b["ts"] - a["ts"] - a["dur"]), a["args"]["bytes"] >> 20)
                     for i, (a, b) in enumerate(itertools.pairwise(dmas)) if b["ts"] - a["ts"] - a["dur"] > 20])
    if gaps and os.environ.get("GAPS"):  # (index of the DMA after the gap, gap us, MiB before it)
        print("   gaps > 20 us, 3 reps:", gaps[:3], flush=True)
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]} if rows else {}


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    which = sys.argv[2] if len(sys.argv) > 2 else "llama"
    shape = tp.DEEPSEEK_V3 if which == "mla" else tp.LLAMA_8B
    dev = torch.device("cuda")
    caches = tp.make_caches(shape, 2 * tokens // shape.block, dev, unified=which != "mla")
    layout = detect_layout(caches)
    nbytes = layout.chunk_bytes(tokens)
    raw = tp.RawCopier(nbytes, dev)
    eng = make_engine(caches, layout, 8 * tokens, 64 << 20, None)
    te = eng._reg.transfer
    chunks = tp.random_chunks(layout.num_blocks, tokens, shape.block, 256, 1)
    other = tp.random_chunks(layout.num_blocks, tokens, shape.block, 256, 2)
    slot = layout.chunk_bytes(256)
    dst = list(tp.pinned(slot * len(chunks), dev).split(slot))
    blocks = [b for c in chunks for b in c]
    oblocks = [b for c in other for b in c]
    seqs = iter([_sequence(tokens, i) for i in range(40)])
    stored = _sequence(tokens, 999)
    eng.save(stored, blocks)
    eng.load(stored, oblocks)
    reps = 9
    cases = {
        "raw d2h": raw.d2h,
        "te save inline": lambda: te.save(chunks, dst, inline=True).wait(),
        "engine save": lambda: eng.save(next(seqs), blocks),
        "raw h2d": raw.h2d,
        "te load inline": lambda: te.load(dst, other, inline=True).wait(),
        "engine load": lambda: eng.load(stored, oblocks),
    }
    print(f"{torch.cuda.get_device_name()} {which} {tokens} tokens, {nbytes / 2**20:.0f} MiB; us, medians of {reps}",
          flush=True)
    for label, fn in cases.items():
        fn()
        m = measure(fn, reps)
        print(f"{label:15s} " + " ".join(f"{k} {v:7.0f}" for k, v in m.items()), flush=True)
    eng.close()


if __name__ == "__main__":
    main()
