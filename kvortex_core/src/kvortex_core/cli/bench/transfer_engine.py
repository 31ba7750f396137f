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
                hints: dict[str, Any] | None, gather: str = "auto") -> Any:
    """An engine whose cpu tier holds two copies of the largest sequence (no eviction in a rep)."""
    from kvortex_core import KVortexConfig, KVortexEngine

    slot = layout.chunk_bytes(CHUNK_TOKENS) + 8192
    capacity = slot * (2 * (max_tokens // CHUNK_TOKENS) + 8)
    config = KVortexConfig(model_id="bench/model", chunk_tokens=CHUNK_TOKENS,
                           tiers={"cpu": {"type": "cpu", "capacity": capacity}},
                           eviction={"high_watermark": 1.0},
                           transfer={"staging_bytes": staging, "gather": gather})
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
    nbytes = layout.chunk_bytes(tokens)
    raw = tp.RawCopier(nbytes, device)
    save_s, sealed_s, raw_d2h, saved = [], [], [], []
    tp.settle()
    for i, seq in enumerate(seqs):
        if i % 2:  # a raw copy right before or after each save (alternating): same machine state
            raw_t = tp.once(raw.d2h, device)
        tp.sync(device)
        t0 = time.perf_counter()
        saved.append(engine.save(seq, blocks))
        t1 = time.perf_counter()  # save() returns once every copy completed (see tp.once)
        tp.sync(device)
        engine.contains(engine.keys(seq))  # waits for this save's background seals
        t2 = time.perf_counter()
        if not i % 2:
            raw_t = tp.once(raw.d2h, device)
        if i:  # the first is a warm-up
            save_s.append(t1 - t0)
            sealed_s.append(t2 - t0)
            raw_d2h.append(raw_t)
    loaded: list[int] = []
    load_s, raw_h2d = tp.paired(lambda: loaded.append(engine.load(seqs[-1], other)), raw.h2d, device, reps,
                                complete=True)
    if any(n != tokens for n in saved + loaded):  # fewer bytes moved than the ratio assumes
        raise RuntimeError(f"engine saved {saved} and loaded {loaded} tokens, not {tokens} each; "
                           "the cpu tier is too small for this benchmark")
    return {
        "save": Measurement("engine save", save_s, nbytes),
        "save_sealed": Measurement("engine save+seal", sealed_s, nbytes),
        "load": Measurement("engine load", load_s, nbytes),
        "raw_save": Measurement("raw d2h (paired)", raw_d2h, nbytes),
        "raw_load": Measurement("raw h2d (paired)", raw_h2d, nbytes),
        "raw_pool": _raw_pool(engine, raw, device, reps),
        "diag": {"saved_tokens": saved, "loaded_tokens": loaded[-1:], "tokens": tokens},
    }


STREAM_CALLS = 4


def engine_stream(engine: Any, shape: tp.Shape, tokens: int, layout: KVLayout, reps: int,
                  calls: int = STREAM_CALLS) -> dict[str, Any]:
    """``calls`` saves of fresh sequences back to back (each returns once its bytes are off the
    GPU, the next starts at once), then as many loads of a stored sequence, against as many raw
    copies back to back, each drained before the next (as a serving engine saves and loads every
    step). Unlike :func:`engine_case`, no raw copy and no idle pause sits between two of our
    calls, so only the first call of a burst finds the host cold.
    """
    device = torch.device(layout_device(engine))
    blocks = random.Random(tokens + 3).sample(range(layout.num_blocks), tokens // shape.block)
    other = random.Random(tokens + 11).sample(range(layout.num_blocks), tokens // shape.block)
    seqs = iter([[_sequence(tokens, tokens * 1000 + 10 * i + j) for j in range(calls)] for i in range(reps + 1)])
    nbytes = layout.chunk_bytes(tokens)
    raw = tp.RawCopier(nbytes, device)
    saved: list[int] = []
    last: list[list[int]] = []

    def save_burst() -> None:
        burst = next(seqs)
        saved.extend(engine.save(seq, blocks) for seq in burst)
        last[:] = [burst[-1]]

    def raw_burst(copy: Any) -> None:
        for _ in range(calls):
            copy()
            tp.sync(device)

    save_s, raw_d2h = tp.paired(save_burst, lambda: raw_burst(raw.d2h), device, reps, complete=True)
    loaded: list[int] = []
    load_s, raw_h2d = tp.paired(lambda: loaded.extend(engine.load(last[0], other) for _ in range(calls)),
                                lambda: raw_burst(raw.h2d), device, reps, complete=True)
    if any(n != tokens for n in saved + loaded):
        raise RuntimeError(f"engine saved {saved} and loaded {loaded} tokens, not {tokens} each; "
                           "the cpu tier is too small for this benchmark")
    total = calls * nbytes
    return {
        "save": Measurement(f"engine save x{calls}", save_s, total),
        "load": Measurement(f"engine load x{calls}", load_s, total),
        "raw_save": Measurement("raw d2h (paired)", raw_d2h, total),
        "raw_load": Measurement("raw h2d (paired)", raw_h2d, total),
        "diag": {"calls": calls, "tokens": tokens},
    }


def _raw_pool(engine: Any, raw: tp.RawCopier, device: torch.device, reps: int) -> dict[str, Measurement]:
    """Raw copies into the engine's own pinned pool (registered host memory), paired with the
    raw copy into a plain pinned buffer: shows what the pool memory itself costs."""
    nbytes = raw.nbytes
    base = engine._reg.tiers.pool.view(0)
    span = torch.empty(0, dtype=torch.uint8).set_(base.untyped_storage(), base.storage_offset(), (nbytes,))
    gpu = raw.gpu
    d2h, raw_d2h = tp.paired(lambda: span.copy_(gpu, non_blocking=True), raw.d2h, device, reps)
    h2d, raw_h2d = tp.paired(lambda: gpu.copy_(span, non_blocking=True), raw.h2d, device, reps)
    return {"d2h": Measurement("raw d2h pool", d2h, nbytes), "h2d": Measurement("raw h2d pool", h2d, nbytes),
            "raw_d2h": Measurement("raw d2h (paired)", raw_d2h, nbytes),
            "raw_h2d": Measurement("raw h2d (paired)", raw_h2d, nbytes)}


def engine_bidir(engine: Any, shape: tp.Shape, tokens: int, layout: KVLayout, reps: int) -> dict[str, Any]:
    """save_async of new sequences while load_async of a stored one, vs raw copies both ways.

    ``engine`` needs room for ``reps + 4`` sequences (three warm-up reps): a save that has to evict may take chunks of
    the stored sequence before the concurrent load pinned them (the load then moves fewer tokens,
    and this raises rather than report a ratio for bytes that did not move).
    """
    device = torch.device(layout_device(engine))
    blocks = random.Random(1).sample(range(layout.num_blocks), tokens // shape.block)
    other = random.Random(2).sample(range(layout.num_blocks), tokens // shape.block)
    stored = _sequence(tokens, 99)
    engine.save(stored, blocks)
    seqs = iter([_sequence(tokens, 1000 + i) for i in range(reps + 3)])

    moved: list[tuple[int, int]] = []

    def both() -> None:
        hs = engine.save_async(next(seqs), blocks)
        hl = engine.load_async(stored, other)
        moved.append((hs.wait(), hl.wait()))

    nbytes = layout.chunk_bytes(tokens)
    ours_s, raw_s = tp.paired(both, tp.RawCopier(nbytes, device).both, device, reps, warmup=3, complete=True)
    short = [m for m in moved if m != (tokens, tokens)]
    if short:  # a save skipped for want of slots, or an evicted sequence: the ratio would be a lie
        raise RuntimeError(f"engine both directions moved (saved, loaded) tokens {short}, not {tokens} each; "
                           "the cpu tier is too small for this benchmark")
    return {"tokens": tokens, **tp.summary_row("engine both directions", Measurement("engine both", ours_s, 2 * nbytes),
                                               Measurement("raw both (paired)", raw_s, 2 * nbytes))}


def layout_device(engine: Any) -> str:
    reg = engine._reg
    return str(reg.transfer.device)
