"""The few places where vLLM versions differ, read through duck typing (no vLLM import at
module level; ``_platform_fp8`` asks vLLM's platform lazily, inside the vLLM process).

Supported: vLLM 0.15.x through 0.33.x. Differences handled:
- ``KVConnectorBase_V1.__init__``: ``kv_cache_config`` is optional in 0.15, required later
  (by 0.23).
- ``handle_preemptions``: a set of request ids (0.15-0.18) or the step's connector metadata
  (0.19+).
- Cross-layer KV registration (``register_cross_layers_kv_cache``) exists up to 0.29: one
  tensor per generation of FlashAttention's shape: ``(2, B, L, N, H, D)``-like in 0.15-0.22
  (per layer ``(2, B, N, H, D)``), block first in 0.23-0.25 (per layer ``(B, 2, N, H, D)``),
  K and V packed per layer in 0.26-0.29 (``[B, L, N, H, 2D]``, permuted); 0.30+ carve every
  layer from one buffer (the "unified" ``[B, H, N, C]`` views) and call ``register_kv_caches``.
- ``CachedRequestData``: ``resumed_req_ids`` (set) or the older ``resumed_from_preemption``
  (list of bools).
- A request aborted while its asynchronous load runs: 0.2x+ keep its blocks until the load is
  reported (``finished_recving``); 0.15 frees them at once unless the connector delays the free
  (:func:`frees_blocks_of_aborted_loads`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any


def frees_blocks_of_aborted_loads() -> bool:
    """True when vLLM frees the blocks of a request aborted in ``WAITING_FOR_REMOTE_KVS`` at once
    (0.15: only ``request_finished`` returning True keeps them), so an asynchronous load still
    running would write into blocks another request now holds. 0.2x+ delay that free themselves
    (their ``Scheduler._free_request`` takes ``delay_free_blocks``)."""
    import inspect

    try:
        from vllm.v1.core.sched.scheduler import Scheduler
    except ImportError:  # not inside vLLM: the cautious answer
        return True
    return "delay_free_blocks" not in inspect.signature(Scheduler._free_request).parameters


def prompt_token_ids(request: Any) -> list[int]:
    """The request's prompt token ids (empty for prompt embeddings: nothing to key on)."""
    ids = getattr(request, "prompt_token_ids", None)
    return list(ids) if ids is not None else []


def key_extras(request: Any, chunk_tokens: int) -> tuple[bytes, dict[int, bytes]] | None:
    """What decides a request's KV besides its token ids, for its chunk keys.

    Returns ``(request bytes, {chunk index: bytes})``: the LoRA adapter (name and path: a name
    re-pointed at other weights is another adapter) and the per-request ``cache_salt`` change
    every chunk; a multimodal item (image, audio...) changes the chunks its placeholder tokens
    overlap (the same placeholder ids stand for any image), and the chain carries it to every
    later chunk. None when the request cannot be keyed safely: prompt embeddings (their
    positions carry placeholder token ids whatever the vectors), an item without a content hash.
    Reads ``mm_features`` (vLLM 0.2x+) or the older ``mm_hashes`` / ``mm_positions``.
    """
    if getattr(request, "prompt_embeds", None) is not None:
        return None  # embeddings behind placeholder token ids (mixed prompts): keyed by nothing safe
    parts: list[bytes] = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append(_field(b"lora", getattr(lora, "lora_name", ""), getattr(lora, "lora_path", "")))
    salt = getattr(request, "cache_salt", None)
    if salt:
        parts.append(_field(b"salt", salt))
    features = getattr(request, "mm_features", None)
    if features:
        items = [(f.identifier, f.mm_position) for f in features]
    else:
        items = list(zip(getattr(request, "mm_hashes", None) or (), getattr(request, "mm_positions", None) or (),
                         strict=False))
    per_chunk: dict[int, bytes] = {}
    for ident, pos in items:
        if not ident:
            return None
        offset, length = int(pos.offset), int(pos.length)
        for c in range(offset // chunk_tokens, (offset + max(length, 1) - 1) // chunk_tokens + 1):
            per_chunk[c] = per_chunk.get(c, b"") + _field(b"mm", ident, offset - c * chunk_tokens, length)
    return b"".join(parts), per_chunk


def _field(tag: bytes, *values: Any) -> bytes:
    """``tag`` and each value, length-prefixed: no two different lists encode alike."""
    out = [tag]
    for v in values:
        b = str(v).encode("utf-8", "surrogatepass")
        out.append(len(b).to_bytes(4, "little") + b)
    return len(out).to_bytes(2, "little") + b"".join(out)


def first_group(block_ids: Any) -> list[int]:
    """Block ids of KV cache group 0 from a tuple-of-lists (or None)."""
    if not block_ids:
        return []
    return list(block_ids[0])


def kv_blocks_ids(blocks: Any) -> list[int]:
    """Group-0 block ids of a ``KVCacheBlocks`` object."""
    return first_group(blocks.get_block_ids())


def scheduled_requests(out: Any) -> Iterator[tuple[str, list[int], bool, int]]:
    """``(req_id, block ids, replace?, num_computed_before_step)`` for every scheduled request.

    New and resumed requests carry their whole block list (``replace``); running ones only
    the blocks added this step.
    """
    for new in out.scheduled_new_reqs:
        yield new.req_id, first_group(new.block_ids), True, new.num_computed_tokens
    cached = out.scheduled_cached_reqs
    resumed = _resumed(cached)
    for i, req_id in enumerate(cached.req_ids):
        yield req_id, first_group(cached.new_block_ids[i]), req_id in resumed, cached.num_computed_tokens[i]


def _resumed(cached: Any) -> set[str]:
    ids = getattr(cached, "resumed_req_ids", None)
    if ids is not None:
        return set(ids)
    flags = getattr(cached, "resumed_from_preemption", None) or []
    return {r for r, f in zip(cached.req_ids, flags, strict=False) if f}


def preempted_ids(arg: Any) -> set[str]:
    """Request ids from either ``handle_preemptions`` signature."""
    if arg is None:
        return set()
    if isinstance(arg, (set, frozenset, list, tuple)):
        return set(arg)
    plan = getattr(arg, "plan", None)
    return set(plan.preempted) if plan is not None else set()


def cross_layer_views(kv_cache: Any, stride_order: Sequence[int] | None) -> list[Any]:
    """Per-layer logical views of vLLM 0.15's cross-layer KV tensor.

    vLLM allocates the logical ``(L, 2, B, N, H, D)`` cache physically permuted by the
    backend's ``get_kv_cache_stride_order(include_num_layers_dimension=True)`` (e.g.
    ``(B, L, 2, N, H, D)`` for NHD) and hands the connector that physical tensor. Undoing the
    permutation gives one ``(2, B, N, H, D)`` view per layer, all in one storage, which the
    transfer engine gathers with one kernel for all layers.
    """
    order = list(stride_order) if stride_order is not None else list(range(kv_cache.dim()))
    inverse = [order.index(i) for i in range(len(order))]
    return list(kv_cache.permute(*inverse).unbind(0))


@dataclass(frozen=True)
class ModelShape:
    """What the control plane needs about the model: namespace fields and chunk bytes."""

    model_id: str
    revision: str
    dtype: str
    num_layers: int
    num_kv_heads: int  # per rank
    head_size: int
    kv_count: int
    element_size: int
    tp_size: int
    block_size: int
    #: The model settings besides its identity that change the KV numbers (see ``numerics``).
    variant: str = ""

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def payload_shape(self, chunk_tokens: int) -> tuple[int, ...]:
        """``KVLayout.chunk_payload_shape`` of the workers: ``[layers, kv, tokens, heads, head]``."""
        return (self.num_layers, self.kv_count, chunk_tokens, self.num_kv_heads, self.head_size)

    def chunk_bytes(self, chunk_tokens: int) -> int:
        """Bytes of one chunk's canonical payload on one rank."""
        per_token = self.num_layers * self.kv_count * self.num_kv_heads * self.head_size
        return per_token * self.element_size * chunk_tokens

    @property
    def layout_tag(self) -> str:
        """Matches ``KVLayout.canonical_tag`` of the workers' detected layout."""
        return f"LKTHD-kv{self.kv_count}"


def model_shape(vllm_config: Any, kv_cache_config: Any = None) -> ModelShape:
    """Read the model shape from a ``VllmConfig`` (works on 0.15 and 0.33).

    The layers counted are those with a KV cache of their own: the layer names of the KV cache
    group when ``kv_cache_config`` has one (a layer that reuses another's KV, as Gemma 3n's do,
    is not in it, and its alias tensor is stored once by the workers), else the model's layers.
    """
    import torch

    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    cc = vllm_config.cache_config
    dtype = mc.dtype
    cache_dtype = getattr(cc, "cache_dtype", "auto")
    if cache_dtype not in (None, "auto"):
        dtype = _cache_dtype(cache_dtype, dtype)
    use_mla = bool(getattr(mc, "use_mla", False))
    return ModelShape(
        model_id=str(mc.model),
        revision=str(getattr(mc, "revision", None) or ""),
        dtype=str(dtype).removeprefix("torch."),
        num_layers=_kv_layers(kv_cache_config) or mc.get_num_layers(pc),
        num_kv_heads=1 if use_mla else mc.get_num_kv_heads(pc),
        head_size=mc.get_head_size(),
        kv_count=1 if use_mla else 2,
        element_size=torch.empty((), dtype=dtype).element_size(),
        tp_size=pc.tensor_parallel_size,
        block_size=cc.block_size,
        variant=numerics(mc),
    )


def numerics(model_config: Any) -> str:
    """The settings that change the KV a model computes for the same tokens, besides its name,
    revision and KV dtype: the weights' dtype and quantization, and ``hf_overrides`` (where a
    server changes RoPE scaling or theta). Two servers of one model that differ in any of them
    (bf16 and fp8-quantized weights, another RoPE scaling) must not load each other's KV from a
    shared tier; as JSON. Only values vLLM resolves before building the model: some models
    rewrite their ``hf_config`` while being built, in the worker processes only, and the
    scheduler and the workers must agree on the namespace (the files' own settings are the
    model id and revision's).
    """
    import json

    overrides = getattr(model_config, "hf_overrides", None)
    fields = {
        "weights": str(getattr(model_config, "dtype", "")).removeprefix("torch."),
        "quantization": getattr(model_config, "quantization", None) or "",
        "hf_overrides": "callable" if callable(overrides) else overrides or None,
    }
    return json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))


def _kv_layers(kv_cache_config: Any) -> int:
    """Layers of the one KV cache group, 0 when unknown (no config, or not one group)."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or ()
    if len(groups) != 1:
        return 0
    return len(getattr(groups[0], "layer_names", None) or ())


#: vLLM's ``--kv-cache-dtype`` values KVortex stores, and the element type each means (None:
#: the platform's fp8). vLLM allocates the fp8 ones as uint8 tensors and int8 as int8; the
#: workers' layouts name the element type through the ``dtype`` hint (see ``layout_hints``).
_CACHE_DTYPES: dict[str, str | None] = {
    "fp8": None, "fp8_e4m3": None, "fp8_e5m2": "float8_e5m2", "fp8_inc": "float8_e4m3fn", "int8": "int8",
    "bfloat16": "bfloat16", "float16": "float16", "half": "float16", "float32": "float32", "float": "float32",
}


def _cache_dtype(name: str, model_dtype: Any) -> Any:
    """The element type of ``--kv-cache-dtype name``; a clear error for the quantized formats
    that pack scales or sub-byte values into the cache (their bytes per token differ from the
    model's head size, which the scheduler's slot sizes are computed from)."""
    import torch

    if name not in _CACHE_DTYPES:
        from kvortex_core.errors import ConfigError

        raise ConfigError(
            f"--kv-cache-dtype {name!r} is not supported by KVortex; use one of auto, "
            f"{', '.join(_CACHE_DTYPES)} (formats that pack scales or sub-byte values into the cache "
            "are not stored yet)"
        )
    target = _CACHE_DTYPES[name]
    if target is None:
        return _platform_fp8()
    return getattr(torch, target)


def _platform_fp8() -> Any:
    """vLLM's fp8 type on this platform (e4m3fn on CUDA, e4m3fnuz on some ROCm GPUs)."""
    import torch

    try:
        from vllm.platforms import current_platform

        return current_platform.fp8_dtype()
    except Exception:  # noqa: BLE001 - no vLLM platform here (tests, CPU): the CUDA default
        return torch.float8_e4m3fn


def layout_hints(shape: ModelShape) -> dict[str, Any] | None:
    """Hints for the workers' ``detect_layout``: MLA under vLLM 0.30+ is one latent vector per
    token (``[B, 1, N, C]``), and the element type of caches vLLM allocates as bytes (fp8, int8)."""
    hints: dict[str, Any] = {}
    if shape.kv_count == 1:
        hints["kv_count"] = 1
    if shape.element_size == 1:
        hints["dtype"] = shape.dtype
    return hints or None


def recheck_failed_loads(vllm_config: Any) -> bool:
    """Whether a load failure should be reported again in the next step (``StepPlan.recheck``).

    Under asynchronous scheduling (vLLM's default where the executor allows it) vLLM has
    already scheduled step s+1 when it reads step s's failed blocks, so a request that holds
    them as context runs s+1 over the garbage, and vLLM keeps that result. A second report in
    s+1 makes vLLM discard it. Only where vLLM rolls a request back by the tokens it had
    computed before that step (its ``_update_requests_with_invalid_blocks`` takes the step's
    scheduled tokens: 0.2x and later): vLLM 0.15 rolls back by the tokens cached when the
    request started, so a second report would roll back a request already recomputing.
    """
    if not getattr(vllm_config.scheduler_config, "async_scheduling", False):
        return False
    try:
        import inspect

        from vllm.v1.core.sched.scheduler import Scheduler
    except ImportError:  # pragma: no cover - the connector runs inside vLLM
        return False
    rollback = getattr(Scheduler, "_update_requests_with_invalid_blocks", None)
    return rollback is not None and "num_scheduled_tokens" in inspect.signature(rollback).parameters


def backend_context(vllm_config: Any) -> dict[str, str]:
    """The lower tiers' ``BackendContext`` fields that tell this engine apart on a node.

    ``instance``: ``dp<k>`` for data-parallel engine k > 0 (engine 0 keeps the plain layout).
    Every engine's ranks are numbered from 0, so without it two engines' ranks would ask for the
    same disk directories. vLLM runs a dense model's data-parallel engines as independent
    engines (``data_parallel_size`` 1, rank 0) and keeps the engine's number only in
    ``data_parallel_index``; a MoE model's keep ``data_parallel_rank`` too.
    ``engine_id``: ``kv_transfer_config.engine_id``, the same in the engine's scheduler and
    workers (vLLM broadcasts it over the TP group), distinct between servers.
    """
    pc = vllm_config.parallel_config
    index = getattr(pc, "data_parallel_index", None)
    if index is None:
        index = getattr(pc, "data_parallel_rank", 0) if int(getattr(pc, "data_parallel_size", 1) or 1) > 1 else 0
    ktc = getattr(vllm_config, "kv_transfer_config", None)
    return {"instance": f"dp{int(index)}" if int(index or 0) > 0 else "",
            "engine_id": str(getattr(ktc, "engine_id", None) or "")}
