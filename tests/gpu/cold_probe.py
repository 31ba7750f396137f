"""How much of a save's late first DMA is the cold host, and what the host machine does when idle.

Per condition, the host time from the call to the enqueue of the first DMA of an 8K-token engine
save (and the call's duration), medians over ROUNDS calls, conditions taking turns:

* ``bench``: a device sync, a raw copy of the same bytes, a sync, then the call (as the benchmark);
* ``spin``: the same, then 2 ms of a Python busy loop before the call (the thread awake);
* ``hot``: a sync, then the call right after the previous call of this condition returned
  (the engine's code ran a moment ago, no raw copy between).

Also prints the guest's cpuidle driver and governor, and how long a thread blocked on a
``threading.Event`` takes to wake (what a hand-off to a sleeping worker thread costs).

Run on the GPU box: . tests/gpu/device_env.sh && ROUNDS=8 python3 tests/gpu/cold_probe.py [mla|llama] [tokens] [unified|per-layer]
Not collected by pytest.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

from probes import engine_probe, mark_first_dma, probe_args

from kvortex_core.cli.bench import transfer_parts as tp


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        return f"? ({exc.__class__.__name__})"


def wake_latency(rounds: int = 200) -> tuple[float, float]:
    """Median and p90 microseconds from ``Event.set`` to the blocked thread running."""
    go, back = threading.Event(), threading.Event()
    woke: list[float] = []
    stamp = [0.0]

    def waiter() -> None:
        for _ in range(rounds):
            go.wait()
            go.clear()
            woke.append(time.perf_counter() - stamp[0])
            back.set()

    t = threading.Thread(target=waiter)
    t.start()
    for _ in range(rounds):
        time.sleep(0.002)  # the waiter sleeps, as a worker between calls
        stamp[0] = time.perf_counter()
        go.set()
        back.wait()
        back.clear()
    t.join()
    us = sorted(w * 1e6 for w in woke)
    return statistics.median(us), us[int(0.9 * len(us))]


def main() -> None:
    print("cpuidle driver:", _read("/sys/devices/system/cpu/cpuidle/current_driver"),
          "governor:", _read("/sys/devices/system/cpu/cpuidle/current_governor_ro"),
          _read("/sys/devices/system/cpu/cpuidle/current_governor"), "cpus:", os.cpu_count(), flush=True)
    med, p90 = wake_latency()
    print(f"thread wake after Event.set: median {med:.0f} us, p90 {p90:.0f} us", flush=True)
    rounds = int(os.environ.get("ROUNDS", "8"))
    # room for every call's fresh sequence: no eviction inside a call
    pr = engine_probe(*probe_args(sys.argv), capacity_tokens=(4 * rounds + 4) * probe_args(sys.argv)[1])
    eng, blocks, raw, dev = pr.engine, pr.blocks, pr.raw, pr.device
    print(pr.describe(), flush=True)
    seqs = pr.sequences(count=200)
    first = mark_first_dma()
    eng.save(next(seqs), blocks)
    res: dict[str, list[tuple[float, float, float]]] = {"bench": [], "spin": [], "hot": []}
    for _ in range(rounds):
        for cond, runs in res.items():
            tp.sync(dev)
            r = 0.0
            if cond != "hot":
                t = time.perf_counter()
                raw.d2h()
                tp.sync(dev)
                r = time.perf_counter() - t
            if cond == "spin":
                end = time.perf_counter() + 0.002
                while time.perf_counter() < end:
                    pass
            first.clear()
            t0 = time.perf_counter()
            eng.save(next(seqs), blocks)
            t1 = time.perf_counter()
            runs.append(((first[0] - t0) * 1e6, (t1 - t0) * 1e6, r * 1e6))
            if cond == "hot":  # a second call at once: the code is warm
                tp.sync(dev)
                first.clear()
                t0 = time.perf_counter()
                eng.save(next(seqs), blocks)
                t1 = time.perf_counter()
                runs[-1] = ((first[0] - t0) * 1e6, (t1 - t0) * 1e6, 0.0)
    raws = [r for v in res.values() for _, _, r in v if r]
    for cond, v in res.items():
        f = statistics.median(x[0] for x in v)
        c = statistics.median(x[1] for x in v)
        print(f"{cond:6s} first DMA enqueued {f:6.0f} us after the call (min {min(x[0] for x in v):.0f}), "
              f"call {c:7.0f} us, ratio to raw {statistics.median(raws) / c:.3f}")


if __name__ == "__main__":
    main()
