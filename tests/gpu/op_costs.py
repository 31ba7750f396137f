"""Host cost of each CUDA/torch primitive the transfer path calls (median us over many calls).

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/op_costs.py
The transfer's per-call host time is a sum of these; the VM's speed sets them.
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import statistics
import threading
import time

import torch

from kvortex_core.data.streams import StreamSet


def cost(label: str, fn, n: int = 2000, sync_every: int = 200) -> None:
    times = []
    for i in range(n):
        if i % sync_every == 0:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"{label:40s} median {statistics.median(times) * 1e6:7.1f} us  p90 {times[int(0.9 * n)] * 1e6:7.1f} us",
          flush=True)


def main() -> None:
    dev = torch.device("cuda")
    s = StreamSet(dev, 2)
    ev = torch.cuda.Event()
    ev.record(s.first)
    big = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
    wide = big.view(torch.complex128).view(-1, 16)  # 256-byte rows
    rows_small = torch.randint(0, wide.shape[0], (1024,), device=dev)
    out_small = torch.empty(1024, 16, dtype=torch.complex128, device=dev)
    pinned = torch.empty(1 << 20, dtype=torch.uint8, pin_memory=True)
    dev_small = torch.empty(1 << 20, dtype=torch.uint8, device=dev)
    ids_host = torch.zeros(4096, dtype=torch.int64, pin_memory=True)
    ids_dev = torch.empty(4096, dtype=torch.int64, device=dev)
    offsets = torch.zeros(64, 1024, dtype=torch.int64, device=dev)
    print(torch.cuda.get_device_name(), flush=True)
    cost("python no-op lambda", lambda: None)
    cost("Event()", torch.cuda.Event)
    cost("Event() + record(first)", lambda: torch.cuda.Event().record(s.first))
    cost("event.record(first) (reused)", lambda: ev.record(s.first))
    cost("event.query()", ev.query)
    cost("stream.wait_event(ev)", lambda: s.second.wait_event(ev))
    cost("current_stream()", torch.cuda.current_stream)

    def switch() -> None:
        with s.on(s.first):
            pass

    cost("StreamSet.on() enter+exit", switch)
    cost("tensor slice t[a:b]", lambda: big[1024:4096])
    cost("view(dtype).view(shape)", lambda: big.view(torch.complex128).view(-1, 16))
    cost("pinned[:n] H2D copy_ 32 KiB nb", lambda: ids_dev.copy_(ids_host, non_blocking=True))
    cost("D2H copy_ 1 MiB nb into pinned", lambda: pinned.copy_(dev_small, non_blocking=True))
    cost("index_select(out=) 1024 rows", lambda: torch.index_select(wide, 0, rows_small, out=out_small))
    cost("index_copy_ 1024 rows", lambda: wide.index_copy_(0, rows_small, out_small))
    ids = ids_dev[:32 * 16].view(32, 16)
    cost("call_rows-like add [1,64,1,1024]+[32,1,16,1]",
         lambda: torch.add(offsets.view(1, 64, 1, 1024), ids.view(32, 1, 16, 1), alpha=7))
    t = torch.empty(1 << 20, device=dev)
    cost("record_stream(second)", lambda: t.record_stream(s.second))
    cost("torch.empty 4 MiB (cached)", lambda: torch.empty(1 << 20, device=dev))

    # thread hand-off: how long from set() on one thread to the waiter running again
    go, back = threading.Event(), threading.Event()
    lat = []

    def echo() -> None:
        for _ in range(500):
            go.wait()
            go.clear()
            back.set()

    th = threading.Thread(target=echo)
    th.start()
    for _ in range(500):
        t0 = time.perf_counter()
        go.set()
        back.wait()
        back.clear()
        lat.append(time.perf_counter() - t0)
    th.join()
    print(f"{'thread ping-pong (round trip)':40s} median {statistics.median(lat) * 1e6:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
