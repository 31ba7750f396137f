"""KV cache tensors allocated the way vLLM allocates them, without importing vLLM.

Used by the CPU harness (next to vLLM's own allocator where it exists) and by the GPU check,
which runs where vLLM is not installed. Each function returns ``{layer_name: tensor}`` plus
a writer that stores one token's K and V in vLLM's own terms for that layout, so tests write
KV the way the model would and never through KVortex's layout code.

- vLLM 0.15 (FlashAttention backend): one tensor per layer, shape ``(2, B, N, H, D)``; with
  the HND cache layout the same logical shape is allocated as ``(2, B, H, N, D)`` and permuted.
- vLLM 0.30+ ("unified"): one int8 buffer for all layers; each layer is a logical
  ``[B, H, N, C]`` view (``C`` = K then V along the head dimension) in one of six physical
  orders of ``[L, B, H, N, C]`` (``LBNHC`` is what vLLM picks for NHD attention backends).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

#: ``write(layer, block, offset, k, v)`` with ``k``/``v`` of shape ``[H, D]``.
Writer = Callable[[int, int, int, torch.Tensor, torch.Tensor], None]
#: ``read(layer, block, offset) -> (k, v)``.
Reader = Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]


def layer_names(num_layers: int) -> list[str]:
    return [f"model.layers.{i}.self_attn.attn" for i in range(num_layers)]


def flash_attn_v015(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, device: Any = "cpu",
                    *, hnd: bool = False) -> tuple[dict[str, torch.Tensor], Writer, Reader]:
    """vLLM 0.15 FlashAttention: per layer ``(2, B, N, H, D)``; HND keeps heads before tokens."""
    caches = {}
    for name in layer_names(L):
        if hnd:
            t = torch.zeros(2, B, H, N, D, dtype=dtype, device=device).permute(0, 1, 3, 2, 4)
        else:
            t = torch.zeros(2, B, N, H, D, dtype=dtype, device=device)
        caches[name] = t
    layers = list(caches.values())

    def write(layer: int, block: int, off: int, k: torch.Tensor, v: torch.Tensor) -> None:
        layers[layer][0, block, off] = k
        layers[layer][1, block, off] = v

    def read(layer: int, block: int, off: int) -> tuple[torch.Tensor, torch.Tensor]:
        return layers[layer][0, block, off], layers[layer][1, block, off]

    return caches, write, read


def cross_layer_v015(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, device: Any = "cpu",
                     *, hnd: bool = False) -> tuple[torch.Tensor, tuple[int, ...], Writer, Reader]:
    """vLLM 0.15 with ``prefer_cross_layer_blocks``: one buffer, logical ``(L, 2, B, N, H, D)``.

    Physically permuted by FlashAttention's stride order with a layers dimension:
    ``(B, L, 2, N, H, D)`` for NHD, ``(B, H, L, 2, N, D)`` for HND. Returns the physical tensor
    (what the connector's ``register_cross_layers_kv_cache`` receives) and the stride order.
    """
    order = (2, 4, 0, 1, 3, 5) if hnd else (2, 0, 1, 3, 4, 5)
    logical_shape = (L, 2, B, N, H, D)
    phys = torch.zeros(tuple(logical_shape[i] for i in order), dtype=dtype, device=device)
    logical = phys.permute(*[order.index(i) for i in range(6)])

    def write(layer: int, block: int, off: int, k: torch.Tensor, v: torch.Tensor) -> None:
        logical[layer, 0, block, off] = k
        logical[layer, 1, block, off] = v

    def read(layer: int, block: int, off: int) -> tuple[torch.Tensor, torch.Tensor]:
        return logical[layer, 0, block, off], logical[layer, 1, block, off]

    return phys, order, write, read


def unified_v033(L: int, B: int, N: int, H: int, D: int, dtype: torch.dtype, device: Any = "cpu",
                 *, order: str = "LBNHC") -> tuple[dict[str, torch.Tensor], Writer, Reader]:
    """vLLM 0.30+ unified layout: one buffer, per-layer ``[B, H, N, C]`` views, C = 2 * D."""
    sizes = {"L": L, "B": B, "H": H, "N": N, "C": 2 * D}
    phys = torch.zeros(tuple(sizes[x] for x in order), dtype=dtype, device=device)
    logical = phys.permute(*[order.index(x) for x in "LBHNC"])
    caches = {name: logical[i] for i, name in enumerate(layer_names(L))}
    return caches, _unified_writer(list(caches.values()), D), _unified_reader(list(caches.values()), D)


def _unified_writer(layers: list[torch.Tensor], D: int) -> Writer:
    def write(layer: int, block: int, off: int, k: torch.Tensor, v: torch.Tensor) -> None:
        layers[layer][block, :, off, :D] = k
        layers[layer][block, :, off, D:] = v

    return write


def _unified_reader(layers: list[torch.Tensor], D: int) -> Reader:
    def read(layer: int, block: int, off: int) -> tuple[torch.Tensor, torch.Tensor]:
        return layers[layer][block, :, off, :D], layers[layer][block, :, off, D:]

    return read


def block_first_writer_for(caches: dict[str, torch.Tensor]) -> tuple[Writer, Reader]:
    """Writer/reader over vLLM 0.23-0.25 FlashAttention views, logical ``(B, 2, N, H, D)``."""
    layers = list(caches.values())

    def write(layer: int, block: int, off: int, k: torch.Tensor, v: torch.Tensor) -> None:
        layers[layer][block, 0, off] = k
        layers[layer][block, 1, off] = v

    def read(layer: int, block: int, off: int) -> tuple[torch.Tensor, torch.Tensor]:
        return layers[layer][block, 0, off], layers[layer][block, 1, off]

    return write, read


def unified_writer_for(caches: dict[str, torch.Tensor], D: int) -> tuple[Writer, Reader]:
    """Writer/reader over ``[B, H, N, C]`` views made by vLLM's own allocator."""
    layers = list(caches.values())
    return _unified_writer(layers, D), _unified_reader(layers, D)


def token_kv(token: int, pos: int, layer: int, H: int, D: int, dtype: torch.dtype,
             device: Any = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The KV a fake model computes for ``token`` at ``pos``: distinct per token, position, layer."""
    base = torch.arange(H * D, dtype=torch.float32, device=device).reshape(H, D)
    k = (token * 0.25 + pos * 0.5 + layer * 3.0) + base / 64
    v = -(token * 0.75 + pos * 0.125 + layer * 5.0) - base / 32
    return k.to(dtype), v.to(dtype)
