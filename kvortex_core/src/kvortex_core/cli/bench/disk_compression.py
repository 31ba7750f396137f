"""Lossless compression of KV payloads: ratio and speed of lz4 / zstd on bf16 KV-like data.

Three inputs of the canonical chunk layout ``[layers, K/V, tokens, heads, head_size]`` in bf16:
- ``normal``: i.i.d. N(0, 1) values (the worst realistic case: full mantissa entropy);
- ``kv-like``: keys with per-channel scales (log-normal) and a few outlier channels, values
  N(0, 0.5) — the shape of real attention K/V statistics (keys carry large per-channel
  outliers, values are small and centred);
- ``padded``: kv-like with the last quarter of the tokens zero (a partial chunk).
Speeds are single-threaded GB/s of the uncompressed size.
"""

from __future__ import annotations

import time
from typing import Any

MiB = 1024 * 1024


def kv_like(nbytes: int, kind: str, seed: int = 0) -> bytes:
    """``nbytes`` of bf16 data of one of the kinds above."""
    import torch

    g = torch.Generator().manual_seed(seed)
    heads, head_size = 8, 128
    tokens = max(1, nbytes // 2 // (2 * heads * head_size))
    shape = (1, 2, tokens, heads, head_size)
    if kind == "normal":
        t = torch.randn(shape, generator=g)
    else:
        t = torch.empty(shape)
        scales = torch.exp(torch.randn(heads, head_size, generator=g) * 0.7)
        outliers = torch.randint(0, head_size, (heads, 4), generator=g)
        scales.scatter_(1, outliers, 20.0)
        t[:, 0] = torch.randn((1, tokens, heads, head_size), generator=g) * scales
        t[:, 1] = torch.randn((1, tokens, heads, head_size), generator=g) * 0.5
        if kind == "padded":
            t[:, :, tokens * 3 // 4 :] = 0
    return t.to(torch.bfloat16).view(torch.uint8).flatten().numpy().tobytes()[:nbytes]


def _codecs() -> dict[str, tuple[Any, Any]]:
    import lz4.block
    import zstandard

    z1, z3 = zstandard.ZstdCompressor(level=1), zstandard.ZstdCompressor(level=3)
    dz = zstandard.ZstdDecompressor()
    return {
        "lz4": (
            lambda b: lz4.block.compress(b, store_size=False),
            lambda c, n: lz4.block.decompress(c, uncompressed_size=n),
        ),
        "zstd-1": (z1.compress, lambda c, n: dz.decompress(c, max_output_size=n)),
        "zstd-3": (z3.compress, lambda c, n: dz.decompress(c, max_output_size=n)),
    }


def _median_s(fn: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_compression(size_mib: float = 8, reps: int = 5) -> list[dict[str, Any]]:
    """Rows of data kind, codec, ratio (raw/compressed), compress and decompress GB/s."""
    n = int(size_mib * MiB)
    rows = []
    for kind in ("normal", "kv-like", "padded"):
        data = kv_like(n, kind)
        for name, (comp, decomp) in _codecs().items():
            packed = comp(data)
            assert decomp(packed, n) == data, f"{name} is not lossless on {kind}"
            c = _median_s(lambda comp=comp, data=data: comp(data), reps)
            d = _median_s(lambda decomp=decomp, packed=packed: decomp(packed, n), reps)
            rows.append(
                {
                    "data": kind,
                    "codec": name,
                    "ratio": n / len(packed),
                    "compress_gbps": n / c / 1e9,
                    "decompress_gbps": n / d / 1e9,
                }
            )
    return rows
