"""The KVortexEngine part of ``kvortex bench transfer``: the full save/load path.

Save = hash the tokens, reserve cpu slots, gather + DMA, checksum and index each chunk;
load = look up, pin slots, DMA + scatter. Both are timed end to end and divided by a raw
pinned copy of the same bytes.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.common import Measurement
from kvortex_core.data.layouts import KVLayout

CHUNK_TOKENS = 256


def make_engine(caches: list[torch.Tensor], layout: KVLayout, max_tokens: int, staging: int,
                hints: dict[str, Any] | None) -> Any:
    """An engine whose cpu tier holds two copies of the largest sequence (no eviction in a rep)."""
    from kvortex_core import KVortexConfig, KVortexEngine

    slot = layout.chunk_bytes(CHUNK_TOKENS) + 8192
    capacity = slot * (2 * (max_tokens // CHUNK_TOKENS) + 8)
    config = KVortexConfig(model_id="bench/model", chunk_tokens=CHUNK_TOKENS,
                           tiers={"cpu": {"type": "cpu", "capacity": capacity}},
                           eviction={"high_watermark": 1.0},
                           transfer={"staging_bytes": staging})
    engine = KVortexEngine.create(config)
    engine.register_kv_caches(caches, hints)
    return engine


def _sequence(tokens: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(128_000) for _ in range(tokens)]


def engine_case(engine: Any, shape: tp.Shape, tokens: int, layout: KVLayout, reps: int) -> dict[str, Any]:
    """Save fresh sequences (one per rep) then load the last one into other shuffled blocks.

    ``save``: until ``save()`` returns (every byte off the GPU, blocks reusable); ``save_sealed``:
    until the chunks are also checksummed and indexed (what a later reader waits for). Seals of
    one rep finish before the next rep starts, so reps do not compete for host memory.
    """
    device = torch.device(layout_device(engine))
    blocks = random.Random(tokens).sample(range(layout.num_blocks), tokens // shape.block)
    other = random.Random(tokens + 7).sample(range(layout.num_blocks), tokens // shape.block)
    seqs = [_sequence(tokens, tokens * 100 + i) for i in range(reps + 1)]
    save_s, sealed_s, saved = [], [], []
    for i, seq in enumerate(seqs):
        tp.sync(device)
        t0 = time.perf_counter()
        saved.append(engine.save(seq, blocks))
        tp.sync(device)
        t1 = time.perf_counter()
        engine.contains(engine.keys(seq))  # waits for this save's background seals
        if i:  # the first is a warm-up
            save_s.append(t1 - t0)
            sealed_s.append(time.perf_counter() - t0)
    loaded: list[int] = []
    load_s = tp.timed(lambda: loaded.append(engine.load(seqs[-1], other)), device, reps)
    nbytes = layout.chunk_bytes(tokens)
    return {
        "save": Measurement("engine save", save_s, nbytes),
        "save_sealed": Measurement("engine save+seal", sealed_s, nbytes),
        "load": Measurement("engine load", load_s, nbytes),
        "raw_pool": _raw_pool(engine, nbytes, device, reps),
        "diag": {"saved_tokens": saved, "loaded_tokens": loaded[-1:], "tokens": tokens},
    }


def _raw_pool(engine: Any, nbytes: int, device: torch.device, reps: int) -> dict[str, Measurement]:
    """Raw copies into the engine's own pinned pool (registered host memory), for comparison."""
    base = engine._reg.tiers.pool.view(0)
    span = torch.empty(0, dtype=torch.uint8).set_(base.untyped_storage(), base.storage_offset(), (nbytes,))
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return {
        "d2h": Measurement("raw d2h pool", tp.timed(lambda: span.copy_(gpu, non_blocking=True), device, reps), nbytes),
        "h2d": Measurement("raw h2d pool", tp.timed(lambda: gpu.copy_(span, non_blocking=True), device, reps), nbytes),
    }


def engine_bidir(engine: Any, shape: tp.Shape, tokens: int, layout: KVLayout, reps: int) -> dict[str, Any]:
    """save_async of new sequences while load_async of a stored one, vs raw copies both ways."""
    device = torch.device(layout_device(engine))
    blocks = random.Random(1).sample(range(layout.num_blocks), tokens // shape.block)
    other = random.Random(2).sample(range(layout.num_blocks), tokens // shape.block)
    stored = _sequence(tokens, 99)
    engine.save(stored, blocks)
    seqs = iter([_sequence(tokens, 1000 + i) for i in range(reps + 1)])

    def both() -> None:
        hs = engine.save_async(next(seqs), blocks)
        hl = engine.load_async(stored, other)
        hs.wait()
        hl.wait()

    nbytes = layout.chunk_bytes(tokens)
    ours = Measurement("engine both", tp.timed(both, device, reps), 2 * nbytes)
    raw = tp.raw_copy(nbytes, device, reps)["bidir"]
    return {"tokens": tokens, **tp.summary_row("engine both directions", ours, raw)}


def layout_device(engine: Any) -> str:
    reg = engine._reg
    return str(reg.transfer.device)
