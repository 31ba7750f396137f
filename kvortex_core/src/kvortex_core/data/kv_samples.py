"""Sample KV caches in every supported layout, for tests, GPU verification and benchmarks.

Each builder returns ``(kv_caches, hints, block_fn)`` where ``block_fn(kv_caches, layer, block)``
returns that block's ``[K, N, H, D]`` content, computed independently of kvortex's views
(from the physical tensor via the documented shape), so tests compare against a reference
that does not share code with the code under test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BlockFn = Callable[[Any, int, int], torch.Tensor]
Built = tuple[Any, dict[str, Any] | None, BlockFn]


def _rand(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, device: str) -> torch.Tensor:
    if dtype.is_floating_point and torch.empty((), dtype=dtype).element_size() == 1:
        raw = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        return raw.view(dtype).to(device)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def flash_attn(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, *, hnd: bool = False,
               seed: int = 0, device: str = "cpu") -> Built:
    g = torch.Generator().manual_seed(seed)
    if hnd:  # physical (2, B, H, N, D), logical (2, B, N, H, D)
        caches = [_rand((2, B, H, N, D), dtype, g, device).transpose(2, 3) for _ in range(L)]
    else:
        caches = [_rand((2, B, N, H, D), dtype, g, device) for _ in range(L)]
    return caches, None, lambda c, layer, b: c[layer][:, b]


def flashinfer(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, *, hnd: bool = False,
               seed: int = 0, device: str = "cpu") -> Built:
    g = torch.Generator().manual_seed(seed)
    if hnd:
        caches = {f"layer.{i}": _rand((B, 2, H, N, D), dtype, g, device).transpose(2, 3) for i in range(L)}
    else:
        caches = {f"layer.{i}": _rand((B, 2, N, H, D), dtype, g, device) for i in range(L)}
    return caches, None, lambda c, layer, b: c[f"layer.{layer}"][b]


def mla(L: int, B: int, N: int, D: int, dtype: torch.dtype, *, seed: int = 0, device: str = "cpu") -> Built:
    g = torch.Generator().manual_seed(seed)
    caches = [_rand((B, N, D), dtype, g, device) for _ in range(L)]
    return caches, None, lambda c, layer, b: c[layer][b].reshape(1, N, 1, D)


def cross_layer(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, *, seed: int = 0,
                device: str = "cpu") -> Built:
    g = torch.Generator().manual_seed(seed)
    t = _rand((B, L, 2, N, H, D), dtype, g, device)
    return t, None, lambda c, layer, b: c[b, layer]


def cross_layer_mla(L: int, B: int, N: int, D: int, dtype: torch.dtype, *, seed: int = 0,
                    device: str = "cpu") -> Built:
    g = torch.Generator().manual_seed(seed)
    t = _rand((B, L, N, D), dtype, g, device)
    return t, None, lambda c, layer, b: c[b, layer].reshape(1, N, 1, D)


#: vLLM 0.30+ physical orders of the logical ``[L, B, H, N, C]`` (vllm/v1/kv_cache_layout.py).
UNIFIED_ORDERS = ("LBHNC", "LBNHC", "LHBNC", "BLHNC", "BLNHC", "BHLNC")


def unified(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, *, order: str = "LBNHC",
            kv_count: int = 2, seed: int = 0, device: str = "cpu") -> Built:
    """One buffer in physical ``order``; per-layer logical ``[B, H, N, C]`` views, C = K ++ V."""
    g = torch.Generator().manual_seed(seed)
    c_dim = D * kv_count
    sizes = {"L": L, "B": B, "H": H, "N": N, "C": c_dim}
    phys = _rand(tuple(sizes[x] for x in order), dtype, g, device)
    logical = phys.permute(*[order.index(x) for x in "LBHNC"])
    caches = [logical[i] for i in range(L)]
    hints = None if kv_count == 2 else {"kv_count": 1}

    def block(c: Any, layer: int, b: int) -> torch.Tensor:
        blk = c[layer][b]  # [H, N, C]
        parts = [blk[..., k * D:(k + 1) * D].transpose(0, 1) for k in range(kv_count)]
        return torch.stack(parts)  # [K, N, H, D]

    return caches, hints, block


def all_layouts(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, *, seed: int = 0,
                device: str = "cpu") -> dict[str, Built]:
    """Every supported layout with the same model shape (MLA ones use H=1, K=1, head D*2)."""
    out: dict[str, Built] = {
        "flash_attn_nhd": flash_attn(L, B, N, H, D, dtype, seed=seed, device=device),
        "flash_attn_hnd": flash_attn(L, B, N, H, D, dtype, hnd=True, seed=seed + 1, device=device),
        "flashinfer_nhd": flashinfer(L, B, N, H, D, dtype, seed=seed + 2, device=device),
        "flashinfer_hnd": flashinfer(L, B, N, H, D, dtype, hnd=True, seed=seed + 3, device=device),
        "cross_layer": cross_layer(L, B, N, H, D, dtype, seed=seed + 4, device=device),
    }
    for i, order in enumerate(UNIFIED_ORDERS):
        out[f"unified_{order}"] = unified(L, B, N, H, D, dtype, order=order, seed=seed + 10 + i, device=device)
    out["mla"] = mla(L, B, N, 2 * D, dtype, seed=seed + 5, device=device)
    out["cross_layer_mla"] = cross_layer_mla(L, B, N, 2 * D, dtype, seed=seed + 6, device=device)
    out["unified_mla_LBNHC"] = unified(L, B, N, 1, 2 * D, dtype, order="LBNHC", kv_count=1,
                                       seed=seed + 7, device=device)
    return out
