"""Copy-engine throughput by DMA size: one buffer moved whole or as back-to-back pieces.

The engine moves a call's bytes as one DMA per chunk (MLA: 17.6 MiB, Llama-8B: 32 MiB) where
the raw baseline moves them as one; this measures what that split costs on its own. Per
direction and piece size: the whole 549 MiB (MLA 8K) in pieces on one stream, CUDA events
around all of them, 7 rounds with the sizes alternating; prints median GB/s and the ratio to
the single DMA of the same round.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/dma_size_probe.py [total MiB]
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import statistics
import sys

import torch

MIB = 1 << 20


def timed(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for dst, src in pairs:
        dst.copy_(src, non_blocking=True)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


def main() -> None:
    total = int(float(sys.argv[1]) * MIB) if len(sys.argv) > 1 else 549 * MIB
    dev = torch.device("cuda")
    gpu = torch.empty(total, dtype=torch.uint8, device=dev)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    sizes = [total, 64 * MIB, 32 * MIB, int(17.6 * MIB), 8 * MIB, 2 * MIB]
    print(f"{torch.cuda.get_device_name()}: {total / MIB:.0f} MiB per measurement", flush=True)
    for name, dst_all, src_all in (("d2h", host, gpu), ("h2d", gpu, host)):
        times: dict[int, list[float]] = {s: [] for s in sizes}
        ratios: dict[int, list[float]] = {s: [] for s in sizes}
        timed([(dst_all, src_all)])
        for rnd in range(7):
            order = sizes if rnd % 2 == 0 else sizes[::-1]
            got = {}
            for size in order:
                pairs = [(dst_all[a:a + size], src_all[a:a + size]) for a in range(0, total, size)]
                got[size] = timed(pairs)
            for size in sizes:
                times[size].append(got[size])
                ratios[size].append(got[total] / got[size])
        for size in sizes:
            t = statistics.median(times[size])
            print(f"  {name} pieces of {size / MIB:7.1f} MiB ({-(-total // size):4d} DMAs): "
                  f"{total / t / 1e9:6.2f} GB/s, vs one DMA {statistics.median(ratios[size]):.4f}", flush=True)


if __name__ == "__main__":
    main()
