"""``KVortexConnector``: the vLLM ``KVConnectorBase_V1`` that plugs KVortex into vLLM.

Enable it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVortexConnector",
        "kv_connector_module_path": "kvortex_vllm.connector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"chunk_tokens": 256, "tiers": {"cpu": {"type": "cpu", "capacity": "8GiB"}}}}'

The scheduler-role instance is the control plane (:mod:`kvortex_vllm.scheduler`), each
worker-role instance the data plane of one rank (:mod:`kvortex_vllm.worker`); the per-step
plan travels in the connector metadata. This module imports vLLM; ``kvortex_vllm`` and
``kvortex_core`` do not.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without vLLM installed
    if exc.name is None or not exc.name.startswith("vllm"):
        raise
    raise ModuleNotFoundError(
        "kvortex_vllm.connector needs vLLM 0.15-0.33 (its KV connector API): "
        "pip install 'kvortex-vllm[vllm]' (or install your vLLM build first)",
        name=exc.name,
    ) from exc

from kvortex_core.config import KVortexConfig
from kvortex_core.control.keys import KeyNamespace
from kvortex_core.control.stats import Stats
from kvortex_core.logs import configure as configure_logging
from kvortex_core.metrics import start_metrics
from kvortex_vllm import compat
from kvortex_vllm.lower import scheduler_tiers
from kvortex_vllm.metadata import StepPlan, slot_geometry
from kvortex_vllm.scheduler import SchedulerSide
from kvortex_vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class KVortexConnectorMetadata(KVConnectorMetadata):
    """The connector metadata of one step: a :class:`~kvortex_vllm.metadata.StepPlan`."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


def load_config(vllm_config: VllmConfig) -> KVortexConfig:
    """``kv_connector_extra_config`` as keyword arguments over env over YAML over defaults."""
    ktc = vllm_config.kv_transfer_config
    extra = dict(getattr(ktc, "kv_connector_extra_config", None) or {})
    return KVortexConfig(**extra)


#: KV cache specs whose blocks hold every token of the prompt for the request's life (full
#: attention, MLA, attention sinks; R-SWA keeps every prompt block and drops only generated
#: tokens', which KVortex never stores). vLLM frees the blocks of sliding-window and
#: chunked-local layers as the window moves, without telling the connector: a save may still be
#: reading a block the next forward writes, and a hit past the window is allocated as the
#: shared null block.
_FULL_SPECS = frozenset({"FullAttentionSpec", "MLAAttentionSpec", "SinkFullAttentionSpec", "RSWASpec"})


def _check_one_group(kv_cache_config: KVCacheConfig | None) -> None:
    """One group of full-attention layers, one block table: KVortex moves every layer's KV with
    the block ids of group 0. vLLM turns its hybrid KV cache manager off for connectors without
    ``SupportsHMA`` (this one) unless the user forces it on; with several groups (sliding-window
    and full attention, or Mamba layers, each with its own blocks) the other groups' layers would
    be saved from and loaded into the wrong blocks, so start-up stops instead. So does a group of
    windowed layers (a model whose every layer is sliding-window, Mistral-7B-v0.1 say)."""
    groups = getattr(kv_cache_config, "kv_cache_groups", None) or ()
    from kvortex_core.errors import ConfigError

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
        if kinds - _FULL_SPECS:
            raise ConfigError(
                f"this model's KV cache is {', '.join(sorted(kinds - _FULL_SPECS))}: vLLM frees blocks "
                "that leave the attention window while KVortex may still copy them, so KVortex "
                "stores only full-attention caches; serve with --disable-sliding-window (vLLM then "
                "keeps every token's KV) or without the KVortex connector"
            )


def _check_fixed_kv_scales(vllm_config: VllmConfig, shape: compat.ModelShape) -> None:
    """An fp8 (or int8) KV cache is bytes scaled by ``k_scale``/``v_scale``. From a checkpoint
    they are the model's; with ``calculate_kv_scales`` (vLLM 0.15-era) each process computes its
    own from its first batch, so the same stored bytes mean other numbers in another process
    (after a restart, or on another server sharing a tier): start-up stops instead."""
    if shape.element_size == 1 and getattr(vllm_config.cache_config, "calculate_kv_scales", False):
        from kvortex_core.errors import ConfigError

        raise ConfigError(
            "calculate_kv_scales=True with a one-byte KV cache: every vLLM process computes its own "
            "k/v scales, so stored fp8 bytes would be read back with other scales; serve with the "
            "checkpoint's scales (calculate_kv_scales=False) or with --kv-cache-dtype auto"
        )


def _check_parallelism(vllm_config: VllmConfig) -> None:
    """Keys name a tensor-parallel rank's share (its heads) of every layer and every token.

    A pipeline stage holds only some layers: stage 0 and stage 1 of one TP rank would write
    different layers' KV under the same keys of a shared lower tier (a later load would bring
    back the other stage's layers, checksums intact). Context parallelism (decode or prefill)
    spreads a block's tokens over ranks, which the chunk -> blocks mapping does not model.
    Until they are supported, start-up stops with the setting to change.
    """
    pc = vllm_config.parallel_config
    for name, what in (("pipeline_parallel_size", "a pipeline stage holds only some layers"),
                       ("decode_context_parallel_size", "ranks hold different tokens of each block"),
                       ("prefill_context_parallel_size", "ranks hold different tokens of each block")):
        size = int(getattr(pc, name, 1) or 1)
        if size > 1:
            from kvortex_core.errors import ConfigError

            raise ConfigError(
                f"{name}={size} is not supported by KVortex yet ({what}, and its keys name a "
                f"tensor-parallel rank's KV of all layers and tokens); serve with {name}=1 "
                "(tensor and data parallelism are supported)"
            )


def _prefix_reuse_possible(vllm_config: VllmConfig) -> bool:
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


def build_namespace(config: KVortexConfig, shape: compat.ModelShape) -> KeyNamespace:
    """The key namespace: model, dtype, canonical layout, shape, TP size and the settings that
    change the KV numbers (``compat.numerics``); rank-independent."""
    return KeyNamespace(
        model_id=config.model_id or shape.model_id,
        revision=config.model_revision or shape.revision,
        dtype=shape.dtype,
        layout=shape.layout_tag,
        num_layers=shape.num_layers,
        num_kv_heads=shape.num_kv_heads * shape.tp_size,
        head_size=shape.head_size,
        tp_size=shape.tp_size,
        salt=config.salt,
        variant=shape.variant,
    )


def _tp_rank(vllm_config: VllmConfig) -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except (AssertionError, ImportError, RuntimeError):  # no process group (tests, one GPU)
        return int(getattr(vllm_config.parallel_config, "rank", 0) or 0)


class KVortexConnector(KVConnectorBase_V1):
    """KVortex for vLLM 0.15 through 0.33: tiered prefix KV reuse, best effort, never wrong."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None,
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        _check_one_group(kv_cache_config)
        _check_parallelism(vllm_config)
        self.kv_config = load_config(vllm_config)
        configure_logging(self.kv_config.log_level)
        shape = compat.model_shape(vllm_config, kv_cache_config)
        _check_fixed_kv_scales(vllm_config, shape)
        self._shape = shape
        namespace = build_namespace(self.kv_config, shape)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._layout_hints: dict[str, Any] | None = None
        self.stats = Stats()
        if role == KVConnectorRole.SCHEDULER:
            chunk = self.kv_config.chunk_tokens
            geometry = slot_geometry(self.kv_config, shape.chunk_bytes(chunk), shape.tp_size)
            tiers = scheduler_tiers(self.kv_config, namespace.digest(), shape.payload_shape(chunk),
                                    shape.torch_dtype, geometry.slot_bytes, shape.tp_size)
            active = _prefix_reuse_possible(vllm_config)
            self._scheduler = SchedulerSide(self.kv_config, namespace, geometry, shape.block_size,
                                            stats=self.stats, tiers=tiers, active=active)
            log.info("KVortex scheduler: %d-token chunks, %d slots of %d bytes per rank",
                     self.kv_config.chunk_tokens, geometry.num_slots, geometry.slot_bytes)
            if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") == "fail":
                log.warning("kv_load_failure_policy is 'fail': a cache load that fails its checks will "
                            "fail the request instead of recomputing it; set "
                            "\"kv_load_failure_policy\": \"recompute\" in --kv-transfer-config")
        else:
            self._worker = WorkerSide(self.kv_config, namespace.digest(), tp_rank=_tp_rank(vllm_config),
                                      tp_size=shape.tp_size, stats=self.stats)
            self._layout_hints = compat.layout_hints(shape)
        # vLLM serves prometheus_client's global registry on its own /metrics.
        self._metrics = start_metrics(self.stats, self.kv_config, expose_global=True)

    def reset_cache(self) -> bool:
        """vLLM's connector cache reset (after a weight update, sleep, ``reset_prefix_cache``):
        the scheduler drops its cpu chunks and keys later requests apart from everything stored
        (``SchedulerSide.reset``); workers hold no index."""
        if self._scheduler is not None:
            return self._scheduler.reset()
        return True

    # ------------------------------------------------------------------ properties

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache is best effort: a dropped save is a future miss, never a wrong answer."""
        return False

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer-wise loads run Python between layers, which a full CUDA graph would skip."""
        transfer = (extra_config or {}).get("transfer") or {}
        return bool(transfer.get("layerwise", True))

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        """vLLM 0.15-era hook: one allocation for all layers makes a block's layers one span."""
        return True

    @property
    def scheduler_side(self) -> SchedulerSide:
        assert self._scheduler is not None, "scheduler-side method called on a worker connector"
        return self._scheduler

    @property
    def worker_side(self) -> WorkerSide:
        assert self._worker is not None, "worker-side method called on a scheduler connector"
        return self._worker

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.worker_side.register_kv_caches(kv_caches, self._layout_hints, self._check_layout)

    def register_cross_layers_kv_cache(self, kv_cache: torch.Tensor, attn_backend: Any = None) -> None:
        """vLLM 0.15-era hook: one tensor for all layers, physically permuted by the backend."""
        order = None
        try:
            order = attn_backend.get_kv_cache_stride_order(include_num_layers_dimension=True)
        except (AttributeError, NotImplementedError, TypeError):
            pass
        views = compat.cross_layer_views(kv_cache, order)
        kcc = self._kv_cache_config
        names = [n for t in getattr(kcc, "kv_cache_tensors", None) or () for n in getattr(t, "shared_by", ())[:1]]
        if len(names) != len(views):
            names = [f"layer.{i}" for i in range(len(views))]
        self.worker_side.register_kv_caches(dict(zip(names, views, strict=True)), self._layout_hints,
                                            self._check_layout)

    def _check_layout(self, layout: Any) -> None:
        """The registered tensors must hold what the scheduler sizes slots and keys by: else every
        step's plan would be refused (or worse), so start-up stops here, before the pool is made."""
        from kvortex_core.errors import LayoutError

        chunk = self.kv_config.chunk_tokens
        got = (tuple(layout.chunk_payload_shape(chunk)), str(layout.dtype).removeprefix("torch."))
        want = (tuple(self._shape.payload_shape(chunk)), self._shape.dtype)
        if got != want:
            raise LayoutError(
                f"the KV caches vLLM registered hold chunks of {got[0]} {got[1]} (layers, kv, tokens, "
                f"heads, head size) but the model config says {want[0]} {want[1]}; KVortex cannot store "
                "this model's KV cache (please report the model and vLLM version)"
            )

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, KVortexConnectorMetadata):
            self.worker_side.bind(connector_metadata.plan)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self._worker is not None:
            self._worker.clear()

    def handle_preemptions(self, arg: Any = None) -> None:
        """Both signatures: a set of ids (0.15) or this step's metadata (0.33)."""
        self.worker_side.handle_preemptions(compat.preempted_ids(arg))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker_side.start_load()

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker_side.wait_for_layer(layer_name)

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        """Saves are issued once per step in wait_for_save (one gather for all layers)."""

    def wait_for_save(self) -> None:
        self.worker_side.start_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sent, received = self.worker_side.get_finished(finished_req_ids)
        return (sent or None), (received or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_side.take_load_errors()

    def shutdown(self) -> None:
        if self._metrics is not None and hasattr(self._metrics, "close"):
            self._metrics.close()
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.close()

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler_side.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self.scheduler_side.update_state_after_alloc(request, compat.kv_blocks_ids(blocks), num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return KVortexConnectorMetadata(self.scheduler_side.build_plan(scheduler_output))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        bad = getattr(connector_output, "invalid_block_ids", None)
        if bad:
            self.scheduler_side.on_load_errors(bad)
        if connector_output.finished_recving:
            self.scheduler_side.on_loads_finished(connector_output.finished_recving)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler_side.request_finished(request), None

