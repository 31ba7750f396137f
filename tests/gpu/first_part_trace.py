"""Where the host time before a save's first DMA goes: every Python and C call of the first
part's ``TransferEngine.save`` (and of the engine's steps before it), timed on a cold path.

The benchmark's conditions: a device sync and a raw copy before each call. ``sys.setprofile``
logs each call and return (it adds ~0.5-1 us per event, so totals read high); the printout
lists the calls that took longest, inclusive, and the time up to the first DMA.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/first_part_trace.py [mla|llama] [unified|per-layer]
Not collected by pytest.
"""

from __future__ import annotations

import collections
import statistics
import sys
import time

import torch
from probes import engine_probe

import kvortex_core.data.transfer as transfer_mod
from kvortex_core.cli.bench import transfer_parts as tp

EVENTS: list[tuple[str, str, float]] = []
ACTIVE = [False]


def profiler(frame, event, arg):
    if not ACTIVE[0]:
        return
    if event in ("c_call", "c_return"):
        name = getattr(arg, "__qualname__", None) or getattr(arg, "__name__", repr(arg))
        EVENTS.append((event, f"C {name}", time.perf_counter()))
    elif event in ("call", "return"):
        code = frame.f_code
        EVENTS.append((event, f"{code.co_name} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})",
                       time.perf_counter()))


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "mla"
    unified = (sys.argv[2] if len(sys.argv) > 2 else "unified") == "unified"
    pr = engine_probe(which, 8192, unified)
    eng, blocks, raw, dev = pr.engine, pr.blocks, pr.raw, pr.device
    seqs = pr.sequences()
    real_range = transfer_mod._payload_range
    first_dma: list[float] = []

    def marked_range(buf, u):
        if not first_dma:
            first_dma.append(time.perf_counter())
            ACTIVE[0] = False
        return real_range(buf, u)

    transfer_mod._payload_range = marked_range
    eng.save(next(seqs), blocks)
    totals: dict[str, list[float]] = collections.defaultdict(list)
    starts = []
    for _ in range(8):
        tp.sync(dev)
        raw.d2h()
        tp.sync(dev)
        EVENTS.clear()
        first_dma.clear()
        sys.setprofile(profiler)
        t0 = time.perf_counter()
        ACTIVE[0] = True
        eng.save(next(seqs), blocks)
        sys.setprofile(None)
        starts.append((first_dma[0] - t0) * 1e6)
        stack: list[tuple[str, float]] = []
        per: dict[str, float] = collections.defaultdict(float)
        for event, name, t in EVENTS:
            if event in ("call", "c_call"):
                stack.append((name, t))
            elif stack:
                opened, t_open = stack.pop()
                per[opened] += (t - t_open) * 1e6
        for name, us in per.items():
            totals[name].append(us)
    print(f"{torch.cuda.get_device_name()} {which} {'unified' if unified else 'per-layer'}: first DMA enqueued "
          f"{statistics.median(starts):.0f} us after the call (median of {len(starts)}, profiler on)")
    rows = sorted(((statistics.median(v + [0.0] * (len(starts) - len(v))), k) for k, v in totals.items()), reverse=True)
    for us, name in rows[:45]:
        print(f"  {us:7.1f} us  {name}")


if __name__ == "__main__":
    main()
