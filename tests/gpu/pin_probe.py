"""DMA throughput by kind of pinned host memory: does the page size behind it matter?

The raw baseline copies into ``torch.empty(pin_memory=True)`` (cudaHostAlloc through the caching
host allocator); the pool registers one pageable buffer with ``cudaHostRegister``. Both are
page-locked, but the pages behind them may differ in size (4 KiB or 2 MiB transparent huge
pages), which the GPU's DMA engine and the IOMMU see. Per kind of memory and direction: the
whole buffer (MLA 8K: 549 MiB) as one DMA, and as back-to-back pieces of one MLA chunk
(17.6 MiB, what the engine issues), CUDA events around all of them, rounds with the kinds
taking turns; prints median GB/s and the ratio to ``pin_memory`` of the same round.

Kinds: ``pin`` (pin_memory=True), ``reg`` (torch.empty + cudaHostRegister, the pool's way),
``reg_thp`` (anonymous mmap with madvise(MADV_HUGEPAGE), touched, then registered),
``reg_nothp`` (the same with MADV_NOHUGEPAGE).

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/pin_probe.py [total MiB] [rounds]
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import mmap
import statistics
import sys
from pathlib import Path

import torch
from dma_size_probe import timed  # same CUDA-event timing of back-to-back copies

MIB = 1 << 20
PIECE = 17_989_632  # one MLA chunk payload: 256 tokens x 61 layers x 576 x bf16


def anon_hugepages_kib() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def registered(buf: torch.Tensor) -> torch.Tensor:
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.numel(), 0)
    assert int(err) == 0, f"cudaHostRegister failed: {int(err)}"
    return buf


def mapped(total: int, advice: int, keep: list) -> torch.Tensor:
    align = 2 * MIB
    mm = mmap.mmap(-1, total + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(advice)
    keep.append(mm)
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    off = (-whole.data_ptr()) % align
    buf = whole[off:off + total]
    before = anon_hugepages_kib()
    buf.fill_(1)  # first touch: the kernel picks the page size here
    print(f"  mmap advice {advice}: AnonHugePages +{(anon_hugepages_kib() - before) / 1024:.0f} MiB", flush=True)
    return registered(buf)


def main() -> None:
    total = int(float(sys.argv[1]) * MIB) if len(sys.argv) > 1 else 549 * MIB
    total -= total % PIECE
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 9
    for f in ("enabled", "defrag"):
        p = Path("/sys/kernel/mm/transparent_hugepage") / f
        print(f"THP {f}: {p.read_text().strip() if p.exists() else '?'}")
    print(f"{torch.cuda.get_device_name()}: {total / MIB:.0f} MiB per measurement, {rounds} rounds", flush=True)
    gpu = torch.empty(total, dtype=torch.uint8, device="cuda")
    keep: list = []
    before = anon_hugepages_kib()
    reg = torch.empty(total, dtype=torch.uint8)
    reg.fill_(1)
    print(f"  torch.empty: AnonHugePages +{(anon_hugepages_kib() - before) / 1024:.0f} MiB", flush=True)
    kinds = {
        "pin": torch.empty(total, dtype=torch.uint8, pin_memory=True),
        "reg": registered(reg),
        "reg_thp": mapped(total, mmap.MADV_HUGEPAGE, keep),
        "reg_nothp": mapped(total, mmap.MADV_NOHUGEPAGE, keep),
    }
    cases = [(kind, d, piece) for kind in kinds for d in ("d2h", "h2d") for piece in (total, PIECE)]
    times: dict[tuple, list[float]] = {c: [] for c in cases}
    for c in cases:  # warm every path once
        host = kinds[c[0]]
        timed([(host, gpu)] if c[1] == "d2h" else [(gpu, host)])
    for rnd in range(rounds):
        for c in (cases if rnd % 2 == 0 else cases[::-1]):
            kind, d, piece = c
            host = kinds[kind]
            spans = range(0, total, piece)
            pairs = ([(host[a:a + piece], gpu[a:a + piece]) for a in spans] if d == "d2h"
                     else [(gpu[a:a + piece], host[a:a + piece]) for a in spans])
            times[c].append(timed(pairs))
    for d in ("d2h", "h2d"):
        for piece in (total, PIECE):
            base = times[("pin", d, piece)]
            for kind in kinds:
                t = times[(kind, d, piece)]
                ratio = statistics.median(b / x for b, x in zip(base, t, strict=True))
                print(f"  {d} {kind:9s} {'one DMA' if piece == total else 'per chunk':9s}: "
                      f"{total / statistics.median(t) / 1e9:6.2f} GB/s (min {total / max(t) / 1e9:6.2f}, "
                      f"max {total / min(t) / 1e9:6.2f}), vs pin {ratio:.4f}", flush=True)


if __name__ == "__main__":
    main()
