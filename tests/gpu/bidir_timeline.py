"""Who waits for whom when a save and a load run together through KVortexEngine.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/bidir_timeline.py [mla|llama] [tokens] [unified|per-layer]
(``SWITCH_INTERVAL=0.0005``: run with that GIL switch interval; ``QUIET=1``: ratios only).

Each DMA is marked when the host enqueues it (host clock) and when the GPU starts it (a timing
event on the copy stream, aligned to the host clock by an event recorded at the call's start on
the idle device). A DMA that starts within ~30 us of its enqueue found the copy engine waiting
for the host. Also marks the engine's host phases per thread. Not collected by pytest.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time

import torch
from probes import engine_probe, mark_dmas, probe_args

import kvortex_core.data.transfer as transfer_mod
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence

LOCAL = threading.local()
MARKS: list[tuple[str, str, float, object]] = []  # (thread tag, label, host time, event or None)


def tag() -> str:
    return getattr(LOCAL, "tag", "?")


def patch(obj, name, label):
    fn = getattr(obj, name)

    def wrapped(*a, **k):
        MARKS.append((tag(), label + ">", time.perf_counter(), None))
        try:
            return fn(*a, **k)
        finally:
            MARKS.append((tag(), label + "<", time.perf_counter(), None))

    setattr(obj, name, wrapped)


def main() -> None:
    if os.environ.get("SWITCH_INTERVAL"):  # the interpreter's GIL switch interval, in seconds
        sys.setswitchinterval(float(os.environ["SWITCH_INTERVAL"]))
    which, tokens, unified = probe_args(sys.argv)
    pr = engine_probe(which, tokens, unified, capacity_tokens=12 * tokens)
    eng, reg, blocks, other, raw, dev = pr.engine, pr.engine._reg, pr.blocks, pr.other, pr.raw, pr.device
    stored = _sequence(tokens, 99)
    eng.save(stored, blocks)
    eng.load(stored, other)
    seqs = pr.sequences()

    mark_dmas(lambda t, ev: MARKS.append((tag(), "dma", t, ev)))  # right before each DMA, on the copy stream
    for name, label in (("begin_save", "bsave"), ("begin_load", "bload"), ("commit_save", "commit"),
                        ("prepare_save", "prep")):
        patch(reg.tiers, name, label)
    patch(transfer_mod, "event_wait", "ew")
    patch(reg.hasher, "keys", "hash")

    def save_thread(seq):
        LOCAL.tag = "S"
        eng.save(seq, blocks)
        MARKS.append(("S", "END", time.perf_counter(), None))

    def load_thread():
        LOCAL.tag = "L"
        eng.load(stored, other)
        MARKS.append(("L", "END", time.perf_counter(), None))

    def one(show: bool) -> float:
        eng.save(stored, blocks)  # back in the cache if the saves evicted it
        torch.cuda.synchronize()
        MARKS.clear()
        start = torch.cuda.Event(enable_timing=True)
        seq = next(seqs)
        t0 = time.perf_counter()
        start.record()
        hs = eng._executor.submit(save_thread, seq)
        hl = eng._executor.submit(load_thread)
        hs.result()
        hl.result()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        if show:
            for who in ("S", "L"):
                rows = [(lbl, (t - t0) * 1e6, ev) for tg, lbl, t, ev in MARKS if tg == who]
                out = []
                for lbl, t, ev in rows:
                    if ev is not None:
                        g = start.elapsed_time(ev) * 1e3
                        out.append(f"dma@{t:.0f}/gpu{g:.0f}{'*' if g - t < 30 else ''}")
                    else:
                        out.append(f"{lbl}@{t:.0f}")
                print(f"  {who}: " + " ".join(out), flush=True)
        return wall

    for _ in range(3):
        one(False)
    walls = []
    for i in range(9):
        tp.sync(dev)
        t = time.perf_counter()
        raw.both()
        tp.sync(dev)
        r = time.perf_counter() - t
        w = one(i in (2, 5) and not os.environ.get("QUIET"))
        walls.append(r / w)
        print(f"rep {i}: ours {w * 1e3:.2f} ms raw both {r * 1e3:.2f} ms ratio {r / w:.3f}", flush=True)
    print(f"{which} {tokens} median ratio {statistics.median(walls):.3f}  (* = GPU started the DMA < 30 us "
          "after the host enqueued it: the copy engine waited for the host)", flush=True)
    eng.close()


if __name__ == "__main__":
    main()
