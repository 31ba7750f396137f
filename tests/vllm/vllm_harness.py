"""A real vLLM ``Scheduler`` driving ``KVortexConnector`` on CPU, with a fake model runner.

The scheduler, its KV cache manager, request objects and the connector factory are vLLM's
own; only the model is fake: each step the runner calls the worker-role connectors the way
vLLM's ``KVConnectorModelRunnerMixin`` does (preemptions, bind, load, per-layer wait/save,
wait_for_save, finished and failed transfers, clear), writes known KV for exactly the tokens
the scheduler asked it to compute, and samples a fixed token once the prompt is done.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from vllm.config import (
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    VllmConfig,
    set_current_vllm_config,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm_kv_alloc import Reader, Writer, flash_attn_v015, layer_names, token_kv

from kvortex_vllm.connector import KVortexConnector

L, H_TOTAL, D, BLOCK = 2, 2, 16, 16
DTYPE = torch.float32
SAMPLED = 7
EOS = 2


def write_model_dir(path: Path) -> Path:
    """A directory holding only a tiny Llama ``config.json`` (no weights, no tokenizer)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": H_TOTAL,
        "num_hidden_layers": L, "vocab_size": 1000, "max_position_embeddings": 4096,
        "torch_dtype": "float32", "head_dim": D, "rms_norm_eps": 1e-5, "eos_token_id": EOS,
    }))
    return path


def make_vllm_config(model_dir: Path, extra: dict[str, Any], *, tp: int = 1, prefix_caching: bool = False,
                     max_batched: int = 512, cache_dtype: str = "auto",
                     dp: tuple[int, int, str] | None = None) -> VllmConfig:
    """``dp``: (this engine's data-parallel rank, the data-parallel size, ``"moe"`` or
    ``"dense"``): as vLLM's engine core configures one engine of several, for a MoE model
    (the data-parallel size and rank kept) or a dense one (independent engines: size 1, rank 0,
    the engine's number only in ``data_parallel_index``)."""
    model = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=2048)
    sched = SchedulerConfig(max_num_batched_tokens=max_batched, max_num_seqs=8, max_model_len=2048,
                            is_encoder_decoder=False, enable_chunked_prefill=True)
    cache = CacheConfig(block_size=BLOCK, enable_prefix_caching=prefix_caching, cache_dtype=cache_dtype)
    ktc = KVTransferConfig(kv_connector="KVortexConnector", kv_connector_module_path="kvortex_vllm.connector",
                           kv_role="kv_both", kv_connector_extra_config=extra)
    ktc.kv_load_failure_policy = "recompute"  # 0.33 defaults to "fail"; a cache miss must recompute
    moe = dp is not None and dp[2] == "moe"
    pc = ParallelConfig(tensor_parallel_size=tp,
                        **({"data_parallel_rank": dp[0], "data_parallel_size": dp[1]} if moe and dp else {}))
    if dp is not None:
        pc.data_parallel_index = dp[0]
    return VllmConfig(model_config=model, cache_config=cache, device_config=DeviceConfig("cpu"),
                      scheduler_config=sched, kv_transfer_config=ktc, parallel_config=pc)


def make_kv_cache_config(num_blocks: int, heads_per_rank: int, dtype: torch.dtype = DTYPE,
                         layers: int = L) -> KVCacheConfig:
    """``layers``: how many of the model's layers own a KV cache (the rest reuse one, as with
    ``kv_sharing_target_layer_name``: vLLM leaves them out of the config)."""
    names = layer_names(layers)
    L = layers
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=heads_per_rank, head_size=D, dtype=dtype)
    page = spec.page_size_bytes
    try:  # vLLM 0.30+: one backing allocation, layers at a stride
        from vllm.v1.kv_cache_interface import KVCacheTensor

        params = inspect.signature(KVCacheTensor).parameters
        if "layers" in params:
            tensors = [KVCacheTensor(size=page * num_blocks * L, layers=names, layer_stride=page * num_blocks,
                                     block_stride=page)]
        else:
            tensors = [KVCacheTensor(size=page * num_blocks, shared_by=[n]) for n in names]
    except ImportError:  # pragma: no cover
        tensors = []
    return KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=tensors,
                         kv_cache_groups=[KVCacheGroupSpec(names, spec)])


def allocate_kv(kv_cache_config: KVCacheConfig, heads: int, num_blocks: int,
                order: str = "LBNHC", dtype: torch.dtype = DTYPE) -> tuple[dict[str, torch.Tensor], Writer, Reader, str]:
    """KV tensors the way this vLLM version allocates them (its own allocator where it has one).

    ``order``: the vLLM 0.30+ physical layout (LBNHC is what the engine core resolves for
    NHD attention backends).
    """
    try:
        from vllm.v1.kv_cache_layout import KVCacheLayout
        from vllm.v1.worker.utils import allocate_kv_cache
        from vllm_kv_alloc import unified_writer_for

        layout = KVCacheLayout[order]
        caches = allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout)
        write, read = unified_writer_for(caches, D)
        return caches, write, read, f"vllm allocate_kv_cache ({layout.name})"
    except (ImportError, AttributeError):
        pass
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    probe = tuple(FlashAttentionBackend.get_kv_cache_shape(7, BLOCK, heads, D))
    if len(probe) == 4:
        return _allocate_v02x(kv_cache_config, FlashAttentionBackend)
    if probe[:2] == (7, 2):  # vLLM 0.23-0.25: block first, (B, 2, N, H, D), one cross-layer tensor
        return _allocate_v02x(kv_cache_config, FlashAttentionBackend, block_first=True)
    caches, write, read = flash_attn_v015(L, num_blocks, BLOCK, heads, D, dtype)
    shape = tuple(FlashAttentionBackend.get_kv_cache_shape(num_blocks, BLOCK, heads, D))
    assert all(tuple(t.shape) == shape for t in caches.values()), (shape, "vLLM's FlashAttention shape")
    return caches, write, read, f"vllm FlashAttentionBackend shape {shape}"


class CrossLayerCaches(dict[str, torch.Tensor]):
    """Per-layer views of one cross-layer tensor, with what vLLM hands the connector for it
    (``register_cross_layers_kv_cache(tensor, backend)``) instead of the views."""

    cross_layer: tuple[torch.Tensor, Any]


def _allocate_v02x(kcc: KVCacheConfig, backend: Any, *,
                   block_first: bool = False) -> tuple[dict[str, torch.Tensor], Writer, Reader, str]:
    """vLLM 0.2x before the unified allocator (0.26-0.29: K and V packed per layer, ``[B, H, N,
    2D]``; 0.23-0.25, ``block_first``: FlashAttention's ``(B, 2, N, H, D)``): with a connector
    that prefers cross-layer blocks (ours), the model runner allocates one tensor for every layer
    through ``allocate_uniform_kv_caches`` and registers it whole; done here by that very
    function."""
    from types import SimpleNamespace

    from vllm.config import get_current_vllm_config_or_none
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin
    from vllm_kv_alloc import block_first_writer_for, unified_writer_for

    if get_current_vllm_config_or_none() is None:  # the allocator reads the current config
        with set_current_vllm_config(VllmConfig()):
            return _allocate_v02x(kcc, backend, block_first=block_first)
    spec = kcc.kv_cache_groups[0].kv_cache_spec
    group = SimpleNamespace(kv_cache_spec=spec, backend=backend)
    views, tensor, backend = KVConnectorModelRunnerMixin.allocate_uniform_kv_caches(
        kcc, [[group]], "auto" if spec.dtype != torch.uint8 else "fp8", torch.device("cpu"), [spec.block_size])
    caches = CrossLayerCaches(views)
    caches.cross_layer = (tensor, backend)
    write, read = block_first_writer_for(caches) if block_first else unified_writer_for(caches, D)
    return caches, write, read, f"vllm 0.2x allocate_uniform_kv_caches {tuple(tensor.shape)}"


def _block_hasher() -> Any:
    """vLLM's own per-request block hasher (its prefix cache needs it; KVortex never uses it)."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    init_none_hash(sha256)
    return get_request_block_hasher(BLOCK, sha256)


def make_request(req_id: str, prompt: list[int], max_tokens: int = 1, *, sampling: dict[str, Any] | None = None,
                 **extra: Any) -> Request:
    """A vLLM request; ``sampling``: more ``SamplingParams`` (``prompt_logprobs``...); ``extra``: more
    of ``Request``'s arguments (``cache_salt``, ``lora_request``...)."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, **(sampling or {}))
    kwargs: dict[str, Any] = {"block_hasher": _block_hasher(), **extra}
    if "eos_token_id" in inspect.signature(Request).parameters:
        kwargs["eos_token_id"] = EOS
    return Request(req_id, prompt, params, None, **kwargs)


@dataclass
class Worker:
    """One TP rank: a worker-role connector over its own KV tensors."""

    connector: KVortexConnector
    caches: dict[str, torch.Tensor]
    write: Writer
    read: Reader
    heads: int
    rank: int


@dataclass
class StepLog:
    scheduled: dict[str, int]
    computed_before: dict[str, int]
    loads: int
    saves: int
    finished_sending: set[str]
    invalid_blocks: set[int]
    preempted: set[str]
    finished_recving: set[str]


@dataclass
class _Batch:
    """A batch scheduled and run, whose output the scheduler has not processed yet."""

    out: Any
    kv_out: KVConnectorOutput
    computed: dict[str, int]
    sampled: dict[str, list[int]]
    loads: int
    saves: int
    step_no: int


@dataclass
class Harness:
    """The engine loop: ``schedule()`` -> fake workers -> ``update_from_output()``."""

    scheduler: Scheduler
    workers: list[Worker]
    vllm_config: VllmConfig
    alloc_kind: str
    #: The KV tensors' dtype; uint8 holds fp8 values as vLLM allocates ``--kv-cache-dtype fp8``.
    kv_dtype: torch.dtype = DTYPE
    #: What uint8 caches hold (the fake model writes this type's bytes).
    fp8: torch.dtype = torch.float8_e4m3fn
    tokens: dict[str, list[int]] = field(default_factory=dict)
    blocks: dict[str, list[int]] = field(default_factory=dict)
    history: list[StepLog] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    #: Written by the fake model: (request, position) pairs actually computed.
    computed_positions: dict[str, list[int]] = field(default_factory=dict)
    _sent: dict[str, int] = field(default_factory=dict)
    _recvd: dict[str, int] = field(default_factory=dict)
    #: A context-sensitive fake model (``build(context=True)``): a forward whose context (the
    #: positions it did not compute this step) holds wrong KV on any rank writes wrong KV on
    #: every rank, as a real transformer does (attention reads the context; TP all-reduces).
    context: bool = False
    #: (step, request) pairs whose forward ran over wrong context (context mode).
    tainted: list[tuple[int, str]] = field(default_factory=list)
    #: Those of them that sampled a token vLLM accepted (it did not roll the request back to
    #: recompute): the request's output is wrong.
    kept_tainted: list[tuple[int, str]] = field(default_factory=list)
    #: vLLM's asynchronous scheduling (its default since 0.1x wherever the executor allows it):
    #: ``AsyncScheduler``, and the engine core's batch queue of two, so step s+1 is scheduled
    #: (and its connector plan built) before step s's output is processed.
    async_scheduling: bool = False
    _queue: deque[_Batch] = field(default_factory=deque)
    _step_no: int = 0

    @property
    def connector(self) -> KVortexConnector:
        return self.scheduler.connector  # type: ignore[return-value]

    def close(self) -> None:
        """Shut down the scheduler-side connector and every worker rank's (idempotent)."""
        self.connector.shutdown()
        for w in self.workers:
            w.connector.shutdown()

    def add(self, req_id: str, prompt: list[int], max_tokens: int = 1, **extra: Any) -> None:
        """Queue a request (``sampling={...}``: more SamplingParams; else Request arguments)."""
        self.tokens[req_id] = list(prompt)
        self.scheduler.add_request(make_request(req_id, prompt, max_tokens, **extra))

    def abort(self, req_id: str) -> None:
        from vllm.v1.request import RequestStatus

        self.scheduler.finish_requests([req_id], RequestStatus.FINISHED_ABORTED)

    def step(self) -> StepLog | None:
        """One engine-core step: schedule and run a batch, and process an output.

        Synchronous scheduling processes the batch it ran. Asynchronous scheduling (vLLM's
        ``step_with_batch_queue``) queues it and returns ``None`` while fewer than two batches
        are in flight; else it processes the oldest and returns that batch's log."""
        if not self.async_scheduling:
            return self._process(self._schedule_and_run())
        if self.scheduler.has_requests():
            self._queue.appendleft(self._schedule_and_run())
            if len(self._queue) < 2:
                return None
        if not self._queue:
            return None
        return self._process(self._queue.pop())

    def _schedule_and_run(self) -> _Batch:
        # tokens still being sampled by batches in flight (asynchronous scheduling), before
        # schedule() adds this batch's own: the fake model always samples SAMPLED
        pending = {r: getattr(req, "num_output_placeholders", 0) for r, req in self.scheduler.requests.items()}
        out = self.scheduler.schedule()
        if not out.num_scheduled_tokens:
            # Nothing to compute: only background transfers (async loads, saves) are pending.
            # A real engine would not spin either; give those threads the CPU.
            time.sleep(0.002)
        for r in out.num_scheduled_tokens:  # the engine's view of each request's tokens
            self.tokens[r] = list(self.scheduler.requests[r].all_token_ids) + [SAMPLED] * pending.get(r, 0)
        self._step_no = len(self.history) + len(self._queue)
        kv_out, loads, saves = self._run_workers(out)
        computed = self._computed_before(out)
        sampled = {r: [SAMPLED] if computed[r] + n >= len(self.tokens[r]) else []
                   for r, n in out.num_scheduled_tokens.items()}
        return _Batch(out, kv_out, computed, sampled, loads, saves, self._step_no)

    def _process(self, b: _Batch) -> StepLog:
        out, kv_out, computed = b.out, b.kv_out, b.computed
        req_ids = list(out.num_scheduled_tokens)
        mro = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=[b.sampled[r] for r in req_ids], logprobs=None,
                                prompt_logprobs_dict={}, pooler_output=[], kv_connector_output=kv_out)
        results = self.scheduler.update_from_output(out, mro)
        accepted = set()
        for eco in results.values():
            for o in eco.outputs:
                if o.new_token_ids:
                    accepted.add(o.request_id)
                if o.finish_reason is not None:
                    self.finished.add(o.request_id)
        # A token sampled over wrong context that vLLM accepted is wrong output. (A forward over
        # wrong context that samples nothing wrote wrong KV, which taints the forward that reads it.)
        self.kept_tainted += [(n, r) for n, r in self.tainted if n == b.step_no and r in accepted]
        log = StepLog(dict(out.num_scheduled_tokens), computed, b.loads, b.saves,
                      set(kv_out.finished_sending or ()), set(kv_out.invalid_block_ids or ()),
                      set(out.preempted_req_ids or ()), set(kv_out.finished_recving or ()))
        self.history.append(log)
        return log

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_requests() and not self._queue:
                return
            self.step()
        raise AssertionError(f"requests still pending after {max_steps} steps")

    # ------------------------------------------------------------------ the fake model runner

    def _computed_before(self, out: Any) -> dict[str, int]:
        computed = {n.req_id: n.num_computed_tokens for n in out.scheduled_new_reqs}
        cached = out.scheduled_cached_reqs
        computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        return computed

    def _track_blocks(self, out: Any) -> None:
        from kvortex_vllm.compat import scheduled_requests

        for req_id, new_blocks, replace, _ in scheduled_requests(out):
            if replace:
                self.blocks[req_id] = list(new_blocks)
            else:
                self.blocks.setdefault(req_id, []).extend(new_blocks)

    def _run_workers(self, out: Any) -> tuple[KVConnectorOutput, int, int]:
        self._track_blocks(out)
        computed = self._computed_before(out)
        if self.context:
            return self._run_workers_in_context(out, computed)
        invalid: set[int] = set()
        for w in self.workers:
            c = self._begin(w, out)
            for li, name in enumerate(w.caches):
                c.wait_for_layer_load(name)
                self._compute_layer(w, li, out, computed)
                c.save_kv_layer(name, w.caches[name], None)
            invalid |= self._end(w, out)
        return self._output(out, computed, invalid)

    def _run_workers_in_context(self, out: Any, computed: dict[str, int]) -> tuple[KVConnectorOutput, int, int]:
        """As ``_run_workers``, every rank's loads and forward first, then the context check,
        then every rank's saves (each layer is still saved after it was computed)."""
        for w in self.workers:
            c = self._begin(w, out)
            for li, name in enumerate(w.caches):
                c.wait_for_layer_load(name)
                self._compute_layer(w, li, out, computed)
        for r, n in out.num_scheduled_tokens.items():
            ctx = range(computed[r])
            if ctx and not all(torch.equal(self.kv_of(r, ctx, w), self.expected_of(self.tokens[r], ctx, w))
                               for w in self.workers):
                self.tainted.append((self._step_no, r))
                for w in self.workers:
                    self._poison(w, r, range(computed[r], computed[r] + n))
        invalid: set[int] = set()
        for w in self.workers:
            for name in w.caches:
                w.connector.save_kv_layer(name, w.caches[name], None)
            invalid |= self._end(w, out)
        return self._output(out, computed, invalid)

    def _begin(self, w: Worker, out: Any) -> KVortexConnector:
        """One rank's step up to its forward: preemptions, the plan, the loads started."""
        c = w.connector
        meta = out.kv_connector_metadata
        if out.preempted_req_ids:
            c.handle_preemptions(_preemption_arg(out, meta))
        c.bind_connector_metadata(meta)
        c.start_load_kv(None)
        return c

    def _end(self, w: Worker, out: Any) -> set[int]:
        """One rank's step after its forward; returns the blocks it failed to load."""
        c = w.connector
        c.wait_for_save()
        done_sending, done_recving = c.get_finished(set(out.finished_req_ids))
        for r in done_sending or ():
            self._sent[r] = self._sent.get(r, 0) + 1
        for r in done_recving or ():
            self._recvd[r] = self._recvd.get(r, 0) + 1
        invalid = c.get_block_ids_with_load_errors()
        c.clear_connector_metadata()
        return invalid

    def _output(self, out: Any, computed: dict[str, int], invalid: set[int]) -> tuple[KVConnectorOutput, int, int]:
        for r, n in out.num_scheduled_tokens.items():
            self.computed_positions.setdefault(r, []).extend(range(computed[r], computed[r] + n))
        plan = out.kv_connector_metadata.plan
        # vLLM's output aggregator: a request is done only once every rank said so (any step).
        sent = self._complete(self._sent)
        recvd = self._complete(self._recvd)
        return (KVConnectorOutput(finished_sending=sent or None, finished_recving=recvd or None,
                                  invalid_block_ids=invalid), len(plan.loads), len(plan.saves))

    def _poison(self, w: Worker, req_id: str, positions: range) -> None:
        """What a forward over wrong context writes: the expected KV of each position, shifted."""
        toks = self.tokens[req_id]
        for layer in range(L):
            for pos in positions:
                k, v = self.expected_kv(toks[pos], pos, layer, w)
                k, v = (k + 1000, v + 1000) if k.dtype.is_floating_point else (k ^ 0x55, v ^ 0x55)
                block, off = self.blocks[req_id][pos // BLOCK], pos % BLOCK
                w.write(layer, block, off, k, v)

    def _complete(self, counts: dict[str, int]) -> set[str]:
        done = {r for r, n in counts.items() if n >= len(self.workers)}
        for r in done:
            del counts[r]
        return done

    def _compute_layer(self, w: Worker, layer: int, out: Any, computed: dict[str, int]) -> None:
        for r, n in out.num_scheduled_tokens.items():
            toks = self.tokens[r]
            for pos in range(computed[r], computed[r] + n):
                k, v = self.expected_kv(toks[pos], pos, layer, w)
                block, off = self.blocks[r][pos // BLOCK], pos % BLOCK
                w.write(layer, block, off, k, v)

    def expected_kv(self, token: int, pos: int, layer: int, w: Worker) -> tuple[torch.Tensor, torch.Tensor]:
        """The fake model's KV for one token, this rank's head shard."""
        k, v = token_kv(token, pos, layer, H_TOTAL, D, torch.float32)
        if self.kv_dtype == torch.uint8:
            k, v = k.to(self.fp8).view(torch.uint8), v.to(self.fp8).view(torch.uint8)
        else:
            k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
        lo = w.rank * w.heads
        return k[lo:lo + w.heads], v[lo:lo + w.heads]

    # ------------------------------------------------------------------ checks

    def scrub(self) -> None:
        """Fill every KV block with garbage, as if other requests had reused all blocks."""
        for w in self.workers:
            for t in w.caches.values():
                t.fill_(0xA5 if t.element_size() == 1 else -12345.0)

    def slot_of(self, key: bytes) -> int:
        entry = self.connector.scheduler_side.index.get(key)
        assert entry is not None, "chunk not stored"
        return int(entry.location)

    def keys_of(self, prompt: list[int]) -> list[bytes]:
        return self.connector.scheduler_side.hasher.keys(prompt)

    def free_blocks(self) -> int:
        return self.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()

    def kv_of(self, req_id: str, positions: Iterable[int], w: Worker | None = None) -> torch.Tensor:
        """The KV stored in the request's blocks for ``positions`` (all layers), as one tensor."""
        w = w or self.workers[0]
        parts = []
        for pos in positions:
            block, off = self.blocks[req_id][pos // BLOCK], pos % BLOCK
            for layer in range(L):
                k, v = w.read(layer, block, off)
                parts += [k.clone(), v.clone()]
        return torch.stack(parts)

    def expected_of(self, tokens: list[int], positions: Iterable[int], w: Worker | None = None) -> torch.Tensor:
        w = w or self.workers[0]
        parts = []
        for pos in positions:
            for layer in range(L):
                k, v = self.expected_kv(tokens[pos], pos, layer, w)
                parts += [k, v]
        return torch.stack(parts)


def _preemption_arg(out: Any, meta: Any) -> Any:
    """What this vLLM version passes to ``handle_preemptions``."""
    params = list(inspect.signature(KVortexConnector.__mro__[1].handle_preemptions).parameters)
    return meta if "kv_connector_metadata" in params else set(out.preempted_req_ids)


#: Every harness built by the running test (closed by the autouse fixture in conftest.py).
BUILT: list[Harness] = []


def close_all() -> None:
    """Shut down every harness built so far: scheduler side and each worker rank (idempotent)."""
    while BUILT:
        BUILT.pop().close()


def build(tmp: Path, extra: dict[str, Any] | None = None, *, tp: int = 1, num_blocks: int = 64,
          prefix_caching: bool = False, max_batched: int = 512, order: str = "LBNHC",
          cache_dtype: str = "auto", context: bool = False, async_scheduling: bool = False,
          dp: tuple[int, int, str] | None = None) -> Harness:
    """A scheduler with the connector (through kv_connector_module_path) and ``tp`` worker ranks.

    ``cache_dtype``: vLLM's ``--kv-cache-dtype``; ``fp8``/``fp8_e4m3``/``fp8_e5m2`` caches are
    uint8 tensors, as vLLM allocates them (``STR_DTYPE_TO_TORCH_DTYPE``). ``async_scheduling``:
    vLLM's ``AsyncScheduler`` and the engine core's batch queue (see ``Harness.step``)."""
    extra = {"chunk_tokens": 32, "tiers": {"cpu": {"type": "cpu", "capacity": "1MiB"}}, **(extra or {})}
    vc = make_vllm_config(write_model_dir(tmp / "model"), extra, tp=tp, prefix_caching=prefix_caching,
                          max_batched=max_batched, cache_dtype=cache_dtype, dp=dp)
    heads = H_TOTAL // tp
    kv_dtype = torch.uint8 if cache_dtype.startswith("fp8") else DTYPE
    kcc = make_kv_cache_config(num_blocks, heads, kv_dtype)
    vc.cache_config.num_gpu_blocks = num_blocks
    vc.scheduler_config.async_scheduling = async_scheduling
    scheduler_cls = Scheduler
    if async_scheduling:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler

        scheduler_cls = AsyncScheduler
    scheduler = scheduler_cls(**_scheduler_kwargs(vc, kcc))
    assert isinstance(scheduler.connector, KVortexConnector), type(scheduler.connector)
    workers = []
    kind = ""
    for rank in range(tp):
        wc = copy.deepcopy(vc)
        wc.parallel_config.rank = rank
        conn = KVortexConnector(wc, KVConnectorRole.WORKER, kcc)
        with set_current_vllm_config(wc):
            caches, write, read, kind = allocate_kv(kcc, heads, num_blocks, order, kv_dtype)
        if isinstance(caches, CrossLayerCaches):  # as vLLM 0.2x's model runner registers it
            conn.register_cross_layers_kv_cache(*caches.cross_layer)
        else:
            conn.register_kv_caches(caches)
        workers.append(Worker(conn, caches, write, read, heads, rank))
    fp8 = torch.float8_e5m2 if cache_dtype == "fp8_e5m2" else torch.float8_e4m3fn
    harness = Harness(scheduler, workers, vc, kind, kv_dtype, fp8, context=context,
                      async_scheduling=async_scheduling)
    BUILT.append(harness)
    return harness


def _scheduler_kwargs(vc: VllmConfig, kcc: KVCacheConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"vllm_config": vc, "kv_cache_config": kcc,
                              "structured_output_manager": StructuredOutputManager(vc), "log_stats": True}
    params = inspect.signature(Scheduler).parameters
    if "block_size" in params:
        kwargs["block_size"] = BLOCK
    return kwargs
