"""Host cost of the rows plan's two launches (row table + gather), eager vs one CUDA graph replay.

The question (twelfth session's note): a save's first DMA waits for ~a dozen cold host steps,
two of them kernel launches at 73-117 us each in situ. Would replaying both launches as one
captured ``torch.cuda.CUDAGraph`` cost less on the cold path?

    python3 tests/gpu/graph_probe.py [rounds]

MLA-like shape (61 layers of [blocks, 64, 576] bf16 carved from one buffer, one 256-token chunk
= 4 blocks), the rows plan's ops as the transfer engine issues them: ``torch.add`` of the
per-layer offsets and the chunk's block ids into a row table, ``index_select`` of those rows into
a staging buffer, then (timed separately) the DMA into pinned memory. Conditions: ``cold`` = a
device sync, a 549 MiB raw D2H copy, a sync, then the ops (as each bench repetition starts);
``hot`` = the same ops again right after. Host microseconds from the first op's call to the
return of the last, medians over the rounds; kinds take turns.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    dev = torch.device("cuda")
    layers, blocks, bs, width = 61, 256, 64, 576
    cache = torch.randn(layers * blocks * bs * width, device=dev, dtype=torch.bfloat16)
    wide = cache.view(torch.int64).view(-1, 2)  # 16-byte rows
    rows_per_token = width * 2 // 16
    block_rows = bs * rows_per_token
    layer_rows = blocks * block_rows
    offsets = (torch.arange(layers, device=dev).view(layers, 1) * layer_rows
               + torch.arange(block_rows, device=dev).view(1, block_rows)).contiguous()  # [L, R]
    n = 4
    ids_host = torch.empty(n, dtype=torch.int64, pin_memory=True)
    ids_dev = torch.zeros(n, dtype=torch.int64, device=dev)
    staging = torch.empty(layers * n * block_rows, 2, dtype=torch.int64, device=dev)
    pinned = torch.empty_like(staging, device="cpu").pin_memory()
    raw_src = torch.empty(549 << 20, dtype=torch.uint8, device=dev)
    raw_dst = torch.empty(549 << 20, dtype=torch.uint8).pin_memory()
    stream = torch.cuda.Stream()

    def eager() -> None:
        rows = torch.add(offsets.view(layers, 1, block_rows), ids_dev.view(1, n, 1), alpha=block_rows)
        torch.index_select(wide, 0, rows.view(-1), out=staging)

    # capture both launches once (static ids, static out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        eager()
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=stream):
            eager()
    graph_dma = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph_dma, stream=stream):
        eager()
        pinned.copy_(staging, non_blocking=True)

    def kinds() -> dict[str, object]:
        def run_eager() -> None:
            with torch.cuda.stream(stream):
                ids_dev.copy_(ids_host, non_blocking=True)
                eager()

        def run_graph() -> None:
            with torch.cuda.stream(stream):
                ids_dev.copy_(ids_host, non_blocking=True)
                graph.replay()

        def run_eager_dma() -> None:
            with torch.cuda.stream(stream):
                ids_dev.copy_(ids_host, non_blocking=True)
                eager()
                pinned.copy_(staging, non_blocking=True)

        def run_graph_dma() -> None:
            with torch.cuda.stream(stream):
                ids_dev.copy_(ids_host, non_blocking=True)
                graph_dma.replay()

        return {"eager 2 launches": run_eager, "graph replay": run_graph,
                "eager + DMA": run_eager_dma, "graph (+DMA node)": run_graph_dma}

    fns = kinds()
    times: dict[str, dict[str, list[float]]] = {k: {"cold": [], "hot": []} for k in fns}
    gen = torch.Generator().manual_seed(0)
    for r in range(rounds + 2):
        order = list(fns.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            ids_host.copy_(torch.randperm(blocks, generator=gen)[:n])
            torch.cuda.synchronize()
            raw_dst.copy_(raw_src, non_blocking=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()  # type: ignore[operator]
            t1 = time.perf_counter()
            fn()  # type: ignore[operator]
            t2 = time.perf_counter()
            torch.cuda.synchronize()
            if r >= 2:
                times[name]["cold"].append((t1 - t0) * 1e6)
                times[name]["hot"].append((t2 - t1) * 1e6)
    # correctness: the graph gathered what eager gathers
    ids_host.copy_(torch.tensor([3, 7, 11, 200]))
    fns["eager 2 launches"]()  # type: ignore[operator]
    torch.cuda.synchronize()
    ref = staging.clone()
    staging.zero_()
    fns["graph replay"]()  # type: ignore[operator]
    torch.cuda.synchronize()
    same = torch.equal(ref, staging)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  rounds {rounds}  graph == eager: {same}")
    print(f"{'kind':22s} {'cold med':>9s} {'cold p90':>9s} {'hot med':>8s}  (host us, incl. the ids upload)")
    for name, t in times.items():
        cold = sorted(t["cold"])
        print(f"{name:22s} {statistics.median(cold):9.1f} {cold[int(len(cold) * 0.9) - 1]:9.1f} "
              f"{statistics.median(t['hot']):8.1f}")


if __name__ == "__main__":
    main()
