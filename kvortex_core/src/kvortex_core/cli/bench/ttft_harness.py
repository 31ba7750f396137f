"""The parts of ``kvortex bench ttft``: a random-weight Llama, a paged KV cache, two load paths.

The model is transformers' ``LlamaForCausalLM`` built from a Llama-3.1-8B-shaped config with
random weights (nothing is downloaded). Its prefill fills a ``DynamicCache``; the harness copies
that KV into a vLLM-FlashAttention-shaped paged cache (per layer ``[2, blocks, 16, heads,
head]``) at shuffled block ids, saves it through KVortex and loads it back into other blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

BLOCK_SIZE = 16


@dataclass(frozen=True)
class ModelShape:
    """The transformer dimensions the benchmark builds."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return (
            self.layers
            * 2
            * self.kv_heads
            * self.head_dim
            * torch.empty((), dtype=dtype).element_size()
        )


LLAMA_8B = ModelShape(32, 4096, 32, 8, 128, 14336, 128256)
TINY = ModelShape(2, 64, 4, 2, 16, 128, 1000)


def build_model(shape: ModelShape, device: torch.device, dtype: torch.dtype) -> Any:
    """``LlamaForCausalLM`` with random weights, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        num_hidden_layers=shape.layers,
        vocab_size=shape.vocab,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of 8B weights
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of ``fn`` with the device drained before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def prefill(model: Any, ids: torch.Tensor) -> Any:
    """One prefill: the logits of the last token only (what TTFT needs) and the KV cache."""
    with torch.inference_mode():
        return model(ids[None], use_cache=True, logits_to_keep=1).past_key_values


class PagedCache:
    """vLLM FlashAttention-shaped KV cache: one ``[2, blocks, 16, kv_heads, head]`` per layer."""

    def __init__(
        self, shape: ModelShape, num_blocks: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.kv = [
            torch.zeros(
                2,
                num_blocks,
                BLOCK_SIZE,
                shape.kv_heads,
                shape.head_dim,
                dtype=dtype,
                device=device,
            )
            for _ in range(shape.layers)
        ]
        self.num_blocks = num_blocks

    def _blocked(self, t: torch.Tensor) -> torch.Tensor:
        # DynamicCache holds [1, heads, T, head]; the paged cache wants [T/16, 16, heads, head].
        x = t[0].transpose(0, 1)
        return x.reshape(-1, BLOCK_SIZE, *x.shape[1:])

    def write(self, cache: Any, block_ids: torch.Tensor) -> None:
        """Put a prefill's KV into ``block_ids`` (what the engine's attention does in vLLM)."""
        for layer, kv in zip(cache.layers, self.kv, strict=True):
            kv[0, block_ids] = self._blocked(kv_keys(layer))
            kv[1, block_ids] = self._blocked(kv_values(layer))

    def equals(self, cache: Any, block_ids: torch.Tensor) -> bool:
        """True when ``block_ids`` hold exactly the prefill's KV (bit for bit)."""
        return all(
            torch.equal(kv[0, block_ids], self._blocked(kv_keys(layer)))
            and torch.equal(kv[1, block_ids], self._blocked(kv_values(layer)))
            for layer, kv in zip(cache.layers, self.kv, strict=True)
        )

    def poison(self, block_ids: torch.Tensor) -> None:
        """NaN the blocks so a load that skips any of them fails :meth:`equals`."""
        for kv in self.kv:
            kv[:, block_ids] = float("nan")


def kv_keys(layer: Any) -> torch.Tensor:
    return layer.keys


def kv_values(layer: Any) -> torch.Tensor:
    return layer.values


class EnginePath:
    """Saves and loads through :class:`KVortexEngine` (the product path)."""

    name = "KVortexEngine"

    def __init__(
        self, kv_caches: list[torch.Tensor], tiers: dict[str, Any], chunk_tokens: int, **config: Any
    ) -> None:
        from kvortex_core.config import KVortexConfig
        from kvortex_core.engine import KVortexEngine

        plugins = builtin_plugins()
        config = KVortexConfig.load(
            plugins=plugins,
            chunk_tokens=chunk_tokens,
            model_id="kvortex-ttft-bench",
            tiers=tiers,
            **config,
        )
        self.engine = KVortexEngine.create(config, plugins=plugins)
        self.engine.register_kv_caches(kv_caches)

    def lookup(self, tokens: Sequence[int]) -> int:
        return self.engine.lookup(tokens)

    def save(self, tokens: Sequence[int], block_ids: Sequence[int]) -> None:
        self.engine.save(tokens, block_ids)

    def save_async(self, tokens: Sequence[int], block_ids: Sequence[int]) -> Any:
        return self.engine.save_async(tokens, block_ids)

    def load(self, tokens: Sequence[int], block_ids: Sequence[int]) -> int:
        return self.engine.load(tokens, block_ids)

    def close(self) -> None:
        self.engine.close()


class TransferPath:
    """Fallback when KVortexEngine is missing: ChunkHasher + PinnedPool + TransferEngine."""

    name = "TransferEngine+PinnedPool"

    def __init__(self, kv_caches: list[torch.Tensor], capacity: int, chunk_tokens: int) -> None:
        from kvortex_core.control.keys import ChunkHasher, KeyNamespace
        from kvortex_core.data.layouts import detect_layout
        from kvortex_core.data.pool import PinnedPool
        from kvortex_core.data.transfer import TransferEngine

        layout = detect_layout(kv_caches)
        self.chunk_tokens = chunk_tokens
        self.blocks_per_chunk = chunk_tokens // BLOCK_SIZE
        self.hasher = ChunkHasher(
            KeyNamespace("kvortex-ttft-bench", "", "bf16", "canonical", 0, 0, 0), chunk_tokens
        )
        self.pool = PinnedPool(layout.chunk_bytes(chunk_tokens), capacity)
        self.transfer = TransferEngine(kv_caches, layout, chunk_tokens=chunk_tokens)
        self.slots: dict[bytes, int] = {}

    def _chunks(self, block_ids: Sequence[int], n: int) -> list[list[int]]:
        b = self.blocks_per_chunk
        return [list(block_ids[i * b : (i + 1) * b]) for i in range(n)]

    def lookup(self, tokens: Sequence[int]) -> int:
        keys = self.hasher.keys(tokens)
        n = next((i for i, k in enumerate(keys) if k not in self.slots), len(keys))
        return n * self.chunk_tokens

    def save_async(self, tokens: Sequence[int], block_ids: Sequence[int]) -> Any:
        keys = [k for k in self.hasher.keys(tokens) if k not in self.slots]
        slots = self.pool.allocate_many(len(keys)) or []
        self.slots.update(zip(keys, slots, strict=False))
        return self.transfer.save(
            self._chunks(block_ids, len(slots)), [self.pool.view(s) for s in slots]
        )

    def save(self, tokens: Sequence[int], block_ids: Sequence[int]) -> None:
        self.save_async(tokens, block_ids).wait()

    def load(self, tokens: Sequence[int], block_ids: Sequence[int]) -> int:
        n = self.lookup(tokens) // self.chunk_tokens
        keys = self.hasher.keys(tokens)[:n]
        self.transfer.load(
            [self.pool.view(self.slots[k]) for k in keys], self._chunks(block_ids, n)
        ).wait()
        return n * self.chunk_tokens

    def close(self) -> None:
        for slot in self.slots.values():
            self.pool.free(slot)
        self.slots.clear()
        self.pool.close()


def builtin_plugins() -> Any:
    """A plugin manager with the built-in backends, also where they are not pip-installed.

    On the GPU box the packages run from ``PYTHONPATH`` without entry points; register the
    built-ins by hand there, exactly as their entry point would.
    """
    from kvortex_core.plugins.manager import PluginManager

    manager = PluginManager()
    if "cpu" not in manager.backends():
        import kvortex_backends.plugin as builtin

        manager.register(builtin, name="kvortex-backends")
    return manager


def engine_available() -> bool:
    try:
        import kvortex_core.engine  # noqa: F401
    except ImportError:
        return False
    return True
