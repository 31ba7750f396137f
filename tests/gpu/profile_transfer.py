"""Where the time of one save/load goes: a CUDA timeline of the copies and kernels.

Run on the GPU box:  . tests/gpu/device_env.sh && python3 tests/gpu/profile_transfer.py [tokens]

For the transfer engine alone and for KVortexEngine (Llama-3.1-8B KV, unified LBNHC layout),
prints per call: wall time, the raw copy time of the same bytes, the delay from the call to
the first DMA, the DMA busy time, the gaps between DMAs, and the delay from the last DMA's
end to the call's return. Host phases of the engine (hashing, slot reservation, enqueue)
are annotated too, each by a marker kernel: those marks cost host time themselves, so the
delays read high; ``timeline.py`` measures the same without them. Not collected by pytest
(no ``test_`` prefix).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

import torch
from cuda_trace import copies, cuda_events, kernels

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence, make_engine
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.transfer import TransferEngine

CHUNK = 256


_MARKS: list[str] = []
_MARK_STREAM: list = []


def mark(label: str) -> None:
    """A tiny kernel on a stream of its own: its GPU timestamp is the host moment ``label``
    (a few us of launch latency); CPU-side profiling would distort the host costs we time."""
    if not _MARK_STREAM:
        _MARK_STREAM.extend([torch.cuda.Stream(), torch.empty(1, device="cuda")])
    stream, buf = _MARK_STREAM
    with torch.cuda.stream(stream):
        buf.fill_(len(_MARKS))
    _MARKS.append(label)


def annotate(obj: object, name: str, label: str) -> None:
    fn = getattr(obj, name)

    def wrapped(*a, **k):
        mark(label + ">")
        try:
            return fn(*a, **k)
        finally:
            mark(label + "<")

    setattr(obj, name, wrapped)


def timeline(fn, label: str, nbytes: int, raw_s: float) -> dict:
    torch.cuda.synchronize()
    mark("warm")
    torch.cuda.synchronize()
    _MARKS.clear()

    def call() -> None:
        mark("CALL>")
        fn()
        mark("CALL<")

    events = cuda_events(call)
    marks = kernels(events, "fill")
    if len(marks) != len(_MARKS):
        print(f"warning: {len(marks)} marker kernels for {len(_MARKS)} marks", flush=True)
    at = {label: e["ts"] for label, e in zip(_MARKS, marks)}
    t0, t1 = at["CALL>"], at["CALL<"]
    every_copy = copies(events, min_bytes=0)
    big = copies(events)
    work = [k for k in kernels(events) if "fill" not in k["name"].lower()]
    phases = " ".join(f"{label}{round(ts - t0)}" for label, ts in at.items() if not label.startswith("CALL"))
    out = {"case": label, "wall_us": round(t1 - t0), "raw_us": round(raw_s * 1e6)}
    if big:
        busy = sum(e["dur"] for e in big)
        gaps = [b["ts"] - (a["ts"] + a["dur"]) for a, b in itertools.pairwise(big)]
        out.update(
            dmas=len(big), first_dma_at_us=round(big[0]["ts"] - t0),
            dma_busy_us=round(busy), dma_gbps=round(sum(e["args"].get("bytes", 0) for e in big) / busy / 1e3, 1),
            gaps_sum_us=round(sum(g for g in gaps if g > 0)), gaps_max_us=round(max(gaps, default=0)),
            after_last_dma_us=round(t1 - (big[-1]["ts"] + big[-1]["dur"])),
            small_copies=len(every_copy) - len(big), kernels=len(work),
            kernel_us=round(sum(k["dur"] for k in work)),
            first_kernel_at_us=round(min((k["ts"] for k in work), default=t0) - t0),
        )
    out["phases"] = phases
    if os.environ.get("DUMP"):
        for e in sorted(work + every_copy, key=lambda e: e["ts"])[:12]:
            print("   ", round(e["ts"] - t0), round(e["dur"]), e["name"][:60])
    return out


def main() -> None:
    tokens = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    if os.environ.get("SWITCH"):
        sys.setswitchinterval(float(os.environ["SWITCH"]))
    device = torch.device("cuda")
    shape = tp.LLAMA_8B
    caches = tp.make_caches(shape, 2 * tokens // shape.block, device, unified=True)
    layout = detect_layout(caches)
    nbytes = layout.chunk_bytes(tokens)
    raw = tp.raw_copy(nbytes, device, 5)
    d2h, h2d = raw["d2h"].median_s, raw["h2d"].median_s
    print(f"{torch.cuda.get_device_name()} tokens={tokens} bytes={nbytes} raw d2h {nbytes / d2h / 1e9:.1f} "
          f"GB/s h2d {nbytes / h2d / 1e9:.1f} GB/s", flush=True)
    staging = int(os.environ.get("STAGING", str(64 << 20)))
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=staging)
    chunks = tp.random_chunks(layout.num_blocks, tokens, shape.block, CHUNK, 1)
    other = tp.random_chunks(layout.num_blocks, tokens, shape.block, CHUNK, 2)
    slot = layout.chunk_bytes(CHUNK)
    dst = list(tp.pinned(slot * len(chunks), device).split(slot))
    for name in ("_check", "_units", "_index_tensors"):
        annotate(te, name, name)
    import kvortex_core.data.transfer as transfer_mod

    annotate(transfer_mod, "event_wait", "ew")
    results = []
    for _ in range(2):
        te.save(chunks, dst).wait()
        te.load(dst, other).wait()
    for _ in range(2):
        results.append(timeline(lambda: te.save(chunks, dst).wait(), "te save", nbytes, d2h))
        results.append(timeline(lambda: te.load(dst, other).wait(), "te load", nbytes, h2d))
        results.append(timeline(lambda: te.save(chunks, dst, inline=True).wait(), "te save inline", nbytes, d2h))
    te.close()

    engine = make_engine(caches, layout, 4 * tokens, staging, None)
    reg = engine._reg
    annotate(reg.hasher, "keys", "hash")
    annotate(reg.tiers, "begin_save", "begin_save")
    annotate(reg.tiers, "begin_load", "begin_load")
    annotate(reg.transfer, "save", "te.save enqueue")
    annotate(reg.transfer, "load", "te.load enqueue")
    annotate(engine, "_commit_as_ready", "commit_as_ready")
    for name in ("_check", "_units", "_index_tensors"):
        annotate(reg.transfer, name, name)
    blocks = [b for c in chunks for b in c]
    oblocks = [b for c in other for b in c]
    seqs = [_sequence(tokens, i) for i in range(6)]
    engine.save(seqs[0], blocks)
    engine.load(seqs[0], oblocks)
    for i in range(1, 3):
        results.append(timeline(lambda i=i: engine.save(seqs[i], blocks), "engine save", nbytes, d2h))
        engine.contains(engine.keys(seqs[i]))
        results.append(timeline(lambda i=i: engine.load(seqs[i], oblocks), "engine load", nbytes, h2d))
    engine.close()
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    t = time.perf_counter()
    main()
    print(f"elapsed {time.perf_counter() - t:.1f}s")
