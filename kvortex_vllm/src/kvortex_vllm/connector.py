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
from kvortex_vllm import compat, startup
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
        self.kv_config = load_config(vllm_config)
        configure_logging(self.kv_config.log_level)
        shape = compat.model_shape(vllm_config, kv_cache_config)
        startup.check_config(vllm_config, kv_cache_config, shape)
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
                                    shape.torch_dtype, geometry.slot_bytes, shape.tp_size,
                                    context=compat.backend_context(vllm_config), stats=self.stats)
            active = startup.prefix_reuse_possible(vllm_config)
            self._scheduler = SchedulerSide(self.kv_config, namespace, geometry, shape.block_size,
                                            stats=self.stats, tiers=tiers, active=active,
                                            recheck=compat.recheck_failed_loads(vllm_config))
            log.info("KVortex scheduler: %d-token chunks, %d slots of %d bytes per rank",
                     self.kv_config.chunk_tokens, geometry.num_slots, geometry.slot_bytes)
            if getattr(self._kv_transfer_config, "kv_load_failure_policy", "recompute") == "fail":
                log.warning("kv_load_failure_policy is 'fail': a cache load that fails its checks will "
                            "fail the request instead of recomputing it; set "
                            "\"kv_load_failure_policy\": \"recompute\" in --kv-transfer-config")
        else:
            self._worker = WorkerSide(self.kv_config, namespace.digest(), tp_rank=_tp_rank(vllm_config),
                                      tp_size=shape.tp_size, stats=self.stats,
                                      context=compat.backend_context(vllm_config))
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
        """True, though a cache is best effort (a dropped save is a future miss): vLLM 0.33 reads
        it only to drop, rather than deliver, the in-flight output of a request it preempts under
        asynchronous scheduling. That output may come from a step that ran over a load which
        failed: the preempted request is no longer running when vLLM reads the failure, so
        nothing else rolls it back. Dropped, those positions are sampled again after resuming."""
        return True

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """Layer-wise loads run Python between layers, which a full CUDA graph would skip.

        Read from the whole configuration (``kv_connector_extra_config`` over env over YAML),
        as the connector reads it: ``KVORTEX_TRANSFER__LAYERWISE=false`` still asked for
        piecewise graphs when only the extra config was read (a red-team finding). A config
        that does not load asks for them (the safe choice); the connector reports its error.
        """
        try:
            return bool(KVortexConfig(**dict(extra_config or {})).transfer.layerwise)
        except Exception:  # noqa: BLE001 - the connector's own start reports a bad config
            return True

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        """vLLM 0.15-0.2x hook: one allocation for all layers makes a block's layers one span."""
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
        """vLLM 0.15-0.2x hook: one tensor for all layers, physically permuted by the backend."""
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
        startup.check_layout(layout, self._shape, self.kv_config.chunk_tokens)

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
        if connector_output.finished_sending:
            self.scheduler_side.on_saves_finished(connector_output.finished_sending)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler_side.request_finished(request), None

