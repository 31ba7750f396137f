"""Measurements behind ``kvortex bench transfer`` (torch is imported by the caller's process).

Every figure is a ratio against a raw baseline of the same bytes in the same process:
raw = one contiguous ``copy_`` between a device buffer and a pinned host buffer.
"""

from __future__ import annotations

import gc
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvortex_core.cli.bench.common import Measurement, ratio, ratio_spread

__all__ = ["ratio"]
from kvortex_core.data import kv_samples as ks
from kvortex_core.data.layouts import KVLayout, detect_layout
from kvortex_core.data.transfer import TransferEngine


@dataclass(frozen=True)
class Shape:
    """A model's per-rank KV shape."""

    name: str
    layers: int
    heads: int
    head: int
    block: int
    mla: bool = False

    @property
    def bytes_per_token(self) -> int:
        return self.layers * (1 if self.mla else 2) * self.heads * self.head * 2  # bf16


LLAMA_8B = Shape("llama-3.1-8b", 32, 8, 128, 16)
DEEPSEEK_V3 = Shape("deepseek-v3-mla", 61, 1, 576, 64, mla=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> list[float]:
    """Seconds per run, the device drained before and after each run."""
    settle()
    for _ in range(warmup):
        fn()
    return [once(fn, device) for _ in range(reps)]


def settle() -> None:
    """Collect the garbage of earlier cases before a timed loop, outside the timing.

    A collection in a torch process took 0.3-1.0 s on the H100 VMs (it also frees whatever
    pinned buffers and closed engines the earlier cases left in reference cycles:
    ``tests/gpu/gc_probe.py``); left to run inside a timed repetition it turned that pair's
    ratio into 0.01-0.19. The collector stays on during the timing.
    """
    gc.collect()


def pinned(nbytes: int, device: torch.device) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")


def make_caches(shape: Shape, num_blocks: int, device: torch.device, unified: bool = False) -> list[torch.Tensor]:
    """Random bf16 KV: separate per-layer tensors (vLLM < 0.30, FlashAttention NHD / MLA), or
    ``unified``: per-layer ``[B, H, N, C]`` views of one LBNHC buffer (vLLM 0.30+ default)."""
    gen = torch.Generator(device=device).manual_seed(0)
    if unified:
        c = shape.head * (1 if shape.mla else 2)
        buf = torch.randn((shape.layers, num_blocks, shape.block, shape.heads, c), generator=gen,
                          device=device, dtype=torch.bfloat16)
        return [buf[i].transpose(1, 2) for i in range(shape.layers)]
    if shape.mla:
        dims: tuple[int, ...] = (num_blocks, shape.block, shape.head)
    else:
        dims = (2, num_blocks, shape.block, shape.heads, shape.head)
    return [torch.randn(dims, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(shape.layers)]


def random_chunks(num_blocks: int, tokens: int, block: int, chunk_tokens: int, seed: int) -> list[list[int]]:
    """Shuffled block ids for ``tokens`` tokens, grouped per chunk."""
    ids = random.Random(seed).sample(range(num_blocks), tokens // block)
    per = chunk_tokens // block
    return [ids[i:i + per] for i in range(0, len(ids), per)]


class RawCopier:
    """The baseline: one contiguous ``copy_`` of ``nbytes`` between a device and a pinned buffer."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.nbytes, self.device = nbytes, device
        self.gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.host = pinned(nbytes, device)
        self._gpu2: torch.Tensor | None = None
        self._host2: torch.Tensor | None = None
        self._streams: Any = None

    def d2h(self) -> None:
        self.host.copy_(self.gpu, non_blocking=True)

    def h2d(self) -> None:
        self.gpu.copy_(self.host, non_blocking=True)

    def both(self) -> None:
        """A copy each way at once, on two streams (CUDA only)."""
        if self._streams is None:
            self._gpu2 = torch.empty_like(self.gpu)
            self._host2 = pinned(self.nbytes, self.device)
            self._streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        s1, s2 = self._streams
        with torch.cuda.stream(s1):
            self.host.copy_(self.gpu, non_blocking=True)
        with torch.cuda.stream(s2):
            self._gpu2.copy_(self._host2, non_blocking=True)  # type: ignore[union-attr]


def once(fn: Callable[[], Any], device: torch.device, *, complete: bool = False) -> float:
    """Seconds of one run, the device drained before and after.

    ``complete``: ``fn`` returns only once its copies completed (a KVortex call that waits):
    the clock stops at its return and the drain after it is not timed. A device sync on an
    idle GPU still costs 60-80 us of host time on the H100 VMs measured (the call is cold),
    which a raw copy's sync hides behind its own copy. Without it the clock stops when the
    sync returns: that is how a raw copy learns it completed.
    """
    sync(device)
    t0 = time.perf_counter()
    fn()
    if complete:
        t1 = time.perf_counter()
        sync(device)
        return t1 - t0
    sync(device)
    return time.perf_counter() - t0


def paired(ours: Callable[[], Any], raw: Callable[[], Any], device: torch.device, reps: int,
           warmup: int = 1, *, complete: bool = False) -> tuple[list[float], list[float]]:
    """Seconds of ``ours`` and of ``raw`` per repetition, run back to back (order alternating).

    Each pair sees the same state of the machine (other tenants on the PCIe switch, host
    memory traffic), so the ratio of a pair is steadier than a ratio of separate medians.
    ``complete``: ``ours`` returns only once its copies completed (see :func:`once`).
    """
    settle()
    for _ in range(warmup):
        ours()
        raw()
    ours_s, raw_s = [], []
    for i in range(reps):
        if i % 2:
            raw_s.append(once(raw, device))
            ours_s.append(once(ours, device, complete=complete))
        else:
            ours_s.append(once(ours, device, complete=complete))
            raw_s.append(once(raw, device))
    return ours_s, raw_s


def raw_copy(nbytes: int, device: torch.device, reps: int) -> dict[str, Measurement]:
    """The baseline alone: one contiguous copy of ``nbytes`` each way, and both ways at once."""
    raw = RawCopier(nbytes, device)
    out = {
        "d2h": Measurement("raw d2h", timed(raw.d2h, device, reps), nbytes),
        "h2d": Measurement("raw h2d", timed(raw.h2d, device, reps), nbytes),
    }
    if device.type == "cuda":
        out["bidir"] = Measurement("raw both", timed(raw.both, device, reps), 2 * nbytes)
    return out


def transfer_engine_case(shape: Shape, tokens: int, caches: list[torch.Tensor], layout: KVLayout,
                         chunk_tokens: int, staging: int, streams: int, reps: int,
                         gather: str = "auto") -> dict[str, Measurement]:
    """The TransferEngine alone: shuffled blocks <-> one pinned buffer per chunk."""
    device = caches[0].device
    te = TransferEngine(caches, layout, chunk_tokens=chunk_tokens, staging_bytes=staging, num_streams=streams,
                        gather=gather)
    chunks = random_chunks(layout.num_blocks, tokens, shape.block, chunk_tokens, tokens)
    nbytes = layout.chunk_bytes(tokens)
    slots = pinned(layout.chunk_bytes(chunk_tokens) * len(chunks), device)
    dst = list(slots.split(layout.chunk_bytes(chunk_tokens)))
    load_ids = random_chunks(layout.num_blocks, tokens, shape.block, chunk_tokens, tokens + 1)
    te.save(chunks, dst).wait()
    sync(device)
    t0 = time.perf_counter()
    handle = te.save(chunks, dst)
    t1 = time.perf_counter()
    handle.wait()
    enqueue = {"save_enqueue_s": t1 - t0, "save_total_s": time.perf_counter() - t0}
    raw = RawCopier(nbytes, device)
    save_s, raw_d2h = paired(lambda: te.save(chunks, dst).wait(), raw.d2h, device, reps, complete=True)
    load_s, raw_h2d = paired(lambda: te.load(dst, load_ids).wait(), raw.h2d, device, reps, complete=True)
    return {
        "diag": enqueue,  # type: ignore[dict-item]
        "save": Measurement("te save", save_s, nbytes),
        "load": Measurement("te load", load_s, nbytes),
        "raw_save": Measurement("raw d2h (paired)", raw_d2h, nbytes),
        "raw_load": Measurement("raw h2d (paired)", raw_h2d, nbytes),
    }


def verify_layouts(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, bool]:
    """Byte-exact: save from every layout, load into a zeroed twin and into FlashAttention NHD."""
    L, B, N, H, D, chunk = 4, 64, 16, 2, 64, 64
    results: dict[str, bool] = {}
    layouts = ks.all_layouts(L, B, N, H, D, dtype, seed=7, device=str(device))
    ref_src, _, ref_block = ks.flash_attn(L, B, N, H, D, dtype, seed=7, device=str(device))
    chunks = random_chunks(B, 3 * chunk, N, chunk, 1)
    new = random_chunks(B, 3 * chunk, N, chunk, 2)
    for name, (caches, hints, block) in layouts.items():
        layout = detect_layout(caches, hints)
        te = TransferEngine(caches, layout, chunk_tokens=chunk, staging_bytes=40_000)
        bufs = [pinned(layout.chunk_bytes(chunk), device) for _ in chunks]
        te.save(chunks, bufs).wait()
        twin, _, tblock = ks.all_layouts(L, B, N, H, D, dtype, seed=7, device=str(device))[name]
        for t in _tensors(twin):
            t.view(torch.uint8).zero_()
        te2 = TransferEngine(twin, detect_layout(twin, hints), chunk_tokens=chunk, staging_bytes=40_000)
        te2.load(bufs, new, layerwise=True).wait()
        ok = all(
            torch.equal(tblock(twin, layer, n), block(caches, layer, o))
            for ids, nids in zip(chunks, new, strict=True)
            for o, n in zip(ids, nids, strict=True)
            for layer in range(L)
        )
        results[name] = ok
    # cross-layout: NHD payloads into every non-MLA layout
    te = TransferEngine(ref_src, detect_layout(ref_src), chunk_tokens=chunk)
    bufs = [pinned(te.layout.chunk_bytes(chunk), device) for _ in chunks]
    te.save(chunks, bufs).wait()
    for name, (twin, hints, tblock) in ks.all_layouts(L, B, N, H, D, dtype, seed=8, device=str(device)).items():
        if "mla" in name:
            continue
        TransferEngine(twin, detect_layout(twin, hints), chunk_tokens=chunk).load(bufs, new).wait()
        results[f"nhd->{name}"] = all(
            torch.equal(tblock(twin, layer, n), ref_block(ref_src, layer, o))
            for ids, nids in zip(chunks, new, strict=True)
            for o, n in zip(ids, nids, strict=True)
            for layer in range(L)
        )
    return results


def _tensors(caches: Any) -> list[torch.Tensor]:
    if isinstance(caches, torch.Tensor):
        return [caches]
    return list(caches.values()) if isinstance(caches, dict) else list(caches)


def matmul_slowdown(device: torch.device, background: Callable[[], None], iters: int = 200,
                    size: int = 4096) -> dict[str, float]:
    """Time a bf16 matmul loop alone, then while ``background`` runs in a loop on another thread."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)

    def loop() -> float:
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        return time.perf_counter() - t0

    loop()
    alone = min(loop() for _ in range(3))
    stop = threading.Event()

    def run_bg() -> None:
        while not stop.is_set():
            background()

    thread = threading.Thread(target=run_bg, daemon=True)
    thread.start()
    time.sleep(0.05)
    try:
        busy = min(loop() for _ in range(3))
    finally:
        stop.set()
        thread.join()
    return {"alone_s": alone, "with_transfers_s": busy, "slowdown": busy / alone - 1.0}


def summary_row(label: str, ours: Measurement, raw: Measurement) -> dict[str, Any]:
    """GB/s medians and the ratio: the median of per-pair ratios when ``raw`` was paired with ``ours``."""
    row = {
        "case": label,
        "bytes": ours.nbytes,
        "ours_gbps": ours.gbps()["median"],
        "raw_gbps": raw.gbps()["median"],
        "ratio": ratio(ours, raw),
    }
    if "paired" in raw.name and len(raw.seconds) == len(ours.seconds):
        spread_ = ratio_spread(ours.seconds, raw.seconds)  # raw time / our time, per pair
        row.update(ratio=spread_["median"], ratio_min=spread_["min"], ratio_max=spread_["max"], paired=True)
    return row
