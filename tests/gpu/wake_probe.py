"""How late each way of waiting for a CUDA event returns after the event completed.

A ~300 us GPU sleep kernel, an event after it, then one of the waits below; the host time from
the launch to the wait's return, minus the kernel's own GPU time (a timing event pair), is the
wake-up latency plus the launch. Same process, methods interleaved, 40 rounds; medians.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/wake_probe.py
Not collected by pytest.
"""

from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time

import torch

from kvortex_core.data.streams import event_wait

_LIBC = ctypes.CDLL(None, use_errno=True)
PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30


def poll_sleep(ev: torch.cuda.Event) -> None:
    while not ev.query():
        time.sleep(0)


def poll_yield(ev: torch.cuda.Event) -> None:
    while not ev.query():
        os.sched_yield()


def poll_sleep_slack(ev: torch.cuda.Event) -> None:
    old = _LIBC.prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)
    _LIBC.prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)
    try:
        while not ev.query():
            time.sleep(0)
    finally:
        _LIBC.prctl(PR_SET_TIMERSLACK, old, 0, 0, 0)


METHODS = {
    "event.synchronize": lambda ev: ev.synchronize(),
    "torch.cuda.synchronize": lambda ev: torch.cuda.synchronize(),
    "waiter thread (event_wait, timeout)": lambda ev: event_wait(ev, 5.0, "probe"),
    "poll + time.sleep(0)": poll_sleep,
    "poll + time.sleep(0), timer slack 1 ns": poll_sleep_slack,
    "poll + os.sched_yield (holds the GIL)": poll_yield,
}


def main() -> None:
    torch.cuda.init()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    done = torch.cuda.Event()
    cycles = 600_000  # calibrated below to ~300 us
    for _ in range(3):
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        torch.cuda.synchronize()
    cycles = int(cycles * 0.3 / a.elapsed_time(b))
    late: dict[str, list[float]] = {m: [] for m in METHODS}
    other = threading.Thread(target=lambda: None)
    other.start()
    other.join()
    for rnd in range(40):
        names = list(METHODS) if rnd % 2 == 0 else list(METHODS)[::-1]
        for name in names:
            torch.cuda.synchronize()
            time.sleep(0.002)
            t0 = time.perf_counter()
            a.record()
            torch.cuda._sleep(cycles)
            b.record()
            done.record()
            METHODS[name](done)
            wall = time.perf_counter() - t0
            torch.cuda.synchronize()
            late[name].append(wall * 1e6 - a.elapsed_time(b) * 1e3)
    print(f"{torch.cuda.get_device_name()}: wall minus GPU time of a ~300 us kernel, us (median, p90)")
    for name, xs in late.items():
        xs.sort()
        print(f"  {name:42s} {statistics.median(xs):7.1f} {xs[int(0.9 * len(xs))]:7.1f}")


if __name__ == "__main__":
    main()
