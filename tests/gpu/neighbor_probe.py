"""How much a save + load through the transfer engine slows a busy Python thread beside it (vLLM's scheduler and
forward loop are such a thread), with the transfer's stream calls through torch or through the
driver (``transfer.driver_calls``, data/cudadrv.py).

The neighbour runs a pure-Python loop with a tiny CUDA kernel every 50 iterations for a fixed
time; its iterations per ms are counted while the process is otherwise idle, then while two
threads save and load 8K tokens of Llama-8B KV (random blocks, pinned buffers) back to back,
both directions at once. Rounds alternate the two settings; printed: the neighbour's rate as a
share of idle, and the median time of one save + load pair.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/neighbor_probe.py [rounds]
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time

import torch

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.transfer import TransferEngine

WINDOW_S = 0.4


def neighbour(stop: threading.Event, out: list[float]) -> None:
    x = torch.zeros(16, device="cuda")
    n, t0 = 0, time.perf_counter()
    acc = 0
    while not stop.is_set():
        for i in range(50):
            acc += i * i % 7
        x.add_(1)
        n += 50
    out.append(n / ((time.perf_counter() - t0) * 1e3))


def rate_while(work) -> tuple[float, list[float]]:
    stop, out, times = threading.Event(), [], []
    th = threading.Thread(target=neighbour, args=(stop, out))
    th.start()
    end = time.perf_counter() + WINDOW_S
    while time.perf_counter() < end:
        if work is None:
            time.sleep(0.01)
        else:
            times.append(work())
    stop.set()
    th.join()
    torch.cuda.synchronize()
    return out[0], times


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    print(torch.cuda.get_device_name(), flush=True)
    dev = torch.device("cuda")
    shape, tokens = tp.LLAMA_8B, 8192
    caches = tp.make_caches(shape, 4 * tokens // shape.block, dev, unified=True)
    layout = detect_layout(caches)
    engines = {flag: TransferEngine(caches, layout, chunk_tokens=256, staging_bytes=64 << 20, driver_calls=flag)
               for flag in (False, True)}
    save_ids = tp.random_chunks(layout.num_blocks, tokens, shape.block, 256, 1)
    load_ids = tp.random_chunks(layout.num_blocks, tokens, shape.block, 256, 2)
    chunk = layout.chunk_bytes(256)
    out_bufs = list(tp.pinned(chunk * len(save_ids), dev).split(chunk))
    in_bufs = list(tp.pinned(chunk * len(load_ids), dev).split(chunk))
    res: dict[str, list[float]] = {}
    for _ in range(rounds):
        idle, _ = rate_while(None)
        res.setdefault("idle (iterations per ms)", []).append(idle)
        for flag, te in engines.items():
            def both(te=te) -> float:
                t = time.perf_counter()
                hs = te.save(save_ids, out_bufs)
                hl = te.load(in_bufs, load_ids)
                hs.wait()
                hl.wait()
                return (time.perf_counter() - t) * 1e3

            rate, times = rate_while(both)
            tag = "driver" if flag else "torch"
            res.setdefault(f"{tag}: neighbour share of idle", []).append(rate / idle)
            res.setdefault(f"{tag}: save+load ms", []).append(statistics.median(times))
    for k, v in res.items():
        print(f"{k:32s} median {statistics.median(v):8.3f}  (min {min(v):.3f}, max {max(v):.3f})", flush=True)


if __name__ == "__main__":
    main()
