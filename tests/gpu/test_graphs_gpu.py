"""Whole-chunk transfers as CUDA graph replays (``graphs=True``): the same bytes as the eager path.

Skipped cleanly without a CUDA device (marker ``gpu``, see tests/conftest.py).
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

from kvortex_core.data import kv_samples as ks
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.pool import PinnedPool
from kvortex_core.data.transfer import TransferEngine

pytestmark = pytest.mark.gpu

L, B, N, H, D, CHUNK = 4, 64, 16, 2, 64, 64  # 4 blocks a chunk
PER_CHUNK = CHUNK // N


def _setup(name: str, seed: int, *, graphs: bool = True):
    caches, hints, block = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=seed, device="cuda")[name]
    layout = detect_layout(caches, hints)
    chunk = layout.chunk_bytes(CHUNK)
    # staging halves that hold one chunk but not two: where the graph path applies
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=2 * chunk + 1024, gather="rows",
                        graphs=graphs)
    return caches, hints, block, layout, te


def _slots(layout, n: int) -> list[torch.Tensor]:
    """Slots of a ``cudaHostRegister``ed pool, as the engine's cpu tier hands them out."""
    chunk = layout.chunk_bytes(CHUNK)
    pool = PinnedPool(chunk, chunk * n, device=0)
    slots = [pool.view(i)[:chunk] for i in range(n)]
    for s in slots:
        s.zero_()
    slots[0]._kvx_pool = pool  # type: ignore[attr-defined]  # keeps the pool alive
    return slots


def _chunks(rng: random.Random, n: int, pool: list[int]) -> list[list[int]]:
    ids = rng.sample(pool, n * PER_CHUNK)
    return [ids[i * PER_CHUNK:(i + 1) * PER_CHUNK] for i in range(n)]


@pytest.mark.parametrize("name", sorted(ks.all_layouts(2, 4, 16, 1, 8, torch.bfloat16)))
def test_graph_saves_and_loads_are_byte_exact_in_every_layout(name: str) -> None:
    caches, hints, block, layout, te = _setup(name, seed=11)
    assert te._graphs is not None, "the graph path does not apply"
    rng = random.Random(3)
    chunks = _chunks(rng, 6, list(range(B // 2)))
    slots = _slots(layout, 6)
    assert te.prepare_graphs(slots) == 4 * 6
    te.save(chunks, slots).wait()
    cpu = [c.cpu() for c in caches] if isinstance(caches, list) else caches.cpu()
    cpu_te = TransferEngine(cpu, detect_layout(cpu, hints), chunk_tokens=CHUNK)
    want = [torch.zeros(s.numel(), dtype=torch.uint8) for s in slots]
    cpu_te.save(chunks, want).wait()
    assert all(torch.equal(a, b) for a, b in zip(slots, want, strict=True))
    new = _chunks(rng, 6, list(range(B // 2, B)))
    te.load(slots, new).wait()
    torch.cuda.synchronize()
    for ids, nids in zip(chunks, new, strict=True):
        for o, n in zip(ids, nids, strict=True):
            assert all(torch.equal(block(caches, layer, n), block(caches, layer, o)) for layer in range(L))
    assert te.cuda_graphs == 4 * 6  # no capture beyond the prepared slots


def test_concurrent_loads_of_one_slot_into_different_blocks_each_get_the_slot() -> None:
    """The row numbers reach a replay through the staging half's buffer, filled in that half's
    stream order: two threads loading one slot into different blocks at once never mix them."""
    caches, _, block, layout, te = _setup("flash_attn_nhd", seed=12)
    slots = _slots(layout, 2)
    src = [[1, 2, 3, 4], [5, 6, 7, 8]]
    te.save(src, slots).wait()
    errors: list[BaseException] = []
    targets: dict[int, list[list[int]]] = {}

    def run(k: int) -> None:
        try:
            for r in range(20):
                free = list(range(16 + 24 * k, 16 + 24 * (k + 1)))
                dst = _chunks(random.Random(k * 1000 + r), 2, free)
                te.load(slots, dst).wait()
                targets[k] = dst
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    torch.cuda.synchronize()
    for dst in targets.values():
        for ids, nids in zip(src, dst, strict=True):
            for o, n in zip(ids, nids, strict=True):
                assert all(torch.equal(block(caches, layer, n), block(caches, layer, o)) for layer in range(L))


def test_graph_and_eager_calls_share_the_staging_halves_without_a_sync() -> None:
    """A partial chunk takes the eager path, whole ones the graphs; back to back, no host sync
    between them, every save's bytes are right (both paths use the same two staging halves)."""
    caches, hints, _, layout, te = _setup("mla", seed=13)
    cpu = caches.cpu() if not isinstance(caches, list) else [c.cpu() for c in caches]
    cpu_te = TransferEngine(cpu, detect_layout(cpu, hints), chunk_tokens=CHUNK)
    rng = random.Random(9)
    calls = []
    for k in range(8):
        n = 1 + k % 3
        chunks = _chunks(rng, n, list(range(B)))
        if k % 2:
            chunks[-1] = chunks[-1][:2]  # a partial last chunk: eager
        slots = _slots(layout, n)
        calls.append((chunks, slots, te.save(chunks, slots)))
    for chunks, slots, h in calls:
        h.wait()
        want = [torch.zeros(s.numel(), dtype=torch.uint8) for s in slots]
        cpu_te.save(chunks, want).wait()
        for a, b, ids in zip(slots, want, chunks, strict=True):
            n = layout.chunk_bytes(len(ids) * N)
            assert torch.equal(a[:n], b[:n])
    assert te.cuda_graphs > 0


def test_a_graph_save_reads_the_blocks_after_the_callers_writes_and_a_load_writes_after_its_reads() -> None:
    caches, _, block, layout, te = _setup("flash_attn_nhd", seed=14)
    slots = _slots(layout, 1)
    te.prepare_graphs(slots)
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the caller's stream, then its writes
    for c in caches:
        c[:, 5].fill_(3.0)
    te.save([[5, 6, 7, 8]], slots).wait()
    first = slots[0].view(torch.bfloat16).view(layout.chunk_payload_shape(CHUNK))[:, :, :N]
    assert bool((first == 3.0).all())
    before = [block(caches, layer, b).clone() for b in (20, 21, 22, 23) for layer in range(L)]
    torch.cuda._sleep(200_000_000)
    seen = [block(caches, layer, b).clone() for b in (20, 21, 22, 23) for layer in range(L)]
    te.load(slots, [[20, 21, 22, 23]]).wait()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(seen, before, strict=True))
    assert all(torch.equal(block(caches, layer, 20), block(caches, layer, 5)) for layer in range(L))


def test_kvortex_engine_moves_whole_chunks_with_graphs_and_partial_ones_without() -> None:
    from kvortex_core import KVortexEngine

    caches, _, block = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=15, device="cuda")["mla"]
    layout = detect_layout(caches)
    chunk = layout.chunk_bytes(CHUNK)
    cfg = {"chunk_tokens": CHUNK, "model_id": "graphs-test",
           "transfer": {"staging_bytes": 2 * chunk + 1024, "gather": "rows"},
           "tiers": {"cpu": {"type": "cpu", "capacity": "8MiB"}}}
    with KVortexEngine.create(cfg) as eng:
        eng.register_kv_caches(caches)
        te = eng._reg.transfer
        assert te.cuda_graphs == 4 * eng._reg.tiers.pool.num_slots
        tokens = list(range(1000, 1000 + 3 * CHUNK + 20))  # 3 whole chunks and a partial one
        src = list(range(4 * PER_CHUNK))
        saved = eng.save(tokens, src)
        assert saved >= 3 * CHUNK
        dst = list(range(32, 32 + 4 * PER_CHUNK))
        assert eng.load(tokens, dst) == saved
        torch.cuda.synchronize()
        for s, d in zip(src[:3 * PER_CHUNK], dst[:3 * PER_CHUNK], strict=True):  # the whole chunks
            assert all(torch.equal(block(caches, layer, d), block(caches, layer, s)) for layer in range(L))
    with KVortexEngine.create({**cfg, "transfer": {**cfg["transfer"], "cuda_graphs": False}}) as eng:
        eng.register_kv_caches(caches)
        assert eng._reg.transfer.cuda_graphs == 0
