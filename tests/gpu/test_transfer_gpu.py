"""The transfer engine on CUDA: byte-exact for every layout, stream ordering, events, layer-wise.

Skipped cleanly without a CUDA device (marker ``gpu``, see tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from kvortex_core.data import kv_samples as ks
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.transfer import TransferEngine

pytestmark = pytest.mark.gpu

L, B, N, H, D, CHUNK = 4, 64, 16, 2, 64, 64


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (fp8 random bytes include NaNs, which never compare equal)."""
    if a.element_size() == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def _pinned(layout, n: int) -> list[torch.Tensor]:
    return [torch.zeros(layout.chunk_bytes(CHUNK), dtype=torch.uint8).pin_memory() for _ in range(n)]


@pytest.mark.parametrize("name", sorted(ks.all_layouts(2, 4, 16, 1, 8, torch.bfloat16)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_roundtrip_every_layout_on_cuda(name: str, dtype: torch.dtype) -> None:
    caches, hints, block = ks.all_layouts(L, B, N, H, D, dtype, seed=1, device="cuda")[name]
    layout = detect_layout(caches, hints)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=100_000)
    chunks = [[3, 50, 7, 9], [60, 1, 2, 33], [10, 11]]
    bufs = _pinned(layout, len(chunks))
    te.save(chunks, bufs).wait()
    cpu_caches = ks.all_layouts(L, B, N, H, D, dtype, seed=1, device="cpu")[name][0]
    cpu_te = TransferEngine(cpu_caches, detect_layout(cpu_caches, hints), chunk_tokens=CHUNK)
    cpu_bufs = [torch.zeros_like(b) for b in bufs]
    cpu_te.save(chunks, cpu_bufs).wait()
    assert all(torch.equal(a, b) for a, b in zip(bufs, cpu_bufs, strict=True))
    twin, _, tblock = ks.all_layouts(L, B, N, H, D, dtype, seed=2, device="cuda")[name]
    te2 = TransferEngine(twin, detect_layout(twin, hints), chunk_tokens=CHUNK, staging_bytes=100_000)
    new = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    te2.load(bufs, new, layerwise=True).wait()
    for ids, nids in zip(chunks, new, strict=True):
        for o, n in zip(ids, nids, strict=True):
            assert all(_same(tblock(twin, layer, n), block(caches, layer, o)) for layer in range(L))


def test_save_is_ordered_after_compute_stream_work() -> None:
    caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.float16, device="cuda")
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK)
    bufs = _pinned(te.layout, 1)
    # enqueue a slow kernel chain then a write the save must observe, without syncing
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):
        x = x @ x / 2048
    for c in caches:
        c[:, 5].fill_(3.0)
    te.save([[5, 6, 7, 8]], bufs).wait()
    first_block = bufs[0].view(torch.float16).view(te.layout.chunk_payload_shape(CHUNK))[:, :, :N]
    assert bool((first_block == 3.0).all())


def test_layerwise_wait_layer_orders_current_stream() -> None:
    caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.float16, device="cuda")
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, staging_bytes=40_000)
    bufs = _pinned(te.layout, 2)
    te.save([[1, 2, 3, 4], [5, 6, 7, 8]], bufs).wait()
    target = [torch.zeros_like(c) for c in caches]
    te2 = TransferEngine(target, detect_layout(target), chunk_tokens=CHUNK, staging_bytes=40_000)
    handle = te2.load(bufs, [[9, 10, 11, 12], [13, 14, 15, 16]], layerwise=True)
    sums = []
    for layer in range(L):
        handle.wait_layer(layer)  # GPU-side wait: the read below sees the loaded layer
        sums.append(target[layer][:, 9:17].float().sum())
    handle.wait()
    expected = [c[:, 1:9].float().sum() for c in caches]
    assert all(torch.equal(a, b) for a, b in zip(sums, expected, strict=True))
    assert handle.done()


def test_many_concurrent_handles_do_not_corrupt_staging() -> None:
    caches, _, _ = ks.cross_layer(L, B, N, H, D, torch.bfloat16, device="cuda")
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, staging_bytes=30_000)
    rounds = [[[b, b + 1, b + 2, b + 3]] for b in range(0, 60, 4)]
    bufs = [_pinned(te.layout, 1) for _ in rounds]
    handles = [te.save(ids, buf) for ids, buf in zip(rounds, bufs, strict=True)]
    for h in handles:
        h.wait(timeout=30)
    for ids, buf in zip(rounds, bufs, strict=True):
        payload = buf[0].view(torch.bfloat16).view(te.layout.chunk_payload_shape(CHUNK))
        b0 = ids[0][0]
        ref = caches[b0:b0 + 4].permute(1, 2, 0, 3, 4, 5).reshape(L, 2, CHUNK, H, D)
        assert torch.equal(payload.cpu(), ref.cpu())


@pytest.mark.parametrize("gather", ["strided", "rows"])
def test_loads_past_the_arena_take_regions_of_their_own_without_blocking(gather: str) -> None:
    """With every arena region lent and the kernel stream busy, loads lend regions past the arena
    (their own pinned ids and device twin): the host does not block, both land byte-exact, and
    each region is dropped once its load completed. Ids longer than a region go the same way."""
    caches, _, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=3, device="cuda")
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, staging_bytes=100_000, gather=gather)
    chunks = [[3, 50, 7, 9], [60, 1, 2, 33]]
    bufs = _pinned(te.layout, len(chunks))
    te.save(chunks, bufs).wait()
    twin, _, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=4, device="cuda")
    te2 = TransferEngine(twin, detect_layout(twin), chunk_tokens=CHUNK, staging_bytes=100_000, gather=gather)
    te2.load(bufs, [[0, 1, 2, 3], [4, 5, 6, 7]], inline=True).wait()  # buffers allocated
    arena = te2._load.arena
    assert arena is not None
    lent = [arena._free.pop() for _ in range(len(arena._free))]  # no region free
    with torch.cuda.stream(te2._load.kernel_stream):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time ahead of the loads' uploads and scatters
    h1 = te2.load(bufs, [[10, 11, 12, 13], [14, 15, 16, 17]], inline=True)
    h2 = te2.load(bufs, [[20, 21, 22, 23], [24, 25, 26, 27]], inline=True)  # must not block
    assert not h1.done() and len(arena._overflow) == 2
    h1.wait()
    h2.wait()
    assert not arena._overflow and not arena._free  # dropped; the arena's own regions still lent
    arena._free.extend(lent)  # the regions taken above
    for dst in ([10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22, 23, 24, 25, 26, 27]):
        src = [b for ids in chunks for b in ids]
        assert all(torch.equal(block(twin, layer, d), block(caches, layer, s))
                   for s, d in zip(src, dst, strict=True) for layer in range(L))
    arena.capacity = 4  # fewer ids than the next load's 8: a region past the arena too
    te2.load(bufs, [[30, 31, 32, 33], [34, 35, 36, 37]], inline=True).wait()
    assert not arena._overflow and len(arena._free) == len(lent)
    assert all(torch.equal(block(twin, layer, d), block(caches, layer, s)) for layer in range(L)
               for s, d in zip([b for ids in chunks for b in ids], range(30, 38), strict=True))


def test_completed_handles_hand_their_events_back_and_reuse_is_byte_exact() -> None:
    """Events of a finished transfer are re-recorded by later ones; the finished handle stays done
    and every later transfer still moves the right bytes (a reused event never under-waits)."""
    caches, _, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=3, device="cuda")
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, staging_bytes=100_000)
    chunks = [[3, 50, 7, 9], [60, 1, 2, 33], [10, 11]]
    bufs = _pinned(te.layout, len(chunks))
    first = te.save(chunks, bufs)
    first.wait()
    used = {id(e) for e in te._save.streams._spare}
    assert used, "a completed save gave no events back"
    assert first.done() and first.done_event is None
    for round_ in range(5):  # saves then loads into other blocks, reusing the same events
        caches[0].mul_(1)  # compute-stream work the next save is ordered after
        h = te.save(chunks, bufs)
        assert {id(e) for e in h.other_events} & used or round_ > 0
        h.wait()
        new = [[20, 21, 22, 23], [24, 25, 26, 27], [28, 29]]
        for t in caches:  # the last round's copies gone (on the compute stream: the load follows it)
            t[:, 20:30].zero_()
        te.load(bufs, new).wait()
        for ids, nids in zip(chunks, new, strict=True):
            for o, n in zip(ids, nids, strict=True):
                assert all(_same(block(caches, layer, n), block(caches, layer, o)) for layer in range(L))
    assert first.done()
    first.wait(timeout=1.0)  # a retired handle returns at once


@pytest.mark.parametrize("name", sorted(ks.all_layouts(2, 4, 16, 1, 8, torch.bfloat16)))
@pytest.mark.parametrize("gather", ["strided", "rows", "layers"])
def test_every_gather_mode_on_cuda_matches_the_cpu_payload(name: str, gather: str) -> None:
    caches, hints, block = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=3, device="cuda")[name]
    layout = detect_layout(caches, hints)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=100_000, gather=gather)
    assert te.gather_mode == gather
    chunks = [[3, 50, 7, 9], [60, 1, 2, 33], [10, 11]]
    bufs = _pinned(layout, len(chunks))
    te.save(chunks, bufs).wait()
    cpu_caches = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=3, device="cpu")[name][0]
    cpu_te = TransferEngine(cpu_caches, detect_layout(cpu_caches, hints), chunk_tokens=CHUNK, gather="layers")
    cpu_bufs = [torch.zeros_like(b) for b in bufs]
    cpu_te.save(chunks, cpu_bufs).wait()
    assert all(torch.equal(a, b) for a, b in zip(bufs, cpu_bufs, strict=True))
    twin, _, tblock = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=4, device="cuda")[name]
    te2 = TransferEngine(twin, detect_layout(twin, hints), chunk_tokens=CHUNK, staging_bytes=100_000,
                         gather=gather)
    te2.load(bufs, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], skip_blocks=2).wait()
    for o, n in zip([7, 9, 60, 1, 2, 33, 10, 11], [2, 3, 4, 5, 6, 7, 8, 9], strict=True):
        assert all(torch.equal(tblock(twin, layer, n), block(caches, layer, o)) for layer in range(L))


def test_ids_read_in_place_return_their_region_and_overflow_to_uploads() -> None:
    """More transfers in flight than the arena has regions: the rest lend regions past the arena; every
    region comes back (or is dropped) once its transfer completed; all bytes exact."""
    caches, _, block = ks.cross_layer(L, B, N, H, D, torch.bfloat16, seed=5, device="cuda")
    layout = detect_layout(caches)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=100_000, gather="strided")
    arena = te._save.arena
    assert arena is not None
    regions = len(arena._free)
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(10):  # keep the device busy so the saves below stay in flight
        x = x @ x / 4096
    jobs = []
    for i in range(regions + 6):
        chunks = [[(i + k) % B for k in range(4)], [(2 * i + 1) % B]]
        bufs = _pinned(layout, 2)
        jobs.append((te.save(chunks, bufs, inline=True), chunks, bufs))
    assert len(arena._free) == 0 and len(arena._overflow) == 6  # every region lent, six past the arena
    for handle, chunks, bufs in jobs:
        handle.wait()
        for ids, buf in zip(chunks, bufs, strict=True):
            n = layout.chunk_bytes(len(ids) * N) // 2  # a short chunk's payload is compact
            payload = buf.view(torch.bfloat16)[:n].view(layout.chunk_payload_shape(len(ids) * N))
            want = torch.stack([torch.cat([block(caches, layer, b) for b in ids], dim=1) for layer in range(L)])
            assert torch.equal(payload.cpu(), want.cpu())
    assert len(arena._free) == regions and not arena._overflow
    # loads: the ones past the arena scatter from their own regions
    twin, _, tblock = ks.cross_layer(L, B, N, H, D, torch.bfloat16, seed=6, device="cuda")
    te2 = TransferEngine(twin, detect_layout(twin), chunk_tokens=CHUNK, staging_bytes=100_000, gather="strided")
    for _ in range(10):
        x = x @ x / 4096
    loads = []
    for i, (_, chunks, bufs) in enumerate(jobs):
        dst = [[(5 * i + k) % B for k in range(4)], [(5 * i + 4) % B]]
        loads.append((te2.load(bufs, dst, inline=True), chunks, dst))
        if i % 8 == 7:  # a few land in between (their regions come back), most stay in flight
            loads[-1][0].wait()
    for handle, _, _ in loads:
        handle.wait()
    handle, chunks, dst = loads[-1]  # later loads overwrite earlier destinations: check the last
    for src_ids, dst_ids in zip(chunks, dst, strict=True):
        for o, n in zip(src_ids, dst_ids, strict=True):
            assert all(torch.equal(tblock(twin, layer, n), block(caches, layer, o)) for layer in range(L))
    assert len(te2._load.arena._free) == len(arena._free)


@pytest.mark.parametrize("gather", ["strided", "rows"])
def test_a_save_does_not_queue_behind_a_concurrent_loads_gated_copies(gather: str) -> None:
    """A save finishes while a concurrent load's host-to-device copy still waits on an event (as a
    load's DMAs wait for a staging half), byte-exact. (In the engine, saves beside loads started
    late while ids went up by DMA; this isolated case did not reproduce that, see data/ids.py.)"""
    caches, _, block = ks.cross_layer(L, B, N, H, D, torch.bfloat16, seed=7, device="cuda")
    layout = detect_layout(caches)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=100_000, gather=gather)
    te.save([[0, 1]], _pinned(layout, 1)).wait()  # kernels loaded, buffers made
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):  # ~100+ ms of work the load's copy waits for
        x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        for _ in range(600):
            x = x @ x / 64
        gate = torch.cuda.Event()
        gate.record()
    host = torch.empty(1 << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    load_dma = te._load.streams.first  # where a concurrent load queues its host-to-device DMAs
    with torch.cuda.stream(load_dma):
        load_dma.wait_event(gate)
        dev.copy_(host, non_blocking=True)
        busy = torch.cuda.Event()
        busy.record()
    bufs = _pinned(layout, 1)
    ids = [3, 50, 7, 9]
    te.save([ids], bufs).wait(timeout=60)
    assert not busy.query(), "the save waited for the load's gated host-to-device copy"
    torch.cuda.synchronize()
    want = torch.stack([torch.cat([block(caches, layer, b) for b in ids], dim=1) for layer in range(L)])
    assert torch.equal(bufs[0].view(torch.bfloat16).view(want.shape).cpu(), want.cpu())


@pytest.mark.parametrize("gather", ["rows", "strided", "layers"])
def test_a_load_writes_blocks_only_after_the_callers_earlier_reads(gather: str) -> None:
    """A load enqueues its DMA before its indices and its wait for the caller's stream; the
    scatter still follows every read of the blocks the caller enqueued before the load, and
    the block-id regions it borrowed come back once it completed."""
    caches, _, block = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=5, device="cuda")["flash_attn_nhd"]
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, staging_bytes=100_000, gather=gather)
    chunks = [[3, 50, 7, 9], [60, 1, 2, 33]]
    bufs = _pinned(te.layout, len(chunks))
    te.save(chunks, bufs).wait()
    dst = [[10, 11, 12, 13], [14, 15, 16, 17]]
    src, flat = [3, 50, 7, 9, 60, 1, 2, 33], list(range(10, 18))
    before = [block(caches, layer, b).clone() for b in flat for layer in range(L)]
    free = len(te._load.arena._free)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the caller's stream, then its reads
    seen = [block(caches, layer, b).clone() for b in flat for layer in range(L)]
    te.load(bufs, dst).wait()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(seen, before, strict=True))  # read before the load wrote
    assert all(torch.equal(block(caches, layer, d), block(caches, layer, s))
               for s, d in zip(src, flat, strict=True) for layer in range(L))
    assert len(te._load.arena._free) == free


@pytest.mark.parametrize("gather", ["strided", "rows", "layers"])
def test_a_save_reads_the_blocks_after_the_callers_writes_with_the_copy_stream_idle_or_busy(
        gather: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With its copy stream idle, a save gathers its first batch on that stream with the ids read
    in place; behind another save's pending copies it gathers on the kernel stream. Either way
    it reads the blocks only after the writes the caller enqueued before it, byte-exact."""
    from kvortex_core.data import transfer as transfer_mod

    caches, hints, _ = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=3, device="cuda")["flash_attn_nhd"]
    layout = detect_layout(caches, hints)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=100_000, gather=gather)
    te.save([[0, 1]], _pinned(layout, 1)).wait()  # kernels loaded; the copy stream is idle after this
    idle: list[bool] = []
    real = transfer_mod._Direction.idle
    monkeypatch.setattr(transfer_mod._Direction, "idle", lambda d: idle.append(real(d)) or idle[-1])
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the caller's stream, then its writes
    for c in caches:
        c[:, 5].fill_(3.0)
    first_ids, first = [[5, 6, 7, 8], [20, 21]], _pinned(layout, 2)
    h1 = te.save(first_ids, first, inline=True)
    for c in caches:  # after the first save's enqueue: its copies still wait for the sleep
        c[:, 9].fill_(4.0)
    second_ids, second = [[9, 10, 11, 12], [30, 2]], _pinned(layout, 2)
    h2 = te.save(second_ids, second, inline=True)
    h1.wait()
    h2.wait()
    torch.cuda.synchronize()
    assert idle == [True, False]  # every plan lends an ids region (the "layers" plan too)
    cpu = [c.cpu() for c in caches]
    cpu_te = TransferEngine(cpu, detect_layout(cpu, hints), chunk_tokens=CHUNK)
    for ids, bufs in ((first_ids, first), (second_ids, second)):
        want = [torch.zeros_like(b) for b in bufs]
        cpu_te.save(ids, want).wait()
        assert all(torch.equal(a, b) for a, b in zip(bufs, want, strict=True))
    assert bool((cpu[0][:, 5] == 3.0).all()) and bool((cpu[0][:, 9] == 4.0).all())


@pytest.mark.parametrize("mla", [False, True], ids=["llama-8b", "mla"])
@pytest.mark.parametrize("gather", ["auto", "rows"])
def test_separately_allocated_layers_past_4_gib_roundtrip_byte_exact(mla: bool, gather: str) -> None:
    """Per-layer caches from separate allocations, as vLLM < 0.30 makes them (on the H100 VMs each
    lands below the one before: one run read backwards, ``tests/gpu/runs_probe.py``), ~4.3 GiB in
    all, so layer offsets pass 2^32 bytes. Save four chunks of random blocks, load them into other
    blocks: every byte equals the reference gathered by plain indexing."""
    layers, shape = (61, (1024, 64, 576)) if mla else (32, (2, 2048, 16, 8, 128))
    gen = torch.Generator(device="cuda").manual_seed(5)
    caches = [torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    layout = detect_layout(caches)
    chunk = 256
    te = TransferEngine(caches, layout, chunk_tokens=chunk, staging_bytes=64 * 2**20, gather=gather)
    if gather == "auto":
        print("gather mode:", te.gather_mode, [(r.first, r.end, r.reversed) for r in te._strided.runs]
              if te._strided is not None else None)
    per = chunk // layout.block_size
    perm = torch.randperm(layout.num_blocks, generator=torch.Generator().manual_seed(6)).tolist()
    ids = [perm[i * per:(i + 1) * per] for i in range(4)]
    bufs = [torch.zeros(layout.chunk_bytes(chunk), dtype=torch.uint8).pin_memory() for _ in ids]
    te.save(ids, bufs).wait()
    for buf, chunk_ids in zip(bufs, ids, strict=True):
        index = torch.tensor(chunk_ids, device="cuda")
        want = torch.stack([c[index] if mla else c[:, index] for c in caches])  # [L, (2,) n, N, ...]
        assert torch.equal(buf.cuda(), want.reshape(-1).view(torch.uint8)), chunk_ids
    other = [perm[-(i + 1) * per:len(perm) - i * per] for i in range(4)]
    te.load(bufs, other, skip_blocks=1).wait()
    torch.cuda.synchronize()
    for src_ids, dst_ids in zip(ids, other, strict=True):
        s, d = torch.tensor(src_ids, device="cuda"), torch.tensor(dst_ids, device="cuda")
        if (src_ids, dst_ids) == (ids[0], other[0]):  # the first block was skipped: untouched
            assert not torch.equal(caches[0][d[0]] if mla else caches[0][:, d[0]],
                                   caches[0][s[0]] if mla else caches[0][:, s[0]])
            s, d = s[1:], d[1:]
        assert all(torch.equal(c[d] if mla else c[:, d], c[s] if mla else c[:, s]) for c in caches)


@pytest.mark.parametrize("mla", [False, True], ids=["llama-like", "mla-like"])
@pytest.mark.parametrize("gather", ["auto", "strided", "rows"])
def test_layers_at_falling_addresses_roundtrip_byte_exact_by_every_plan(mla: bool, gather: str) -> None:
    """Per-layer tensors each below the one before (carved from one buffer in reverse, so the run
    does not depend on the allocator): "auto" takes the row plan, "strided" one falling run read
    backwards; saves equal plain indexing and loads (first block skipped) write only their blocks."""
    shape = (B, N, 2 * D) if mla else (2, B, N, H, D)
    buf = torch.randn((L, *shape), device="cuda", dtype=torch.bfloat16)
    caches = [buf[i] for i in range(L - 1, -1, -1)]
    layout = detect_layout(caches)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=100_000, gather=gather)
    assert te.gather_mode == ("rows" if gather == "auto" else gather)
    per = CHUNK // layout.block_size
    ids = [[13, 2, 40, 7][:per], [33, 5, 60, 21][:per]]
    bufs = _pinned(layout, 2)
    te.save(ids, bufs).wait()
    for b, chunk_ids in zip(bufs, ids, strict=True):
        index = torch.tensor(chunk_ids, device="cuda")
        want = torch.stack([c[index] if mla else c[:, index] for c in caches])
        assert torch.equal(b.cuda(), want.reshape(-1).view(torch.uint8))
    before = buf.clone()
    other = [[50, 51, 52, 53][:per], [54, 55, 56, 57][:per]]
    te.load(bufs, other, skip_blocks=1).wait()
    torch.cuda.synchronize()
    src, dst = [b for c in ids for b in c][1:], [b for c in other for b in c][1:]
    for c, old in zip(caches, [before[i] for i in range(L - 1, -1, -1)], strict=True):
        s, d = torch.tensor(src, device="cuda"), torch.tensor(dst, device="cuda")
        assert torch.equal(c[d] if mla else c[:, d], old[s] if mla else old[:, s])
        rest = [b for b in range(B) if b not in dst]
        assert torch.equal(c[rest] if mla else c[:, rest], old[rest] if mla else old[:, rest])
