"""KVortexEngine on CUDA with a pinned pool: byte-exact round trips, async overlap, cross-layout."""

from __future__ import annotations

import pytest
import torch

from kvortex_core import KVortexConfig, KVortexEngine
from kvortex_core.data import kv_samples as ks

pytestmark = pytest.mark.gpu

L, B, N, H, D, CHUNK = 4, 256, 16, 8, 128, 256


def _config() -> KVortexConfig:
    return KVortexConfig(model_id="gpu/test", chunk_tokens=CHUNK,
                         tiers={"cpu": {"type": "cpu", "capacity": "256MiB"}})


@pytest.mark.parametrize("name", ["flash_attn_nhd", "flash_attn_hnd", "unified_BLNHC", "cross_layer"])
def test_engine_roundtrip_on_cuda(name: str) -> None:
    caches, hints, block = ks.all_layouts(L, B, N, H, D, torch.bfloat16, seed=3, device="cuda")[name]
    with KVortexEngine.create(_config()) as engine:
        engine.register_kv_caches(caches, hints)
        assert engine.stats()["pool"]["pinned"]
        tokens = list(range(3 * CHUNK))
        src = torch.randperm(B // 2)[: 3 * CHUNK // N].tolist()
        dst = (torch.randperm(B // 2) + B // 2)[: 3 * CHUNK // N].tolist()
        assert engine.save(tokens, src) == 3 * CHUNK
        assert engine.load(tokens, dst) == 3 * CHUNK
        torch.cuda.synchronize()
        for s, d in zip(src, dst, strict=True):
            assert all(torch.equal(block(caches, layer, d), block(caches, layer, s)) for layer in range(L))


def test_async_save_and_load_overlap_correctly() -> None:
    caches, _, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=4, device="cuda")
    with KVortexEngine.create(_config()) as engine:
        engine.register_kv_caches(caches)
        a, b = list(range(2 * CHUNK)), list(range(10_000, 10_000 + 2 * CHUNK))
        engine.save(a, list(range(32)))
        hs = engine.save_async(b, list(range(32, 64)))
        hl = engine.load_async(a, list(range(64, 96)))
        assert hs.wait(30) == 2 * CHUNK and hl.wait(30) == 2 * CHUNK
        assert engine.load(b, list(range(96, 128))) == 2 * CHUNK
        torch.cuda.synchronize()
        for s, d in [*zip(range(32), range(64, 96), strict=True), *zip(range(32, 64), range(96, 128), strict=True)]:
            assert all(torch.equal(block(caches, layer, d), block(caches, layer, s)) for layer in range(L))


@pytest.mark.parametrize("gather", ["auto", "rows", "layers"])
def test_inference_tensors_registered_in_inference_mode_serve_calls_from_every_thread(gather: str) -> None:
    """As a serving engine: the KV cache made and registered under torch.inference_mode(), the
    first save (arena, row tables made lazily) inside it, then loads from the engine's threads
    (load_async) and from outside inference mode, byte-exact on CUDA for every plan."""
    with torch.inference_mode():
        caches, hints, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=6, device="cuda")
        engine = KVortexEngine.create(KVortexConfig(model_id="gpu/test", chunk_tokens=CHUNK, transfer={"gather": gather},
                                                    tiers={"cpu": {"type": "cpu", "capacity": "256MiB"}}))
        engine.register_kv_caches(caches, hints)
        tokens = list(range(2 * CHUNK))
        assert engine.save(tokens, list(range(32))) == 2 * CHUNK
    with engine:
        assert engine.load_async(tokens, list(range(64, 96))).wait() == 2 * CHUNK
        assert engine.load(tokens, list(range(128, 160))) == 2 * CHUNK
        with torch.inference_mode():
            assert engine.load_async(tokens, list(range(192, 224))).wait() == 2 * CHUNK
    torch.cuda.synchronize()
    for dst in (64, 128, 192):
        assert all(torch.equal(block(caches, layer, dst + i), block(caches, layer, i))
                   for i in range(32) for layer in range(L))
