"""Two threads enqueueing stream work at once: what GIL hand-overs cost, through torch and
through the driver calls of kvortex_core.data.cudadrv (which keep the GIL).

Each "batch" is what the transfer engine enqueues per staging half, minus the kernel: a
stream wait, an event record, a stream wait on it, a small DMA and a record (4 KiB, so the
copy engine never holds the host back). One thread alone, then a D2H thread and an H2D
thread at once; per batch host time in us (median over rounds), for torch and driver calls.
Also the host cost of each single call both ways.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/gil_probe.py [batches] [rounds]
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import torch

from kvortex_core.data.cudadrv import driver
from kvortex_core.data.streams import StreamSet


def one_batch(s: StreamSet, dst: torch.Tensor, src: torch.Tensor, ev: torch.cuda.Event) -> None:
    s.wait(s.first, ev)
    s.hand_over(s.first, s.second)
    s.copy(dst, src, s.second)
    s.recycle([s.record(s.second, (ev,))])


def run(pairs: list[tuple[StreamSet, torch.Tensor, torch.Tensor, torch.cuda.Event]], n: int, use_drv: bool,
        drv: object) -> list[float]:
    per: list[float] = [0.0] * len(pairs)
    start = threading.Barrier(len(pairs))

    def body(i: int) -> None:
        s, dst, src, ev = pairs[i]
        with torch.cuda.device(0):
            start.wait()
            t = time.perf_counter()
            for _ in range(n):
                s.drv = drv if use_drv else None
                one_batch(s, dst, src, ev)
            per[i] = (time.perf_counter() - t) * 1e6 / n

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(pairs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    torch.cuda.synchronize()
    return per


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    dev = torch.device("cuda")
    drv = driver()
    print(torch.cuda.get_device_name(), "driver calls:", drv is not None, flush=True)
    save_s, load_s = StreamSet(dev, 2), StreamSet(dev, 2)
    for s in (save_s, load_s):
        s._handoff = torch.cuda.Event()
        s._handoff.record(s.first)
    ev_s, ev_l = torch.cuda.Event(), torch.cuda.Event()
    ev_s.record(save_s.first)
    ev_l.record(load_s.first)
    d_src = torch.ones(4096, dtype=torch.uint8, device=dev)
    h_dst = torch.zeros(4096, dtype=torch.uint8).pin_memory()
    h_src = torch.full((4096,), 7, dtype=torch.uint8).pin_memory()
    d_dst = torch.zeros(4096, dtype=torch.uint8, device=dev)
    save = (save_s, h_dst, d_src, ev_s)
    load = (load_s, d_dst, h_src, ev_l)
    res: dict[str, list[float]] = {}
    for _ in range(rounds):
        for use_drv in (False, True):
            tag = "driver" if use_drv else "torch"
            res.setdefault(f"{tag} alone", []).append(run([save], n, use_drv, drv)[0])
            a, b = run([save, load], n, use_drv, drv)
            res.setdefault(f"{tag} both: d2h", []).append(a)
            res.setdefault(f"{tag} both: h2d", []).append(b)
    assert bool((h_dst == 1).all()) and bool((d_dst == 7).all()), "copies landed wrong"
    for k, v in res.items():
        print(f"{k:22s} per batch median {statistics.median(v):7.1f} us  (min {min(v):.1f}, max {max(v):.1f})",
              flush=True)


if __name__ == "__main__":
    main()
