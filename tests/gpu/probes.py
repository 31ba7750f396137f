"""The setup the engine probes in tests/gpu share: a Llama-8B or MLA cache, an engine over it,
shuffled block ids, and the raw copier of the same bytes (as ``kvortex bench transfer``).

``PLACE=rising|falling``: per-layer tensors carved from one buffer in layer order or reversed
(one rising or one falling run of layers, whatever the allocator would do).
Not collected by pytest (no ``test_`` prefix); the probes import it from their own folder.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

import kvortex_core.data.transfer as transfer_mod
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence, make_engine
from kvortex_core.data.layouts import KVLayout, detect_layout


@dataclass
class EngineProbe:
    which: str  # "mla" or "llama"
    tokens: int
    unified: bool  # one buffer for all layers (vLLM 0.30+), else a tensor per layer
    shape: tp.Shape
    device: torch.device
    layout: KVLayout
    engine: Any  # KVortexEngine
    blocks: list[int]  # where the saved sequences sit (seed 1)
    other: list[int]  # where loads go (seed 2)
    raw: tp.RawCopier  # the raw copy of the same bytes

    def sequences(self, count: int = 64, seed: int = 1000) -> Iterator[list[int]]:
        """Fresh token sequences (each saves new chunks), made before any timed call."""
        return iter([_sequence(self.tokens, seed + i) for i in range(count)])

    def describe(self) -> str:
        reg = self.engine._reg
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
        return (f"{name} {self.which} {'unified' if self.unified else 'per-layer'} {os.environ.get('PLACE', '')} "
                f"{self.tokens} tokens, gather {reg.transfer.gather_mode}, "
                f"parts {self.engine._parts(self.tokens // 256, reg)}")


def probe_args(argv: list[str], *, unified: bool = True) -> tuple[str, int, bool]:
    """``[mla|llama] [tokens] [unified|per-layer]`` from the command line."""
    which = argv[1] if len(argv) > 1 else "mla"
    tokens = int(argv[2]) if len(argv) > 2 else 8192
    if len(argv) > 3:
        unified = argv[3] == "unified"
    return which, tokens, unified


def engine_probe(which: str = "mla", tokens: int = 8192, unified: bool = True, *,
                 capacity_tokens: int | None = None, staging: int = 64 << 20) -> EngineProbe:
    """A cache of 4x ``tokens`` and an engine with room for ``capacity_tokens`` (8x ``tokens``)."""
    shape = tp.DEEPSEEK_V3 if which == "mla" else tp.LLAMA_8B
    dev = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))  # "cpu": a smoke test of the probe itself
    caches = tp.make_caches(shape, 4 * tokens // shape.block, dev, unified=unified)
    place = os.environ.get("PLACE")  # "rising" / "falling": per-layer tensors carved from one buffer
    if place and not unified:
        buf = torch.stack(caches)
        caches = [buf[i] for i in (range(shape.layers) if place == "rising" else range(shape.layers - 1, -1, -1))]
    hints = {"kv_count": 1} if shape.mla else None
    layout = detect_layout(caches, hints)
    engine = make_engine(caches, layout, capacity_tokens or 8 * tokens, staging, hints)
    blocks = random.Random(1).sample(range(layout.num_blocks), tokens // shape.block)
    other = random.Random(2).sample(range(layout.num_blocks), tokens // shape.block)
    return EngineProbe(which, tokens, unified, shape, dev, layout, engine, blocks, other,
                       tp.RawCopier(layout.chunk_bytes(tokens), dev))


def mark_dmas(record: Callable[[float, Any], None]) -> None:
    """From now on, right before each DMA the transfer engine enqueues, a timing event is recorded
    on the copy stream and ``record(host time, event)`` called (the engine's ``_payload_range`` wrapped)."""
    real_range = transfer_mod._payload_range

    def marked_range(buf: torch.Tensor, u: Any) -> torch.Tensor:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        record(time.perf_counter(), ev)
        return real_range(buf, u)

    transfer_mod._payload_range = marked_range


def gpu_us(fn: Callable[[], Any], reps: int = 50) -> float:
    """Microseconds per call of ``fn`` on the device (CUDA events around ``reps`` calls after one
    warm-up; wall time on CPU, for a smoke test)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) * 1e6 / reps
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / reps


def mark_first_dma() -> list[float]:
    """From now on, the host time right before the first DMA the transfer engine enqueues is
    appended to the returned list while it is empty (``clear()`` it before each call)."""
    real_range = transfer_mod._payload_range
    first: list[float] = []

    def marked_range(buf: torch.Tensor, u: Any) -> torch.Tensor:
        if not first:
            first.append(time.perf_counter())
        return real_range(buf, u)

    transfer_mod._payload_range = marked_range
    return first
