"""Host cost of each step of a save's head (event, stream wait, two kernels, one DMA), by what
came before it: is a step slow because the host is cold, or because the GPU went idle?

Run on the GPU box: . tests/gpu/device_env.sh && ROUNDS=30 python3 tests/gpu/submit_probe.py
Conditions (taking turns, medians over ROUNDS):
  bench    sync, a 549 MiB raw D2H copy, sync (as each ``bench transfer`` repetition starts)
  sleep    sync, time.sleep(10 ms) (GPU idle, thread asleep)
  spin     sync, 10 ms Python busy loop (GPU idle, thread busy)
  gpuwait  a 10 ms GPU sleep kernel, sync (the thread waits in the driver, no DMA)
  busy     a 10 ms GPU sleep kernel on a third stream still running (GPU busy elsewhere)
  hot      right after the same sequence and a sync
Then (WAKE=1) every condition is "bench" followed by a wake-up submission made before ~host work
(a Python busy loop of SPIN us standing for a save's hashing and slot reservation): does an early
cheap submission make the head's later ones cheap?
WHY=1: after a 10 ms Python spin, the head twice in a row, after the same ops on CPU tensors, or
with the GPU kept busy by a kernel on another stream (PIN=1: the process pinned to one CPU).
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import itertools
import os
import statistics
import time

import torch

STEPS = ("record", "wait", "add", "index_select", "dma", "second add")


def main() -> None:
    dev = torch.device("cuda")
    if os.environ.get("PIN"):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    rounds = int(os.environ.get("ROUNDS", "30"))
    caller, second, third = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream()
    big_src = torch.empty(549 << 20, dtype=torch.uint8, device=dev)
    big_dst = torch.empty(549 << 20, dtype=torch.uint8, pin_memory=True)
    wide = torch.empty(64 << 20, dtype=torch.uint8, device=dev).view(torch.complex128).view(-1, 16)
    ids = torch.randint(0, 1000, (256,), dtype=torch.int64).pin_memory()
    offs = torch.randint(0, 1000, (61, 1), dtype=torch.int64, device=dev)
    rows = torch.empty(61, 256, dtype=torch.int64, device=dev)
    stage = torch.empty(61 * 256, 16, dtype=torch.complex128, device=dev)
    host = torch.empty(stage.numel() * 16, dtype=torch.uint8, pin_memory=True)
    ids_dev = ids.to(dev)  # stand-in: the shipped path reads the pinned ids in place
    ev = torch.cuda.Event()
    cycles = int(torch.cuda.get_device_properties(dev).clock_rate * 1e3 * 0.010)  # ~10 ms

    def head() -> list[float]:
        t = [time.perf_counter()]
        ev.record(caller)
        t.append(time.perf_counter())
        second.wait_event(ev)
        t.append(time.perf_counter())
        with torch.cuda.stream(second):
            torch.add(offs, ids_dev, out=rows)
            t.append(time.perf_counter())
            torch.index_select(wide, 0, rows.view(-1), out=stage)
            t.append(time.perf_counter())
            host.copy_(stage.view(torch.uint8).view(-1), non_blocking=True)
            t.append(time.perf_counter())
            torch.add(offs, ids_dev, out=rows)
            t.append(time.perf_counter())
        return [(b - a) * 1e6 for a, b in itertools.pairwise(t)]

    def prep(kind: str) -> None:
        torch.cuda.synchronize()
        if kind == "bench":
            big_dst.copy_(big_src, non_blocking=True)
            torch.cuda.synchronize()
        elif kind == "sleep":
            time.sleep(0.010)
        elif kind == "spin":
            end = time.perf_counter() + 0.010
            while time.perf_counter() < end:
                pass
        elif kind == "gpuwait":
            torch.cuda._sleep(cycles)
            torch.cuda.synchronize()
        elif kind == "busy":
            with torch.cuda.stream(third):
                torch.cuda._sleep(cycles)
        elif kind == "hot":
            head()
            torch.cuda.synchronize()

    side = torch.cuda.Stream()
    ev2 = torch.cuda.Event()

    def spin(us: float) -> None:
        end = time.perf_counter() + us * 1e-6
        while time.perf_counter() < end:
            pass

    def wake(kind: str, us: float) -> float:
        t = time.perf_counter()
        if kind == "record":
            ev2.record(side)
        elif kind == "kernel":
            with torch.cuda.stream(side):
                torch.cuda._sleep(1000)
        elif kind == "long":  # keeps the GPU busy ~us + 300 us
            with torch.cuda.stream(side):
                torch.cuda._sleep(int(cycles * (us + 300) / 10_000))
        elif kind == "query":
            ev2.query()
        took = (time.perf_counter() - t) * 1e6
        spin(us)
        return took

    cpu_wide = torch.empty(1 << 16, dtype=torch.uint8).view(torch.complex128).view(-1, 16)
    cpu_offs, cpu_ids = offs.cpu() % 64, ids.cpu() % 64
    cpu_rows = torch.empty(61, 256, dtype=torch.int64)
    cpu_stage = torch.empty(61 * 256, 16, dtype=torch.complex128)

    def cpu_ops() -> None:  # the head's ops on CPU tensors: the dispatcher warm, no CUDA call
        torch.add(cpu_offs, cpu_ids, out=cpu_rows)
        torch.index_select(cpu_wide, 0, cpu_rows.view(-1), out=cpu_stage)

    if os.environ.get("WHY"):  # after a 10 ms Python spin with the GPU idle, unless said otherwise
        def run(kind: str) -> tuple[float, float]:
            torch.cuda.synchronize()
            if kind == "gpu-busy":  # a kernel covers the spin and the head
                with torch.cuda.stream(third):
                    torch.cuda._sleep(int(cycles * 1.3))
            spin(10_000)
            t = time.perf_counter()
            if kind == "cpu-ops":
                cpu_ops()
            pre = (time.perf_counter() - t) * 1e6
            first = sum(head()[:5])
            if kind == "twice":
                torch.cuda.synchronize()
                return first, sum(head()[:5])
            return pre, first

        kinds_w = ("plain", "twice", "cpu-ops", "gpu-busy")
        res_w: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds_w}
        for r in range(rounds + 3):
            for k in kinds_w:
                v = run(k)
                if r >= 3:
                    res_w[k].append(v)
        print(torch.cuda.get_device_name(), torch.__version__, f"rounds={rounds}",
              f"affinity={sorted(os.sched_getaffinity(0))}", flush=True)
        print("after 10 ms spin: kind, A, B (medians, us); twice: A = first head, B = second;"
              " else A = warm-up cost, B = head")
        for k in kinds_w:
            a, b = zip(*res_w[k])
            print(f"{k:9s} {statistics.median(a):9.1f} {statistics.median(b):9.1f}")
        return

    if os.environ.get("WAKE"):
        variants = [(k, us) for us in (0, 200, 400) for k in ("none", "record", "query", "kernel", "long")]
        out: dict[tuple[str, int], list[tuple[float, float]]] = {v: [] for v in variants}
        for r in range(rounds + 3):
            for v in variants:
                prep("bench")
                w = wake(*v)
                h = head()
                if r >= 3:
                    out[v].append((w, sum(h[:5])))
        torch.cuda.synchronize()
        print(torch.cuda.get_device_name(), torch.__version__, f"rounds={rounds}", flush=True)
        print("wake      spin_us   wake_us   head_us (to DMA enqueued, medians)")
        for v in variants:
            w, h = zip(*out[v])
            print(f"{v[0]:8s} {v[1]:8d} {statistics.median(w):9.1f} {statistics.median(h):9.1f}")
        return

    kinds = ("bench", "sleep", "spin", "gpuwait", "busy", "hot")
    res: dict[str, list[list[float]]] = {k: [] for k in kinds}
    for _ in range(3):
        for k in kinds:
            prep(k)
            head()
    for _ in range(rounds):
        for k in kinds:
            prep(k)
            res[k].append(head())
    torch.cuda.synchronize()
    print(torch.cuda.get_device_name(), torch.__version__, f"rounds={rounds}", flush=True)
    print(f"{'condition':10s} " + " ".join(f"{s:>13s}" for s in STEPS) + "    total (us, median)")
    for k in kinds:
        cols = list(zip(*res[k]))
        med = [statistics.median(c) for c in cols]
        print(f"{k:10s} " + " ".join(f"{m:13.1f}" for m in med) + f"   {sum(med[:5]):8.1f}")


if __name__ == "__main__":
    main()
