"""What the connector accepts when vLLM starts it, and what it refuses.

Each refusal is a configuration in which stored KV could come back wrong (other layers, other
blocks, other numbers) or in which a load would fail the request: start-up stops with a
:class:`~kvortex_core.errors.ConfigError` naming the setting to change, instead of serving
wrong answers later. ``check_config`` runs in both roles from the constructor,
``check_layout`` on the workers when vLLM registers its KV caches (before the pinned pool is
made), ``prefix_reuse_possible`` decides whether the scheduler keys requests at all. One
refusal lives where its value is read: an unsupported ``--kv-cache-dtype`` (packed scales,
sub-byte formats) raises from ``compat.model_shape``, which maps the name to an element type.
vLLM objects are read by duck typing (no vLLM import here); docs/vllm.md lists the cases.
"""

from __future__ import annotations

import logging
from typing import Any

from kvortex_core.errors import ConfigError, LayoutError
from kvortex_vllm.compat import ModelShape

log = logging.getLogger(__name__)

#: KV cache specs whose blocks hold every token of the prompt for the request's life (full
#: attention, MLA, attention sinks; R-SWA keeps every prompt block and drops only generated
#: tokens', which KVortex never stores). vLLM frees the blocks of sliding-window and
#: chunked-local layers as the window moves, without telling the connector: a save may still be
#: reading a block the next forward writes, and a hit past the window is allocated as the
#: shared null block.
FULL_SPECS = frozenset({"FullAttentionSpec", "MLAAttentionSpec", "SinkFullAttentionSpec", "RSWASpec"})

#: Caches whose blocks vLLM frees as the attention window moves (the advice: disable the window).
WINDOWED_SPECS = frozenset({"SlidingWindowSpec", "SlidingWindowMLASpec", "ChunkedLocalAttentionSpec"})

#: Parallel sizes that must be 1, and why (keys name a tensor-parallel rank's share of every
#: layer and every token).
_UNSUPPORTED_PARALLELISM = (
    ("pipeline_parallel_size", "a pipeline stage holds only some layers"),
    ("decode_context_parallel_size", "ranks hold different tokens of each block"),
    ("prefill_context_parallel_size", "ranks hold different tokens of each block"),
)


def check_config(vllm_config: Any, kv_cache_config: Any, shape: ModelShape) -> None:
    """Every start-up refusal that the configuration alone decides (both roles)."""
    check_kv_cache_groups(kv_cache_config)
    check_parallelism(vllm_config)
    check_fixed_kv_scales(vllm_config, shape)


def check_kv_cache_groups(kv_cache_config: Any) -> None:
    """One group of full-attention layers, one block table: KVortex moves every layer's KV with
    the block ids of group 0. vLLM turns its hybrid KV cache manager off for connectors without
    ``SupportsHMA`` (this one) unless the user forces it on; with several groups (sliding-window
    and full attention, or Mamba layers, each with its own blocks) the other groups' layers would
    be saved from and loaded into the wrong blocks. So does a group of windowed layers (a model
    whose every layer is sliding-window, Mistral-7B-v0.1 say). ``None`` (vLLM 0.15): nothing to
    check."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or ()
    if len(groups) > 1:
        raise ConfigError(
            f"this model has {len(groups)} KV cache groups (hybrid attention: each group of layers "
            "has its own block table), and KVortex stores one group; start vLLM without "
            "--enable-hybrid-kv-cache-manager (or with --disable-hybrid-kv-cache-manager)"
        )
    for group in groups:
        spec = getattr(group, "kv_cache_spec", None)
        specs = list(getattr(spec, "kv_cache_specs", {}).values()) or [spec]  # UniformTypeKVCacheSpecs
        kinds = {type(x).__name__ for x in specs if x is not None}
        for x in specs:
            packed = _packed_state(x)
            if packed:
                raise ConfigError(
                    f"this model's KV cache ({type(x).__name__}) stores {packed}, not one vector per "
                    "token of each KV head, and KVortex keys, sizes and moves KV per token; serve this "
                    "model without the KVortex connector"
                )
        windowed = kinds & WINDOWED_SPECS
        if windowed:
            raise ConfigError(
                f"this model's KV cache is {', '.join(sorted(windowed))}: vLLM frees blocks "
                "that leave the attention window while KVortex may still copy them, so KVortex "
                "stores only full-attention caches; serve with --disable-sliding-window (vLLM then "
                "keeps every token's KV) or without the KVortex connector"
            )
        if kinds - FULL_SPECS:
            raise ConfigError(
                f"this model's KV cache is {', '.join(sorted(kinds - FULL_SPECS))}, which KVortex does "
                f"not store (it stores {', '.join(sorted(FULL_SPECS))}: one K/V vector per token and "
                "head, every prompt block kept); serve this model without the KVortex connector"
            )


def _packed_state(spec: Any) -> str:
    """What a vLLM 0.2x+ attention spec packs instead of per-token, per-head KV ('' for none):
    compressed states (``tokens_per_state`` > 1, DeepSeek-V4's sparse MLA), several states per
    token (a fraction, Whisper's block pooling), head slots that are not the KV heads, or packed
    state bytes. A block then holds fewer (or more) vectors than tokens."""
    tps = getattr(spec, "tokens_per_state", 1)
    if tps != 1:
        return f"one state per {tps} tokens (tokens_per_state={tps})"
    ratio = getattr(spec, "compress_ratio", 1)  # the same in vLLM 0.2x (DeepSeek-V4)
    if ratio != 1:
        return f"one state per {ratio} tokens (compress_ratio={ratio})"
    if getattr(spec, "num_head_slots", None) is not None:
        return f"{spec.num_head_slots} packed head slots (num_head_slots)"
    if getattr(spec, "state_content_bytes", None) is not None:
        return f"packed states of {spec.state_content_bytes} bytes (state_content_bytes)"
    return ""


def check_parallelism(vllm_config: Any) -> None:
    """Keys name a tensor-parallel rank's share (its heads) of every layer and every token.

    A pipeline stage holds only some layers: stage 0 and stage 1 of one TP rank would write
    different layers' KV under the same keys of a shared lower tier (a later load would bring
    back the other stage's layers, checksums intact). Context parallelism (decode or prefill)
    spreads a block's tokens over ranks, which the chunk -> blocks mapping does not model.
    """
    pc = vllm_config.parallel_config
    for name, what in _UNSUPPORTED_PARALLELISM:
        size = int(getattr(pc, name, 1) or 1)
        if size > 1:
            raise ConfigError(
                f"{name}={size} is not supported by KVortex yet ({what}, and its keys name a "
                f"tensor-parallel rank's KV of all layers and tokens); serve with {name}=1 "
                "(tensor and data parallelism are supported)"
            )


def check_fixed_kv_scales(vllm_config: Any, shape: ModelShape) -> None:
    """An fp8 (or int8) KV cache is bytes scaled by ``k_scale``/``v_scale``. From a checkpoint
    they are the model's; with ``calculate_kv_scales`` (vLLM 0.15-era) each process computes its
    own from its first batch, so the same stored bytes mean other numbers in another process
    (after a restart, or on another server sharing a tier)."""
    if shape.element_size == 1 and getattr(vllm_config.cache_config, "calculate_kv_scales", False):
        raise ConfigError(
            "calculate_kv_scales=True with a one-byte KV cache: every vLLM process computes its own "
            "k/v scales, so stored fp8 bytes would be read back with other scales; serve with the "
            "checkpoint's scales (calculate_kv_scales=False) or with --kv-cache-dtype auto"
        )


def check_layout(layout: Any, shape: ModelShape, chunk_tokens: int) -> None:
    """The registered tensors must hold what the scheduler sizes slots and keys by: else every
    step's plan would be refused (or worse). Called before the workers' pinned pool is made."""
    got = (tuple(layout.chunk_payload_shape(chunk_tokens)), str(layout.dtype).removeprefix("torch."))
    want = (tuple(shape.payload_shape(chunk_tokens)), shape.dtype)
    if got != want:
        raise LayoutError(
            f"the KV caches vLLM registered hold chunks of {got[0]} {got[1]} (layers, kv, tokens, "
            f"heads, head size) but the model config says {want[0]} {want[1]}; KVortex cannot store "
            "this model's KV cache (please report the model and vLLM version)"
        )


def prefix_reuse_possible(vllm_config: Any) -> bool:
    """False for pooling models whose prefill vLLM must run whole (bidirectional attention, or
    MEAN/CLS/STEP pooling over every prompt token: vLLM gives them no prefix caching); a loaded
    prefix would skip tokens their pooler needs, which fails the request."""
    mc = vllm_config.model_config
    if getattr(mc, "pooler_config", None) is None:
        return True
    try:
        supported = bool(mc.is_prefix_caching_supported)
    except AttributeError:  # older vLLM: trust its cache config instead
        supported = bool(getattr(vllm_config.cache_config, "enable_prefix_caching", False))
    if not supported:
        log.warning("KVortex: this pooling model needs every prompt token computed (vLLM gives it no "
                    "prefix caching); the connector stores and loads nothing")
    return supported
