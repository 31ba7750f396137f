"""KVortexEngine on CPU tensors: save/lookup/load round trips, skips, partial chunks, threads,
cross-layout loads, async handles, bad input, close."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np
import pytest
import torch

from kvortex_core import KVortexConfig, KVortexEngine, KVortexError, LayoutError
from kvortex_core.data import kv_samples as ks

L, B, N, H, D = 2, 96, 16, 2, 8
CHUNK = 64  # 4 blocks


@pytest.fixture(autouse=True)
def _quiet_pageable_warning(recwarn: pytest.WarningsRecorder) -> None:
    """The pool warns once that it is pageable without CUDA; expected here."""


def _config(**kw: Any) -> KVortexConfig:
    base: dict[str, Any] = {"model_id": "test/model", "chunk_tokens": CHUNK,
                            "tiers": {"cpu": {"type": "cpu", "capacity": "2MiB"}}}
    base.update(kw)
    return KVortexConfig(**base)


def _engine(caches: Any = None, hints: Any = None, **kw: Any) -> tuple[KVortexEngine, Any, Any]:
    if caches is None:
        caches, hints, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16)
    else:
        block = None
    engine = KVortexEngine.create(_config(**kw))
    engine.register_kv_caches(caches, hints)
    return engine, caches, block


def _cpu_and_disk(path: Any) -> dict[str, Any]:
    """An 8 MiB cpu tier over a disk tier in ``path`` that receives every saved chunk."""
    return {"cpu": {"type": "cpu", "capacity": "8MiB"},
            "disk": {"type": "disk", "capacity": "64MiB", "path": str(path), "write_through": True}}


def _same_blocks(caches: Any, block: Any, src: list[int], dst: list[int], target: Any = None) -> bool:
    target = caches if target is None else target
    return all(torch.equal(block(target, layer, d), block(caches, layer, s))
               for s, d in zip(src, dst, strict=True) for layer in range(L))


def test_save_lookup_load_roundtrip() -> None:
    engine, caches, block = _engine()
    with engine:
        tokens = list(range(1000, 1000 + 3 * CHUNK + 10))  # 3 whole chunks and a partial one
        blocks = list(range(13))
        assert engine.lookup(tokens) == 0
        assert engine.save(tokens, blocks) == 3 * CHUNK  # partial chunk not stored by default
        assert engine.lookup(tokens) == 3 * CHUNK
        assert engine.lookup(tokens[:CHUNK + 5]) == CHUNK
        assert engine.save(tokens, blocks) == 0  # already stored
        new = list(range(40, 53))
        assert engine.load(tokens, new) == 3 * CHUNK
        assert _same_blocks(caches, block, blocks[:12], new[:12])
        stats = engine.stats()
        assert stats["layout"]["kind"] == "flash_attn"


def test_load_miss_and_diverging_prefix() -> None:
    engine, caches, block = _engine()
    with engine:
        tokens = list(range(2 * CHUNK))
        engine.save(tokens, list(range(8)))
        other = tokens[:CHUNK] + [7] * CHUNK  # same first chunk, different second
        assert engine.lookup(other) == CHUNK
        before = caches[0][:, 60:68].clone()
        assert engine.load(other, list(range(60, 68))) == CHUNK
        assert _same_blocks(caches, block, [0, 1, 2, 3], [60, 61, 62, 63])
        assert torch.equal(caches[0][:, 64:68], before[:, 4:8])  # second chunk untouched
        assert engine.load([9] * CHUNK, list(range(60, 64))) == 0


def test_skip_tokens_leaves_held_blocks_alone() -> None:
    engine, caches, block = _engine()
    with engine:
        tokens = list(range(500, 500 + 3 * CHUNK))
        engine.save(tokens, list(range(12)))
        dst = list(range(70, 82))
        held = caches[1][:, 70:76].clone()
        assert engine.load(tokens, dst, skip_tokens=CHUNK + 2 * N) == 2 * CHUNK - 2 * N
        assert torch.equal(caches[1][:, 70:76], held)  # 1 chunk + 2 blocks skipped
        assert _same_blocks(caches, block, list(range(6, 12)), list(range(76, 82)))
        assert engine.load(tokens, dst, skip_tokens=3 * CHUNK) == 0


def test_skipping_every_token_writes_no_block_even_a_partial_chunks() -> None:
    """All tokens held (skip_tokens >= their count): the partial last chunk's block is not
    rewritten (its rows past the sequence's end would take the saver's bytes)."""
    engine, caches, _ = _engine(store_partial_chunks=True)
    with engine:
        tokens = list(range(700, 700 + CHUNK + 2 * N))  # a whole chunk and a 2-block partial one
        assert engine.save(tokens, list(range(6))) == len(tokens)
        dst = list(range(40, 46))
        before = [c.clone() for c in caches]
        for skip in (len(tokens), len(tokens) + 5):
            assert engine.load(tokens, dst, skip_tokens=skip) == 0
            assert all(torch.equal(a, b) for a, b in zip(before, caches, strict=True))
        assert engine.load(tokens, dst, skip_tokens=len(tokens) - 1) == 1  # the last token's block


def test_partial_chunks_when_configured() -> None:
    engine, caches, block = _engine(store_partial_chunks=True)
    with engine:
        tokens = list(range(CHUNK + 20))  # one chunk + 20 tokens (2 blocks)
        assert engine.save(tokens, list(range(6))) == CHUNK + 20
        assert engine.lookup(tokens) == CHUNK + 20
        assert engine.load(tokens, list(range(30, 36))) == CHUNK + 20
        assert _same_blocks(caches, block, [0, 1, 2, 3, 4, 5], [30, 31, 32, 33, 34, 35])


def test_partial_chunk_never_loads_into_an_engine_of_another_block_size(tmp_path: Any) -> None:
    """Engines of one model with 16- and 64-token blocks share a disk tier: the whole chunk
    loads across, the partial one (laid out over whole blocks: 32 rows vs 64) is a miss."""
    tiers = {"cpu": {"type": "cpu", "capacity": "1MiB"},
             "disk": {"type": "disk", "capacity": "8MiB", "path": str(tmp_path), "write_through": True}}
    tokens = list(range(3, 3 + CHUNK + 20))
    src, _, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=3)
    with KVortexEngine.create(_config(tiers=tiers, store_partial_chunks=True)) as a:
        a.register_kv_caches(src)
        assert a.save(tokens, list(range(6))) == CHUNK + 20
    dst, _, _ = ks.flash_attn(L, 8, CHUNK, H, D, torch.bfloat16, seed=4)  # one block per chunk
    before = dst[0][:, 5].clone()
    with KVortexEngine.create(_config(tiers=tiers, store_partial_chunks=True)) as b:
        b.register_kv_caches(dst)
        assert b.lookup(tokens) == CHUNK
        assert b.load(tokens, [4, 5]) == CHUNK
    for layer in range(L):  # the whole chunk: src blocks 0-3 are dst block 4's tokens
        assert torch.equal(dst[layer][:, 4], torch.cat([src[layer][:, i] for i in range(4)], 1))
    assert torch.equal(dst[0][:, 5], before), "the partial chunk's block is untouched"


def test_cross_layout_load_between_engines_sharing_a_tier(tmp_path: Any) -> None:
    """Save from FlashAttention NHD, load into vLLM 0.30+ unified BLNHC through a shared disk tier."""
    tiers = {"cpu": {"type": "cpu", "capacity": "1MiB"},
             "disk": {"type": "disk", "capacity": "8MiB", "path": str(tmp_path), "write_through": True}}
    src, _, sblock = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=1)
    tokens = list(range(7, 7 + 2 * CHUNK))
    with KVortexEngine.create(_config(tiers=tiers)) as a:
        a.register_kv_caches(src)
        a.save(tokens, list(range(10, 18)))
    dst, hints, dblock = ks.unified(L, B, N, H, D, torch.bfloat16, order="BLNHC", seed=2)
    with KVortexEngine.create(_config(tiers=tiers)) as b:
        b.register_kv_caches(dst, hints)
        assert b.lookup(tokens) == 2 * CHUNK
        assert b.load(tokens, list(range(50, 58))) == 2 * CHUNK
    for s, d in zip(range(10, 18), range(50, 58), strict=True):
        assert all(torch.equal(dblock(dst, layer, d), sblock(src, layer, s)) for layer in range(L))


@pytest.mark.parametrize("name", ["flashinfer_hnd", "cross_layer", "mla", "unified_LBHNC", "unified_mla_LBNHC"])
def test_engine_with_other_layouts(name: str) -> None:
    caches, hints, block = ks.all_layouts(L, B, N, H, D, torch.float16)[name]
    with KVortexEngine.create(_config()) as engine:
        engine.register_kv_caches(caches, hints)
        tokens = list(range(2 * CHUNK))
        assert engine.save(tokens, [5, 9, 1, 3, 60, 61, 62, 70]) == 2 * CHUNK
        assert engine.load(tokens, list(range(80, 88))) == 2 * CHUNK
        assert _same_blocks(caches, block, [5, 9, 1, 3, 60, 61, 62, 70], list(range(80, 88)))


@pytest.mark.parametrize("gather", ["auto", "strided", "rows", "layers"])
def test_transfer_gather_setting_picks_the_plan(gather: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``transfer.gather`` (here from the environment) reaches the transfer engine; every plan
    stores and loads the same bytes; a plan that does not fit fails registration by name."""
    monkeypatch.setenv("KVORTEX_TRANSFER__GATHER", gather)
    caches, _, block = ks.cross_layer(L, B, N, H, D, torch.bfloat16)
    with KVortexEngine.create(_config()) as engine:
        engine.register_kv_caches(caches)
        want = {"auto": ("strided", "rows"), "strided": ("strided",), "rows": ("rows",), "layers": ("layers",)}
        assert engine.stats()["layout"]["gather"] in want[gather]
        tokens = list(range(2 * CHUNK))
        assert engine.save(tokens, [5, 9, 1, 3, 60, 61, 62, 70]) == 2 * CHUNK
        assert engine.load(tokens, list(range(80, 88))) == 2 * CHUNK
        assert _same_blocks(caches, block, [5, 9, 1, 3, 60, 61, 62, 70], list(range(80, 88)))
    if gather == "strided":  # 20 layers, each at its own distance: no strided view fits
        size = 2 * B * N * H * D
        flat = torch.zeros(20 * size + 8 * 210, dtype=torch.bfloat16)
        starts = [i * size + 8 * i * (i + 1) // 2 for i in range(20)]
        uneven = [flat[a:a + size].view(2, B, N, H, D) for a in starts]
        with KVortexEngine.create(_config()) as engine, pytest.raises(LayoutError, match="gather='strided' needs"):
            engine.register_kv_caches(uneven)


def test_model_identity_separates_keys() -> None:
    caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16)
    tokens = list(range(CHUNK))
    keys = {}
    for ident in ({"model_id": "a"}, {"model_id": "b"}, {"model_id": "a", "salt": "tenant-1"},
                  {"model_id": "a", "model_revision": "v2"}):
        with KVortexEngine.create(_config(**ident)) as engine:
            engine.register_kv_caches(caches)
            keys[str(ident)] = engine.keys(tokens)[0]
    assert len(set(keys.values())) == 4
    with KVortexEngine.create(_config(model_id="a")) as engine:  # deterministic
        engine.register_kv_caches(caches)
        assert engine.keys(tokens)[0] == keys[str({"model_id": "a"})]
        assert engine.contains(engine.keys(tokens)) == 0


def test_contains_bitmask() -> None:
    engine, _, _ = _engine()
    with engine:
        tokens = list(range(3 * CHUNK))
        engine.save(tokens[:2 * CHUNK], list(range(8)))
        assert engine.contains(engine.keys(tokens)) == 0b011


def test_pool_full_saves_what_fits_and_never_raises() -> None:
    engine, _, _ = _engine(tiers={"cpu": {"type": "cpu", "capacity": 3 * (4096 + 4096)}})
    with engine:
        saved = engine.save(list(range(6 * CHUNK)), list(range(24)))
        assert 0 < saved < 6 * CHUNK or saved == 6 * CHUNK  # evicts or skips, never raises
        assert engine.lookup(list(range(6 * CHUNK))) <= 6 * CHUNK


def test_tensor_and_numpy_inputs() -> None:
    engine, caches, block = _engine()
    with engine:
        tokens = torch.arange(CHUNK, dtype=torch.int64)
        assert engine.save(tokens, torch.tensor([3, 4, 5, 6])) == CHUNK
        assert engine.lookup(np.arange(CHUNK, dtype=np.int32)) == CHUNK
        assert engine.load(np.arange(CHUNK), np.array([20, 21, 22, 23])) == CHUNK
        assert _same_blocks(caches, block, [3, 4, 5, 6], [20, 21, 22, 23])


@pytest.mark.parametrize(
    ("tokens", "blocks", "match"),
    [
        (list(range(CHUNK)), [1, 2, 3], "need 4 blocks"),
        (list(range(CHUNK)), [1, 2, 3, B], f"block_ids\\[3\\] = {B}"),
        (list(range(CHUNK)), [1, 2, 3, -1], "block_ids\\[3\\] = -1"),
        ([[1, 2], [3, 4]], [1], "1-D"),
        (torch.zeros(2, CHUNK, dtype=torch.int64), [1], "1-D"),
        (torch.zeros(CHUNK), [1, 2, 3, 4], "integers"),
        ("hello", [1], "1-D sequence"),
        ([1.5] * CHUNK, [1, 2, 3, 4], "integers, got token_ids\\[0\\] = 1.5 \\(float\\)"),
        ([1, 2, "x", *range(CHUNK - 3)], [1, 2, 3, 4], "token_ids\\[2\\] = 'x' \\(str\\)"),
        (list(range(CHUNK)), [1.0, 2.0, 3.0, 4.0], "block_ids\\[0\\] = 1.0 \\(float\\)"),
        (list(range(CHUNK)), [1, 2, True, 4], "block_ids\\[2\\] = True \\(bool\\)"),
        (list(range(CHUNK)), (1, 2, 3, False), "block_ids\\[3\\] = False \\(bool\\)"),
        (list(range(CHUNK)), [1, 2, "3", 4], "block_ids\\[2\\] = '3' \\(str\\); pass the request's block table"),
        (list(range(CHUNK)), torch.tensor([1.0, 2.0, 3.0, 4.0]), "block_ids\\[0\\] = 1.0 \\(float\\)"),
        (list(range(CHUNK)), [[1, 2], [3]], "block_ids must be a 1-D sequence of ints"),
        (list(range(CHUNK)), np.zeros((2, 2), dtype=np.int64), "block_ids must be 1-D, got shape \\(2, 2\\)"),
    ],
)
def test_bad_input_raises_and_stores_nothing(tokens: Any, blocks: Any, match: str) -> None:
    engine, _, _ = _engine()
    with engine:
        with pytest.raises(KVortexError, match=match):
            engine.save(tokens, blocks)
        with pytest.raises(KVortexError, match=match):
            engine.load(tokens, blocks)
        assert engine.stats()["pool"]["used_slots"] == 0
    with _engine()[0] as e2, pytest.raises(KVortexError, match="skip_tokens=-1"):
        e2.load(list(range(CHUNK)), [1, 2, 3, 4], skip_tokens=-1)


def test_register_rules() -> None:
    engine = KVortexEngine.create(_config())
    with engine:
        with pytest.raises(KVortexError, match="register_kv_caches"):
            engine.lookup([1, 2, 3])
        caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16)
        engine.register_kv_caches(caches)
        engine.register_kv_caches([c.clone() for c in caches])  # same layout: allowed
        with pytest.raises(LayoutError, match="already called"):
            engine.register_kv_caches(ks.flash_attn(L, B + 1, N, H, D, torch.bfloat16)[0])
    with pytest.raises(KVortexError, match="multiple"):
        KVortexEngine.create(_config(chunk_tokens=24)).register_kv_caches(caches)
    with pytest.raises(KVortexError, match="closed"):
        engine.save([1], [1])
    engine.close()  # idempotent


def test_async_handles_and_threads() -> None:
    engine, caches, block = _engine(tiers={"cpu": {"type": "cpu", "capacity": "4MiB"}})
    with engine:
        handles = [engine.save_async(list(range(i * 10_000, i * 10_000 + CHUNK)), [4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3])
                   for i in range(6)]
        assert [h.wait(timeout=30) for h in handles] == [CHUNK] * 6
        assert all(h.done() for h in handles)
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                toks = list(range(i * 10_000, i * 10_000 + CHUNK))
                dst = [48 + 4 * i + j for j in range(4)]
                for _ in range(5):
                    assert engine.lookup(toks) == CHUNK
                    assert engine.load_async(toks, dst).wait(timeout=30) == CHUNK
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for i in range(6):
            assert _same_blocks(caches, block, [4 * i + j for j in range(4)], [48 + 4 * i + j for j in range(4)])
        assert engine.stats()["counters"]["engine_load_calls"][""] >= 30


@pytest.mark.parametrize("kind", ["numpy-uint32", "torch-uint32", "numpy-int64", "torch-int64"])
def test_async_calls_copy_the_token_ids_so_the_caller_may_reuse_its_buffer(kind: str) -> None:
    """A uint32 numpy array or tensor was kept as a view: a caller refilling its buffer after
    save_async returned had the KV of prompt A stored under prompt B (a red-team finding). The
    engine's executor is held busy so the async calls run after the caller moved on."""
    engine, caches, block = _engine()
    a, b = list(range(100, 100 + CHUNK)), list(range(900, 900 + CHUNK))
    dtype = kind.split("-")[1]

    def buffer(values: list[int]) -> Any:
        if kind.startswith("numpy"):
            return np.array(values, dtype=getattr(np, dtype))
        return torch.tensor(values, dtype=getattr(torch, dtype))

    def refill(buf: Any, values: list[int]) -> None:
        buf[:] = buffer(values)

    with engine:
        buf = buffer(a)
        gate = threading.Event()
        busy = [engine._executor.submit(gate.wait, 10) for _ in range(engine._executor._max_workers)]
        handle = engine.save_async(buf, [0, 1, 2, 3])
        refill(buf, b)
        gate.set()
        assert handle.wait(30) == CHUNK
        assert [f.result() for f in busy] == [True] * len(busy)
        assert engine.lookup(a) == CHUNK and engine.lookup(b) == 0
        refill(buf, a)
        gate.clear()
        busy = [engine._executor.submit(gate.wait, 10) for _ in range(engine._executor._max_workers)]
        handle = engine.load_async(buf, [8, 9, 10, 11])
        refill(buf, b)
        gate.set()
        assert handle.wait(30) == CHUNK
        assert _same_blocks(caches, block, [0, 1, 2, 3], [8, 9, 10, 11])


def test_layerwise_load_per_layer_then_whole() -> None:
    engine, caches, block = _engine()
    with engine:
        tokens = list(range(7, 7 + 2 * CHUNK))
        blocks = list(range(2 * CHUNK // N))
        engine.save(tokens, blocks)
        new = list(range(40, 40 + len(blocks)))
        with engine.load_layerwise(tokens, new) as pending:
            assert pending.tokens == 2 * CHUNK
            for layer in range(L):
                pending.wait_layer(layer)
                assert all(torch.equal(block(caches, layer, d), block(caches, layer, s))
                           for s, d in zip(blocks, new, strict=True))
        assert pending.done()
        # a miss starts nothing and reports zero tokens
        assert engine.load_layerwise(list(range(99, 99 + CHUNK)), blocks).wait() == 0


@pytest.fixture
def _split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every call of more than 2 chunks run as a 1-chunk part, then parts of 2, 4... chunks."""
    import kvortex_core.engine as engine_mod

    monkeypatch.setattr(engine_mod, "_FIRST_PART_BYTES", 1)


@pytest.mark.usefixtures("_split")
def test_head_then_rest_roundtrip_partial_prefix_and_skip() -> None:
    engine, caches, block = _engine()
    with engine:
        assert engine._parts(6, engine._reg) == [(0, 1), (1, 3), (3, 6)]
        assert engine._parts(2, engine._reg) == [(0, 2)]
        tokens = list(range(3000, 3000 + 6 * CHUNK))
        # the first 3 chunks first: a later save of all 6 stores only the last 3
        assert engine.save(tokens[: 3 * CHUNK], list(range(12))) == 3 * CHUNK
        assert engine.save(tokens, list(range(24))) == 3 * CHUNK
        assert engine.lookup(tokens) == 6 * CHUNK
        dst = list(range(40, 64))
        assert engine.load(tokens, dst) == 6 * CHUNK
        assert _same_blocks(caches, block, list(range(24)), dst)
        # the stored prefix ends inside the rest: 4 chunks load, the 5th chunk's blocks stay
        other = tokens[: 4 * CHUNK] + [1] * (2 * CHUNK)
        untouched = caches[0][:, 80:88].clone()
        assert engine.load(other, list(range(64, 88))) == 4 * CHUNK
        assert torch.equal(caches[0][:, 80:88], untouched)
        assert _same_blocks(caches, block, list(range(16)), list(range(64, 80)))
        # skip: the head's first blocks are left alone, the rest is written
        for layer in caches:
            layer[:, 64:88].zero_()
        assert engine.load(tokens, list(range(64, 88)), skip_tokens=2 * N) == 6 * CHUNK - 2 * N
        assert all(not layer[:, 64:66].any() for layer in caches)
        assert _same_blocks(caches, block, list(range(2, 24)), list(range(66, 88)))
        assert engine._reg.tiers.cpu_index.pinned_bytes == 0  # every load unpinned its slots


@pytest.mark.usefixtures("_split")
@pytest.mark.parametrize("where", ["token", "block"])
def test_bad_input_after_the_head_still_raises_and_leaks_nothing(where: str) -> None:
    """Parts are checked as they are reached: a bad value past the head raises all the same,
    leaves no slot reserved or pinned, and whatever the head stored is correct."""
    engine, caches, block = _engine()
    with engine:
        tokens: list[Any] = list(range(7000, 7000 + 5 * CHUNK))
        blocks: list[Any] = list(range(20))
        if where == "token":
            tokens[4 * CHUNK + 3] = 2.5
            match = "integers"
        else:
            blocks[17] = B + 3
            match = f"block_ids\\[17\\] = {B + 3}"
        with pytest.raises(KVortexError, match=match):
            engine.save(tokens, blocks)
        with pytest.raises(KVortexError, match=match):
            engine.load(tokens, blocks)
        stored = engine.lookup(list(range(7000, 7000 + 5 * CHUNK)))
        assert stored % CHUNK == 0 and stored < 5 * CHUNK  # never the bad part
        assert engine.stats()["pool"]["used_slots"] == stored // CHUNK
        assert engine._reg.tiers.cpu_index.pinned_bytes == 0
        dst = list(range(40, 40 + stored // N))
        assert engine.load(list(range(7000, 7000 + 5 * CHUNK))[:stored], dst) == stored
        assert _same_blocks(caches, block, list(range(stored // N)), dst)


def test_parts_grow_then_take_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of 1 chunk, 2 chunks, then the rest round-trip like one; larger calls double on."""
    import kvortex_core.engine as engine_mod

    engine, caches, block = _engine()
    monkeypatch.setattr(engine_mod, "_FIRST_PART_BYTES", 1)
    with engine:
        assert engine._parts(8, engine._reg) == [(0, 1), (1, 3), (3, 8)]
        assert engine._parts(5, engine._reg) == [(0, 1), (1, 5)]
        assert engine._parts(32, engine._reg) == [(0, 1), (1, 3), (3, 7), (7, 15), (15, 32)]
        monkeypatch.setattr(engine_mod, "_FIRST_PART_BYTES", engine._reg.layout.chunk_bytes(2 * CHUNK))
        engine._reg.parts.clear()  # parts are cached per chunk count (the constant never changes)
        assert engine._parts(32, engine._reg) == [(0, 2), (2, 6), (6, 14), (14, 32)]
        monkeypatch.setattr(engine_mod, "_FIRST_PART_BYTES", 1)
        engine._reg.parts.clear()
        tokens = list(range(9000, 9000 + 8 * CHUNK))
        assert engine.save(tokens, list(range(32))) == 8 * CHUNK
        assert engine.load(tokens, list(range(40, 72))) == 8 * CHUNK
        assert _same_blocks(caches, block, list(range(32)), list(range(40, 72)))


@pytest.mark.parametrize("group_chunks", [1, 2, 1000])
def test_saves_index_every_chunk_whatever_the_commit_group(monkeypatch: pytest.MonkeyPatch,
                                                           group_chunks: int) -> None:
    """Chunks are waited for and indexed in groups; every group, the last one short, lands."""
    import kvortex_core.engine as engine_mod

    engine, caches, block = _engine()
    monkeypatch.setattr(engine_mod, "_COMMIT_GROUP_BYTES", group_chunks * engine._reg.tiers.payload_bytes)
    with engine:
        tokens = list(range(11000, 11000 + 5 * CHUNK))
        assert engine.save(tokens, list(range(20))) == 5 * CHUNK
        assert engine.lookup(tokens) == 5 * CHUNK  # indexed before save returned
        assert engine.stats()["pool"]["used_slots"] == 5
        assert engine.load(tokens, list(range(40, 60))) == 5 * CHUNK
        assert _same_blocks(caches, block, list(range(20)), list(range(40, 60)))


@pytest.mark.usefixtures("_split")
@pytest.mark.parametrize("op", ["save", "load"])
def test_a_bad_token_in_a_later_part_is_named_by_its_index_in_the_call(op: str) -> None:
    engine, _, _ = _engine()
    with engine:
        tokens: list[Any] = list(range(6 * CHUNK))
        engine.save(tokens[:CHUNK], list(range(4)))
        bad = 4 * CHUNK + 5  # in the third part (chunks 3-5)
        tokens[bad] = 2.5
        with pytest.raises(KVortexError, match=rf"token_ids\[{bad}\] = 2.5 \(float\)"):
            getattr(engine, op)(tokens, list(range(24)))
        tokens[bad] = -3
        with pytest.raises(KVortexError, match=rf"token_ids\[{bad}\] = -3 is not a token id"):
            getattr(engine, op)(tokens, list(range(24)))
        # a save keeps the chunks before the bad part (their keys depend only on their prefix)
        stored = 3 if op == "save" else 1
        assert engine.stats()["gauges"]["pool_used_slots"]["cpu"] == stored  # nothing reserved
        assert engine.lookup(tokens[:bad]) == stored * CHUNK


def test_save_counts_a_new_partial_chunk_by_its_tokens() -> None:
    engine, _, _ = _engine(store_partial_chunks=True)
    with engine:
        base = list(range(CHUNK))
        assert engine.save(base, list(range(4))) == CHUNK
        assert engine.save(base + list(range(500, 520)), list(range(6))) == 20  # not 2 blocks (32)
        assert engine.stats()["counters"]["engine_saved_tokens"][""] == CHUNK + 20


@pytest.mark.parametrize("skip", [True, 16.0, None, "16", -1])
def test_skip_tokens_must_be_a_non_negative_integer(skip: Any) -> None:
    engine, caches, _ = _engine()
    with engine:
        tokens = list(range(2 * CHUNK))
        engine.save(tokens, list(range(8)))
        before = [c.clone() for c in caches]
        with pytest.raises(KVortexError, match=rf"skip_tokens={skip!r} must be an integer >= 0"):
            engine.load(tokens, list(range(40, 48)), skip_tokens=skip)
        with pytest.raises(KVortexError, match="skip_tokens"):
            engine.load_async(tokens, list(range(40, 48)), skip_tokens=skip)
        assert all(torch.equal(a, b) for a, b in zip(before, caches, strict=True))


def test_skip_tokens_from_numpy_or_a_tensor_counts_as_a_plain_int() -> None:
    engine, _, _ = _engine()
    with engine:
        tokens = list(range(2 * CHUNK))
        engine.save(tokens, list(range(8)))
        for skip in (np.int64(N), torch.tensor(N)):
            got = engine.load(tokens, list(range(40, 48)), skip_tokens=skip)
            assert type(got) is int and got == 2 * CHUNK - N


@pytest.mark.parametrize("as_array", [False, True])
def test_load_refuses_a_block_id_given_twice_and_writes_nothing(as_array: bool) -> None:
    engine, caches, _ = _engine()
    with engine:
        tokens = list(range(2 * CHUNK))
        engine.save(tokens, list(range(8)))
        dst = [40, 41, 42, 43, 44, 45, 46, 41]
        before = [c.clone() for c in caches]
        with pytest.raises(KVortexError, match=r"block_ids\[1\] and block_ids\[7\] are both block 41"):
            engine.load(tokens, np.array(dst) if as_array else dst)
        assert all(torch.equal(a, b) for a, b in zip(before, caches, strict=True))
        assert engine._reg.tiers.cpu_index.open_pins() == []
        assert engine.save(tokens + [1] * CHUNK, list(range(8)) + [3, 3, 3, 3]) == CHUNK  # reads may repeat


def test_contains_refuses_what_is_not_a_sequence_of_keys() -> None:
    engine, _, _ = _engine()
    with engine:
        keys = engine.keys(list(range(2 * CHUNK)))
        engine.save(list(range(2 * CHUNK)), list(range(8)))
        assert engine.contains(keys) == 0b11
        with pytest.raises(KVortexError, match="got one bytes; pass \\[key\\]"):
            engine.contains(keys[0])
        with pytest.raises(KVortexError, match=r"keys\[1\] = 'abc' is a str"):
            engine.contains([keys[0], "abc"])


def test_a_save_that_skips_chunks_another_thread_is_saving_returns_once_they_are_indexed() -> None:
    engine, _, _ = _engine()
    with engine:
        tiers = engine._reg.tiers
        tokens, go = list(range(2 * CHUNK)), threading.Event()
        commit = tiers.commit_save

        def slow_commit(leases: Any, *rest: Any) -> Any:  # thread A's copies "take long"
            go.wait(10)
            return commit(leases, *rest)

        tiers.commit_save = slow_commit
        a = threading.Thread(target=engine.save, args=(tokens, list(range(8))))
        a.start()
        while not tiers._saving:  # A reserved its chunks
            time.sleep(0.001)
        seen: list[int] = []

        def save_b() -> None:
            seen.append(engine.save(tokens, list(range(8, 16))))
            seen.append(engine.lookup(tokens))

        b = threading.Thread(target=save_b)
        b.start()
        time.sleep(0.2)
        assert b.is_alive() and not seen, "B waits for A's chunks instead of returning at once"
        go.set()
        a.join(10)
        b.join(10)
        assert seen == [0, 2 * CHUNK], "B stored nothing itself, yet every chunk is visible when it returns"


def test_wait_layer_refuses_a_layer_outside_the_registered_ones() -> None:
    engine, caches, block = _engine()
    with engine:
        tokens = list(range(CHUNK))
        engine.save(tokens, list(range(4)))
        with engine.load_layerwise(tokens, list(range(40, 44))) as pending:
            for layer in (-1, L, L + 5, True, 0.0):
                with pytest.raises(KVortexError, match=rf"layer must be an int in \[0, {L}\)"):
                    pending.wait_layer(layer)  # type: ignore[arg-type]
            for layer in range(L):
                pending.wait_layer(layer)
        assert _same_blocks(caches, block, list(range(4)), list(range(40, 44)))


@pytest.mark.parametrize(
    ("blocks", "match"),
    [
        (None, "1-D sequence of ints .* got NoneType"),
        ("abcd", "got str"),
        ({0: 1}, "got dict"),
        ((i for i in range(4)), "got generator"),
        ([0, 1, 2**70, 3], r"block_ids\[2\] = 1180591620717411303424 is out of range"),
        ([0, 2**63, 2, 3], r"block_ids\[1\] = 9223372036854775808 is out of range"),  # numpy: float64
    ],
)
def test_block_ids_that_are_no_sequence_of_ints_are_named(blocks: Any, match: str) -> None:
    engine, _, _ = _engine()
    with engine:
        with pytest.raises(KVortexError, match=match):
            engine.save(list(range(CHUNK)), blocks)
        assert engine.lookup(list(range(CHUNK))) == 0


def test_registering_another_layout_names_what_changed() -> None:
    engine, _, _ = _engine()
    with engine, pytest.raises(LayoutError, match=rf"another layout \(num_blocks {B} -> {B + 1}\)"):
        engine.register_kv_caches([torch.zeros(2, B + 1, N, H, D, dtype=torch.bfloat16) for _ in range(L)])


def test_re_registering_one_memory_order_viewed_another_way_is_accepted() -> None:
    """With one KV head, (2, B, 1, N, D) transposed to (2, B, N, 1, D) is the same memory as a
    plain (2, B, N, 1, D) tensor, but the size-1 dimension's arbitrary stride gave it another
    stride order, and re-registering a re-allocated cache was refused (a red-team finding)."""
    first = [torch.zeros(2, B, N, 1, D, dtype=torch.float16) for _ in range(L)]
    again = [torch.zeros(2, B, 1, N, D, dtype=torch.float16).transpose(2, 3) for _ in range(L)]
    engine, _, _ = _engine(first)
    with engine:
        assert engine.register_kv_caches(again).stride_order == "KBNHD"
        tokens = list(range(CHUNK))
        again[0][:, :4] = 1.5
        assert engine.save(tokens, [0, 1, 2, 3]) == CHUNK
        assert engine.load(tokens, [4, 5, 6, 7]) == CHUNK
        assert torch.equal(again[0][:, 4:8], again[0][:, :4])


@pytest.mark.parametrize("op", ["save_async", "load_async"])
def test_an_async_call_racing_close_raises_kvortex_error(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() may shut the executor down between the call's open check and its submit: the
    caller still gets KVortexError, not the executor's RuntimeError."""
    engine, _, _ = _engine()
    engine.close()
    real, calls = KVortexEngine._check_accepting, []

    def open_at_first(self: KVortexEngine) -> None:  # the check ran just before close()
        calls.append(1)
        if len(calls) > 1:
            real(self)

    monkeypatch.setattr(KVortexEngine, "_check_accepting", open_at_first)
    with pytest.raises(KVortexError, match="closed"):
        getattr(engine, op)(list(range(CHUNK)), list(range(4)))
    assert len(calls) == 2


def test_close_lets_accepted_async_saves_finish(tmp_path: Any) -> None:
    """close() (leaving the with-block) runs every save_async it accepted; later calls are refused."""
    tiers = _cpu_and_disk(tmp_path)
    caches, hints, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16)
    prompts = [[p * 1000 + i for i in range(2 * CHUNK)] for p in range(12)]
    with KVortexEngine.create(_config(tiers=tiers)) as engine:
        engine.register_kv_caches(caches, hints)
        handles = [engine.save_async(t, list(range(p * 8, p * 8 + 8))) for p, t in enumerate(prompts)]
    assert [h.wait(30) for h in handles] == [2 * CHUNK] * len(prompts)
    with pytest.raises(KVortexError, match="closed"):
        engine.save_async(prompts[0], list(range(8)))
    with pytest.raises(KVortexError, match="closed"):
        engine.load(prompts[0], list(range(8)))
    with KVortexEngine.create(_config(tiers=tiers)) as again:  # every accepted save reached the disk tier
        again.register_kv_caches(caches, hints)
        assert [again.lookup(t) for t in prompts] == [2 * CHUNK] * len(prompts)


def test_stats_say_why_a_tier_is_out_of_service(tmp_path: Any) -> None:
    tiers = _cpu_and_disk(tmp_path)
    with _engine(tiers=tiers)[0] as owner, _engine(tiers=tiers)[0] as second:
        assert owner.stats()["tiers"]["disk"]["state"] == "closed"
        down = second.stats()["tiers"]["disk"]
        assert down["state"] == "open"
        assert f"in use by another engine (pid {os.getpid()} on " in down["last_error"]


def test_an_engine_dropped_without_close_frees_its_disk_directory(tmp_path: Any) -> None:
    """A notebook cell re-run (or an exception before close()): the dropped engine's tiers are
    closed in the background once it is collected, so the next engine owns the disk directory
    and finds what the first one wrote."""
    import gc
    import weakref

    tiers = _cpu_and_disk(tmp_path)
    caches, hints, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16)
    tokens = list(range(5000, 5000 + 2 * CHUNK))
    first = KVortexEngine.create(_config(tiers=tiers))
    first.register_kv_caches(caches, hints)
    assert first.save(tokens, list(range(8))) == 2 * CHUNK
    mgr = weakref.proxy(first._reg.tiers)  # type: ignore[union-attr]
    assert mgr.drain(30)
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None
    def running() -> bool:
        try:
            return bool(mgr.loop.running)  # stopped last, after the backends closed
        except ReferenceError:  # closed and collected already (the proxy outlived it)
            return False

    deadline = time.monotonic() + 10
    while running():
        assert time.monotonic() < deadline, "the dropped engine's tiers were never closed"
        time.sleep(0.02)
    with KVortexEngine.create(_config(tiers=tiers)) as again:
        again.register_kv_caches(caches, hints)
        assert again.stats()["tiers"] == {"disk": {"state": "closed", "last_error": ""}}
        assert again.lookup(tokens) == 2 * CHUNK


@pytest.mark.parametrize("policy", ["lru", "s3fifo", "prefix-lru"])
def test_a_save_larger_than_the_tier_keeps_its_head(policy: str) -> None:
    """A prompt of more chunks than the cpu tier keeps: its first chunks stay, its tail is
    dropped, and save() counts only what was indexed (it used to evict its own head under lru)."""
    caches, hints, block = ks.flash_attn(1, 80, N, 1, 16, torch.float16)
    payload = 2 * CHUNK * 16 * 2
    slots = 10
    config = _config(eviction={"policy": policy},
                     tiers={"cpu": {"type": "cpu", "capacity": slots * (payload + 4096)}})
    with KVortexEngine.create(config) as engine:
        engine.register_kv_caches(caches, hints)
        n = 17
        tokens = list(range(n * CHUNK))
        saved = engine.save(tokens, list(range(n * CHUNK // N)))
        assert 0 < saved < n * CHUNK
        assert engine.lookup(tokens) == saved  # what it stored is a loadable prefix
        mask = engine.contains(engine.keys(tokens))
        assert mask == (1 << (saved // CHUNK)) - 1  # the head, nothing after a hole
        dst = list(range(40, 40 + saved // N))
        assert engine.load(tokens[:saved], dst) == saved
        assert all(torch.equal(block(caches, 0, 40 + i), block(caches, 0, i)) for i in range(saved // N))
        assert engine.stats()["counters"]["save_skipped_pool_full"]  # the dropped tail is counted


def test_repeated_block_ids_given_as_tensor_elements_are_refused() -> None:
    """``list(block_table_row)`` holds 0-d tensors: a repeated id there must be caught like an int."""
    engine, caches, _ = _engine()
    with engine:
        tokens = list(range(2 * CHUNK))
        engine.save(tokens, list(range(8)))
        before = caches[0].clone()
        with pytest.raises(KVortexError, match=r"block_ids\[0\] and block_ids\[4\] are both block 20"):
            engine.load(tokens, list(torch.tensor([20, 21, 22, 23, 20, 24, 25, 26])))
        assert torch.equal(caches[0], before)
        assert engine.load(tokens, list(torch.arange(40, 48))) == 2 * CHUNK  # distinct tensor ids: fine


@pytest.mark.parametrize(("rank", "world_size", "match"), [
    (3, 2, r"rank=3 must be in \[0, world_size=2\)"), ("0", 1, "rank='0' must be an int"),
    (1.0, 2, "rank=1.0 must be an int"), (0, 0, "world_size=0 must be >= 1"), (-1, 2, "rank=-1"),
    (True, 2, "rank=True must be an int"),
])
def test_rank_and_world_size_are_checked(rank: Any, world_size: Any, match: str) -> None:
    with pytest.raises(KVortexError, match=match):
        KVortexEngine.create(_config(), rank=rank, world_size=world_size)


@pytest.mark.parametrize("bad", [None, 3, "0123"])
def test_async_calls_and_contains_refuse_non_sequences(bad: Any) -> None:
    engine, _, _ = _engine()
    with engine:
        tokens = list(range(CHUNK))
        with pytest.raises(KVortexError, match="block_ids"):
            engine.save_async(tokens, bad)
        with pytest.raises(KVortexError, match="block_ids"):
            engine.load_async(tokens, bad)
        if bad is not None and not isinstance(bad, str):
            with pytest.raises(KVortexError, match="contains takes a sequence of keys"):
                engine.contains(bad)
        with pytest.raises(KVortexError, match="contains takes a sequence of keys"):
            engine.contains(None)


def test_a_chunk_larger_than_the_cpu_tier_names_chunk_tokens() -> None:
    """chunk_tokens=10**9 (a typo): a ConfigError naming it at registration, not torch's
    allocator error from sizing the staging buffers for such a chunk."""
    from kvortex_core.errors import ConfigError

    with KVortexEngine.create(_config(chunk_tokens=10**9)) as engine, \
            pytest.raises(ConfigError, match="lower chunk_tokens"):
        engine.register_kv_caches(*ks.flash_attn(L, B, N, H, D, torch.bfloat16)[:2])


def test_a_load_racing_a_demotion_into_a_lower_tier_keeps_the_chunk(tmp_path: Any) -> None:
    """cpu -> disk d1 -> disk d2: a chunk demoted into d2 is indexed there before its value lands
    (d2 first deletes its own victims; slowed here to widen the window). A load meanwhile finds
    no value: a miss that must keep the entry. It dropped it, and the put, landing on a key no
    index counted, deleted the chunk everywhere. Fault injected: d2's deletes take 1 s."""
    import asyncio

    ct = 16
    value = 4096 + 2 * ct * 16 * 2
    config = _config(chunk_tokens=ct, eviction={"policy": "lru"}, tiers={
        "cpu": {"type": "cpu", "capacity": 4 * 8192},
        "d1": {"type": "disk", "capacity": 3 * value, "path": str(tmp_path / "d1"), "fsync": False},
        "d2": {"type": "disk", "capacity": 3 * value, "path": str(tmp_path / "d2"), "fsync": False}})
    with KVortexEngine.create(config) as engine:
        engine.register_kv_caches([torch.randn(2, 64, ct, 1, 16, dtype=torch.float16)])
        tiers = engine._reg.tiers
        d2 = tiers.tiers[1]
        real_delete = d2.backend.delete

        async def slow_delete(keys: Any) -> Any:
            await asyncio.sleep(1.0)
            return await real_delete(keys)

        d2.backend.delete = slow_delete
        prompts: dict[bytes, list[int]] = {}
        found = None
        for i in range(60):
            tokens = [1000 * i + j for j in range(ct)]
            prompts[engine.keys(tokens)[0]] = tokens
            engine.save(tokens, [i % 60])
            for _ in range(20):  # a key indexed in d2 whose value has not landed yet
                time.sleep(0.01)
                found = next((k for k in list(d2.index.keys())
                              if k in prompts and k.hex() not in d2.backend._index), None)
                if found is not None:
                    break
            if found is not None:
                break
        assert found is not None, "the demotion window was not hit"
        engine.load(prompts[found], [63])  # the racing load: a miss, or the chunk
        assert tiers.drain(30)
        assert engine.lookup(prompts[found]) == ct  # still stored somewhere
        assert engine.load(prompts[found], [62]) == ct


def test_calls_and_tier_operations_fill_latency_histograms(tmp_path: Any) -> None:
    """docs/observability.md promises kvortex_<op>_seconds histograms: whole save/load calls
    (engine-wide) and each lower-tier operation (per tier). None was recorded before."""
    tiers = _cpu_and_disk(tmp_path)
    caches, hints, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16)
    tokens = list(range(500, 500 + 2 * CHUNK))
    with KVortexEngine.create(_config(tiers=tiers)) as first:
        first.register_kv_caches(caches, hints)
        assert first.save(tokens, list(range(8))) == 2 * CHUNK
        first.close()  # drains the write-behind: both puts are done
        saved = first.stats()["histograms"]
    assert saved["engine_save"][""]["count"] == 1 and saved["engine_save"][""]["sum"] > 0
    assert saved["tier_put"]["disk"]["count"] == 2  # one write per chunk
    with KVortexEngine.create(_config(tiers=tiers)) as engine:  # the chunks are on disk only
        engine.register_kv_caches(caches, hints)
        assert engine.load(tokens, list(range(20, 28))) == 2 * CHUNK
        loaded = engine.stats()["histograms"]
    assert _same_blocks(caches, block, list(range(8)), list(range(20, 28)))
    assert loaded["engine_load"][""]["count"] == 1 and loaded["engine_load"][""]["sum"] > 0
    assert loaded["tier_get"]["disk"]["count"] == 2  # one read per chunk


def test_a_call_that_raises_is_counted_timed_and_counted_as_an_error() -> None:
    """A save or load that raised added to engine_*_calls but not to the histogram (the two
    drifted apart) and nothing counted the failures (a red-team finding)."""
    engine, _, _ = _engine()
    with engine:
        tokens = list(range(2 * CHUNK))
        with pytest.raises(KVortexError):
            engine.save(tokens, [0, 1, 2, 3, 4, 5, 6, 10_000_000])  # a block id out of range
        assert engine.save(tokens, list(range(2 * CHUNK // N))) == 2 * CHUNK
        with pytest.raises(KVortexError):
            engine.load(tokens, [20, 21, 22, 23, 24, 25, 26, 10_000_000])
        stats = engine.stats()
    c, h = stats["counters"], stats["histograms"]
    assert c["engine_save_calls"][""] == 2 and c["engine_save_errors"][""] == 1
    assert c["engine_load_calls"][""] == 1 and c["engine_load_errors"][""] == 1
    assert h["engine_save"][""]["count"] == 2 and h["engine_load"][""]["count"] == 1


def test_every_metric_the_engine_serves_is_documented(tmp_path: Any) -> None:
    """Each family an engine with cpu + disk tiers serves at ``metrics_url`` is named in
    docs/observability.md (``kvortex_tier_open_seconds`` was served and not documented: a
    red-team finding), and the url is where it serves (port 0 picks one)."""
    import re
    import urllib.request
    from pathlib import Path

    from prometheus_client.parser import text_string_to_metric_families

    doc = (Path(__file__).resolve().parents[2] / "docs" / "observability.md").read_text()
    documented = set(re.findall(r"`(kvortex_[a-z0-9_]+)`", doc))
    caches, hints, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16)
    tokens = list(range(900, 900 + 2 * CHUNK))
    with KVortexEngine.create(_config(tiers=_cpu_and_disk(tmp_path),
                                      metrics={"enabled": True, "port": 0})) as engine:
        engine.register_kv_caches(caches, hints)
        engine.save(tokens, list(range(8)))
        assert engine.load(tokens, list(range(20, 28))) == 2 * CHUNK
        url = engine.metrics_url
        assert url is not None and url.startswith("http://127.0.0.1:") and ":0/" not in url
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    assert engine.metrics_url is None  # closed with the engine
    served = set()
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            name = re.sub(r"_(bucket|count|sum|created)$", "", sample.name)
            if fam.type == "counter" and not name.endswith("_total"):
                name += "_total"
            served.add(name)
    assert len(served) > 50
    assert served <= documented, sorted(served - documented)


def test_lookup_counts_chunks_per_tier(tmp_path: Any) -> None:
    """kvortex_{lookup,hit,miss}_chunks_total carry a tier label per tier index (documented,
    and only the request-level "" totals were recorded)."""
    tiers = _cpu_and_disk(tmp_path)
    caches, hints, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16)
    tokens = list(range(700, 700 + 2 * CHUNK))
    with KVortexEngine.create(_config(tiers=tiers)) as first:
        first.register_kv_caches(caches, hints)
        first.save(tokens, list(range(8)))
    with KVortexEngine.create(_config(tiers=tiers)) as engine:  # on disk only
        engine.register_kv_caches(caches, hints)
        assert engine.lookup(tokens + list(range(CHUNK))) == 2 * CHUNK
        counters = engine.stats()["counters"]
    assert counters["lookup_chunks"] == {"": 3, "cpu": 3, "disk": 3}
    assert counters["hit_chunks"] == {"": 2, "cpu": 0, "disk": 2}
    assert counters["miss_chunks"] == {"": 1, "cpu": 3, "disk": 1}


@pytest.mark.parametrize("gather", ["auto", "rows", "layers"])
@pytest.mark.parametrize("made", ["requires_grad", "inference_mode"])
def test_caches_that_require_grad_or_are_inference_tensors_save_and_load_byte_for_byte(
        gather: str, made: str) -> None:
    """KV tensors made under torch.inference_mode() (as a serving engine makes them) or that
    require grad, registered in or out of inference mode, saved and loaded by calls in and out of
    it and from the engine's threads (load_async): every plan, byte for byte. The per-layer plan
    wrote through the caller's tensors (autograd refused the out= kernel; an inference tensor
    refused the in-place scatter outside inference mode), and tensors the engine made while the
    caller was in inference mode could not be written by its threads."""
    def make() -> Any:
        return ks.flash_attn(L, B, N, H, D, torch.float32, seed=8)

    with torch.inference_mode(made == "inference_mode"):
        caches, hints, block = make()
    if made == "requires_grad":
        caches = [c.requires_grad_() for c in caches]
    tokens = list(range(300, 300 + 2 * CHUNK))
    engine = KVortexEngine.create(_config(transfer={"gather": gather}))
    with engine:
        with torch.inference_mode(made == "inference_mode"):
            engine.register_kv_caches(caches, hints)
            assert engine.save(tokens, list(range(8))) == 2 * CHUNK
            assert engine.load(tokens, list(range(20, 28))) == 2 * CHUNK
        assert engine.load_async(tokens, list(range(40, 48))).wait() == 2 * CHUNK
        assert engine.load(tokens, list(range(60, 68))) == 2 * CHUNK
    with torch.no_grad():
        for dst in (20, 40, 60):
            assert _same_blocks(caches, block, list(range(8)), list(range(dst, dst + 8)))


def test_a_read_only_mapping_of_layers_registers_like_a_dict() -> None:
    """A MappingProxyType (or any Mapping) of name -> tensor: detected and registered as a dict
    (registration iterated its keys as tensors: AttributeError)."""
    import types

    caches, hints, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=9)
    named = types.MappingProxyType({f"model.layers.{i}.self_attn.attn": c for i, c in enumerate(caches)})
    engine, _, _ = _engine(named, hints)
    with engine:
        tokens = list(range(CHUNK))
        assert engine.save(tokens, [0, 1, 2, 3]) == CHUNK
        assert engine.load(tokens, [10, 11, 12, 13]) == CHUNK
    assert _same_blocks(caches, block, [0, 1, 2, 3], [10, 11, 12, 13])


def test_create_takes_a_mapping_of_config_fields_and_names_anything_else() -> None:
    fields = {"model_id": "test/model", "chunk_tokens": CHUNK, "tiers": {"cpu": {"type": "cpu", "capacity": "2MiB"}}}
    caches, hints, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16)
    with KVortexEngine.create(fields) as engine:  # was: AttributeError: 'dict' object has no attribute
        assert engine.config.chunk_tokens == CHUNK and engine.config.model_id == "test/model"
        engine.register_kv_caches(caches, hints)
        tokens = list(range(2 * CHUNK))
        assert engine.save(tokens, list(range(2 * CHUNK // N))) == 2 * CHUNK  # N tokens per block
        assert engine.lookup(tokens) == 2 * CHUNK
    with pytest.raises(TypeError, match="config is a str; pass a KVortexConfig, a mapping of its fields"):
        KVortexEngine.create("kvortex.yaml")  # type: ignore[arg-type]
