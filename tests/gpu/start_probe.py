"""Host cost of each step before a save's first DMA: cold (as in the bench) and hot.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/start_probe.py [llama|mla]

Replays the transfer engine's steps for the first batch of a save (event on the caller's
stream, handle, id upload, row kernel, staging wait, gather, hand-over, DMA, record) and
prints the median host time of each, in µs:
  cold     after a device sync and a 1 GiB raw copy, as each bench repetition starts
  prewarm  the same, with one unrelated torch op and event record right before
  sleep    after a sync and a 20 ms sleep of the thread (no spin)
  hot      the second of two back to back
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time

import torch

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import make_engine
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.transfer import TransferHandle, _payload_range

LABELS = ["record_current", "handle", "upload", "rows", "record_stream", "next_stage", "units", "gather",
          "hand_over", "copy", "record"]


def steps(te, chunks, dst):
    d = te._save
    s = d.streams
    lay = te.layout
    t = time.perf_counter
    marks = [t()]
    produced = s.record_current()
    marks.append(t())
    h = TransferHandle(te.device, "save", chunk_events=[None] * len(chunks), keepalive=[list(dst)],
                       other_events=[produced], home=s)
    marks.append(t())
    with s.on(s.first):
        region = d.arena.lend(chunks)  # never given back: regions past the arena take over
        region.upload()
        ids = region.dev.view(len(chunks), -1)
        marks.append(t())
        rows = te._rows.call_rows(ids, lay.block_size, lay.kv_count, lay.num_kv_heads)
        marks.append(t())
    rows.record_stream(s.second)
    marks.append(t())
    stage = te._next_stage(d, produced, s.first)
    marks.append(t())
    batches = te._units(chunks, range(lay.num_layers), layer_major=False)
    marks.append(t())
    u = batches[0][0]
    with s.on(s.first):
        te._gather(u, rows, stage)
    marks.append(t())
    s.hand_over(s.first, s.second)
    marks.append(t())
    with s.on(s.second):
        _payload_range(dst[u.chunk], u).copy_(te._stage_bytes(stage, u), non_blocking=True)
    marks.append(t())
    d.free_events[d.turn] = s.record(s.second, d.free_events)
    marks.append(t())
    return [(b - a) * 1e6 for a, b in itertools.pairwise(marks)], (h, rows)


def report(name, rows):
    med = [statistics.median(r[i] for r in rows) for i in range(len(LABELS))]
    print(f"{name:8s} total {sum(med):6.0f} | " + " ".join(f"{k} {v:.0f}" for k, v in zip(LABELS, med, strict=True)),
          flush=True)


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "llama"
    shape = tp.DEEPSEEK_V3 if which == "mla" else tp.LLAMA_8B
    dev = torch.device("cuda")
    tokens = 8192
    caches = tp.make_caches(shape, 2 * tokens // shape.block, dev, unified=which != "mla")
    layout = detect_layout(caches)
    eng = make_engine(caches, layout, 8 * tokens, 64 << 20, None)
    te = eng._reg.transfer
    print(torch.cuda.get_device_name(), which, "row bytes", te._rows.row_bytes if te._rows else None, flush=True)
    chunks = tp.random_chunks(layout.num_blocks, tokens, shape.block, 256, 1)[:2]
    slot = layout.chunk_bytes(256)
    dst = list(tp.pinned(slot * len(chunks), dev).split(slot))
    raw = tp.RawCopier(1 << 30, dev)
    keep = []
    for _ in range(3):
        keep.append(steps(te, chunks, dst))
    torch.cuda.synchronize()
    reps = 15

    def cold(pre=None, sleep=False):
        out = []
        for _ in range(reps):
            torch.cuda.synchronize()
            if sleep:
                time.sleep(0.02)
            else:
                raw.d2h()
                torch.cuda.synchronize()
            if pre is not None:
                pre()
            r, k = steps(te, chunks, dst)
            out.append(r)
            torch.cuda.synchronize()
            del k
        return out

    def prewarm():
        torch.empty(1, device=dev)
        ev = torch.cuda.Event()
        ev.record()

    report("cold", cold())
    report("prewarm", cold(prewarm))
    report("sleep", cold(sleep=True))
    hot = []
    for _ in range(reps):  # the second of two calls back to back
        torch.cuda.synchronize()
        _, k1 = steps(te, chunks, dst)
        r, k2 = steps(te, chunks, dst)
        hot.append(r)
        torch.cuda.synchronize()
        del k1, k2
    report("hot", hot)
    report("cold", cold())
    eng.close()


if __name__ == "__main__":
    main()
