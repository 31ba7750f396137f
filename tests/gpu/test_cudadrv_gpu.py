"""The transfer path's driver calls (data/cudadrv.py: event records, stream waits and DMAs through
libcuda, keeping the GIL): used where safe, byte-exact, ordered like torch's, off when asked.

Skipped cleanly without a CUDA device (marker ``gpu``, see tests/conftest.py).
"""

from __future__ import annotations

import threading

import pytest
import torch

from kvortex_core import KVortexConfig, KVortexEngine
from kvortex_core.data import cudadrv
from kvortex_core.data import kv_samples as ks
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.transfer import TransferEngine

pytestmark = pytest.mark.gpu

L, B, N, H, D, CHUNK = 4, 64, 16, 2, 64, 64


def _pinned(layout, n: int) -> list[torch.Tensor]:
    return [torch.zeros(layout.chunk_bytes(CHUNK), dtype=torch.uint8).pin_memory() for _ in range(n)]


def _reference(caches, hints, ids: list[list[int]], bufs: list[torch.Tensor]) -> list[torch.Tensor]:
    cpu = [c.cpu() for c in caches] if isinstance(caches, list) else caches.cpu()
    te = TransferEngine(cpu, detect_layout(cpu, hints), chunk_tokens=CHUNK)
    want = [torch.zeros(b.numel(), dtype=torch.uint8) for b in bufs]
    te.save(ids, want).wait()
    return want


def test_the_transfer_engine_uses_driver_calls_unless_told_not_to() -> None:
    caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16, device="cuda")
    on = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK)
    off = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, driver_calls=False)
    assert cudadrv.driver() is not None
    assert on._save.streams.drv is not None and on._load.streams.drv is not None
    assert off._save.streams.drv is None and off._load.streams.drv is None
    cudadrv.set_enabled(False)
    try:
        assert cudadrv.driver() is None
        assert TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK)._save.streams.drv is None
    finally:
        cudadrv.set_enabled(True)
    engine = KVortexEngine.create(KVortexConfig(chunk_tokens=CHUNK, transfer={"driver_calls": False}))
    engine.register_kv_caches(caches)
    assert engine._registered().transfer._save.streams.drv is None
    engine.close()


@pytest.mark.parametrize("driver_calls", [True, False], ids=["driver", "torch"])
@pytest.mark.parametrize("name", ["flash_attn_nhd", "mla", "unified_LBNHC"])
def test_roundtrip_is_byte_exact_and_ordered_after_the_callers_writes(name: str, driver_calls: bool) -> None:
    """Save right after writes the caller enqueued behind ~0.1 s of GPU work (no host sync), then
    load into other blocks while the caller's stream is still busy: both byte-exact."""
    built = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=5, device="cuda")
    caches, hints, _ = built[name]
    layout = detect_layout(caches, hints)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=100_000, driver_calls=driver_calls)
    te.save([[0, 1]], _pinned(layout, 1)).wait()  # warm
    tensors = caches if isinstance(caches, list) else [caches]
    torch.cuda._sleep(200_000_000)
    for t in tensors:
        t.view(torch.uint8).add_(1)  # every block changes, after the sleep
    ids = [[3, 50, 7, 9], [60, 1, 2, 33], [10, 11]]
    bufs = _pinned(layout, len(ids))
    te.save(ids, bufs).wait(timeout=60)
    want = _reference(caches, hints, ids, bufs)
    assert all(torch.equal(a, b) for a, b in zip(bufs, want, strict=True))
    new_ids = [[40, 41, 42, 43], [44, 45, 46, 47], [48, 49]]
    torch.cuda._sleep(200_000_000)  # the load must not write before this reader is done
    te.load(bufs, new_ids).wait(timeout=60)
    back = [torch.zeros_like(b) for b in bufs]
    te.save(new_ids, back).wait(timeout=60)
    assert all(torch.equal(a, b) for a, b in zip(back, want, strict=True))


def test_pageable_host_buffers_go_through_torch_and_stay_byte_exact() -> None:
    """A DMA to pageable memory blocks the host until done: never through the driver (it would
    hold the GIL all that time); torch does it, same bytes."""
    caches, hints, _ = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=6, device="cuda")["flash_attn_nhd"]
    layout = detect_layout(caches, hints)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=100_000)
    drv = te._save.streams.drv
    assert drv is not None
    ids = [[3, 4, 5, 6], [8, 9]]
    pageable = [torch.zeros(layout.chunk_bytes(CHUNK), dtype=torch.uint8) for _ in ids]
    assert not drv.pinned(pageable[0]) and drv.pinned(_pinned(layout, 1)[0])
    te.save(ids, pageable).wait(timeout=30)
    assert all(torch.equal(a, b) for a, b in zip(pageable, _reference(caches, hints, ids, pageable), strict=True))
    target = [torch.zeros_like(c) for c in caches]
    te2 = TransferEngine(target, detect_layout(target, hints), chunk_tokens=CHUNK)
    te2.load(pageable, [[20, 21, 22, 23], [24, 25]]).wait(timeout=30)
    torch.cuda.synchronize()
    for t, c in zip(target, caches, strict=True):
        assert torch.equal(t[:, 20:24], c[:, 3:7]) and torch.equal(t[:, 24:26], c[:, 8:10])


def test_a_thread_that_never_touched_cuda_saves_and_loads_byte_exact() -> None:
    """A fresh thread may have no current CUDA context when it first calls the driver: the
    calls then go through torch (which sets the device) or find the context, never fail."""
    caches, hints, _ = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=8, device="cuda")["flash_attn_nhd"]
    layout = detect_layout(caches, hints)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=100_000)
    ids = [[12, 13, 14, 15]]
    bufs = _pinned(layout, 1)
    errors: list[BaseException] = []

    def fresh() -> None:
        try:
            te.save(ids, bufs, inline=True).wait(timeout=30)
            te.load(bufs, [[30, 31, 32, 33]], inline=True).wait(timeout=30)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    th = threading.Thread(target=fresh)
    th.start()
    th.join()
    torch.cuda.synchronize()
    assert not errors
    assert torch.equal(bufs[0], _reference(caches, hints, ids, bufs)[0])
    for c in caches:
        assert torch.equal(c[:, 30:34], c[:, 12:16])
