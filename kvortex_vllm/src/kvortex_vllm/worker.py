"""Worker side of the connector: the data plane of one GPU rank. No vLLM import here.

It owns this rank's pinned pool (same slot count as every other rank, so a slot id from the
scheduler means the same chunk everywhere) and a :class:`~kvortex_core.data.transfer.
TransferEngine` over the registered KV caches, and executes each step's
:class:`~kvortex_vllm.metadata.StepPlan`:

- loads start before the forward (layer-wise: ``wait_for_layer`` orders each attention layer
  after its own bytes; otherwise the compute stream waits for the whole load);
- saves are issued after the forward on the transfer engine's side streams, so they never
  delay sampling; a finished save writes the slot's self-checking header (its rank key);
- a load first checks the slot's header against the expected rank key, namespace, shape and
  dtype; any mismatch is a failed load whose blocks are reported so vLLM recomputes them;
- requests the scheduler keeps alive for their saves are reported finished once every save
  of theirs is done; preempted requests' saves are completed before their blocks are reused.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kvortex_core.config import KVortexConfig
from kvortex_core.control.keys import rank_keys
from kvortex_core.control.stats import Stats
from kvortex_core.data.layouts import KVLayout, detect_layout, ordered_layers
from kvortex_core.data.payload import HEADER_BYTES, check_identity, read_header, write_header
from kvortex_core.data.pool import PinnedPool
from kvortex_core.data.transfer import TransferEngine, TransferHandle
from kvortex_core.errors import KVortexError, LayoutError, PayloadError
from kvortex_core.tiering.counters import CHUNKS_DROPPED, SAVE_SKIPPED_SLOT_BUSY
from kvortex_vllm.lower import WorkerTiers, has_lower_tiers, open_tiers
from kvortex_vllm.metadata import (
    SLOT_ALIGNMENT,
    LoadSpec,
    SaveSpec,
    SlotGeometry,
    StepPlan,
    slot_geometry,
)

log = logging.getLogger(__name__)


@dataclass
class _PendingSave:
    spec: SaveSpec
    handle: TransferHandle


@dataclass
class _AsyncLoad:
    """A request whose chunks are read from a lower tier before they are copied to its blocks."""

    specs: list[LoadSpec]
    fetch: concurrent.futures.Future[list[bool]] | None
    handle: TransferHandle | None = None
    #: The request finished (aborted) while this ran: its chunks are not copied to its blocks.
    dropped: bool = False


@dataclass
class WorkerCounters:
    """What this rank moved (for logs, stats and the GPU check)."""

    saved_chunks: int = 0
    loaded_chunks: int = 0
    failed_chunks: int = 0
    saved_bytes: int = 0
    loaded_bytes: int = 0


class WorkerSide:
    """Executes the scheduler's plans on one rank."""

    def __init__(
        self, config: KVortexConfig, namespace: bytes, *, tp_rank: int = 0, tp_size: int = 1,
        pin: bool | None = None, stats: Stats | None = None, context: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.context = context  # the lower tiers' BackendContext fields (instance, engine_id)
        self.stats = stats or Stats()
        self.namespace = namespace
        self.rank = tp_rank
        self.tp_size = tp_size
        self.pin = pin
        self.layout: KVLayout | None = None
        self.geometry: SlotGeometry | None = None
        self.pool: PinnedPool | None = None
        self.engine: TransferEngine | None = None
        self.layer_index: dict[str, int] = {}
        self.counters = WorkerCounters()
        self._plan: StepPlan | None = None
        self._loads: list[TransferHandle] = []
        self._pending: dict[int, _PendingSave] = {}  # slot -> latest save into it
        self._req_saves: dict[str, set[int]] = defaultdict(set)  # req -> slots still saving
        self._watch: set[str] = set()  # finished requests awaiting their saves
        self._load_errors: set[int] = set()
        #: Blocks reported failed in the last step (see ``take_load_errors``).
        self._last_errors: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests whose load failed this step
        self._async: dict[str, _AsyncLoad] = {}
        self.tiers: WorkerTiers | None = None
        #: KV on the CPU: no streams order a copy after the forward, so transfers complete
        #: before the call returns (the next forward may rewrite the blocks).
        self._host_kv = False

    # ------------------------------------------------------------------ setup

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor] | Any, hints: dict[str, Any] | None = None,
                           check: Callable[[KVLayout], None] | None = None) -> KVLayout:
        """Detect the layout, allocate this rank's pool and build the transfer engine.

        ``check``: called with the detected layout before anything is allocated (raises to refuse it).
        """
        if isinstance(kv_caches, dict):
            ordered = ordered_layers(kv_caches)  # layer order, as KVortexEngine takes a dict
            caches: Any = []
            self.layer_index = {}
            owner: dict[tuple[Any, ...], int] = {}
            for name, t in ordered:
                # vLLM hands layers that reuse another layer's KV (kv_sharing_target_layer_name,
                # e.g. Gemma 3n) as the target's own tensor under their name: stored once, and
                # their load waits are the target's
                ident = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)
                if ident not in owner:
                    owner[ident] = len(caches)
                    caches.append(t)
                self.layer_index[name] = owner[ident]
        else:
            caches = kv_caches
        layout = detect_layout(caches, hints)
        if check is not None:
            check(layout)
        chunk = self.config.chunk_tokens
        if chunk % layout.block_size:
            raise LayoutError(
                f"chunk_tokens={chunk} is not a multiple of the KV block size {layout.block_size}; "
                f"set chunk_tokens to a multiple of {layout.block_size}"
            )
        geo = slot_geometry(self.config, layout.chunk_bytes(chunk), self.tp_size)
        device = layout_device(caches)
        self.pool = PinnedPool(geo.slot_bytes, geo.capacity_bytes, pin=self.pin,
                               alignment=SLOT_ALIGNMENT,
                               device=device.index if device.type == "cuda" else None)
        tc = self.config.transfer
        self.engine = TransferEngine(caches, layout, chunk_tokens=chunk, staging_bytes=int(tc.staging_bytes),
                                     num_streams=tc.num_streams, gather=tc.gather)
        self.layout, self.geometry = layout, geo
        self._host_kv = device.type != "cuda"
        if has_lower_tiers(self.config):
            mgr = open_tiers(self.config, self.namespace, layout.chunk_payload_shape(chunk), layout.dtype,
                             self.pool, rank=self.rank, world_size=self.tp_size, stats=self.stats,
                             context=self.context)
            self.tiers = WorkerTiers(mgr, self.rank)
        log.info("rank %d: %s KV layout, %d layers, %d slots of %d bytes (%s)", self.rank, layout.kind,
                 layout.num_layers, geo.num_slots, geo.slot_bytes, "pinned" if self.pool.pinned else "pageable")
        return layout

    # ------------------------------------------------------------------ per step

    def bind(self, plan: StepPlan) -> None:
        if self.geometry is not None and plan.num_slots != self.geometry.num_slots:
            raise KVortexError(
                f"rank {self.rank}: the scheduler plans {plan.num_slots} pool slots but this rank "
                f"has {self.geometry.num_slots}; every rank and the scheduler must see the same "
                "config (tiers.cpu.capacity, ranks_per_node, chunk_tokens) and model shape"
            )
        self._plan = plan
        self._watch |= plan.await_saves
        self._failed_reqs = set()
        if plan.drop:
            self._drop(plan.drop)
        if plan.stale:  # garbage from an earlier failed load, handed out again by vLLM
            self._load_errors.update(plan.stale)

    def _drop(self, chunks: list[tuple[bytes, int]]) -> None:
        """Chunks a forward computed over a failed load's blocks: never load or keep them."""
        layout = self._layout()
        shape = layout.chunk_payload_shape(self.config.chunk_tokens)
        keys = []
        dropped = 0  # this rank's copies: a slot invalidated, or a chunk only below
        for key, slot in chunks:
            rank_key = rank_keys([key], self.rank)[0]
            keys.append(rank_key)
            if not 0 <= slot < self._geo().num_slots:
                dropped += 1
                continue
            p = self._pending.get(slot)
            if p is not None and p.spec.key != key:
                continue  # the slot holds a newer save already
            self._finish_save(slot)
            try:
                check_identity(read_header(self._pool().view(slot)[:HEADER_BYTES]), key=rank_key,
                               namespace=self.namespace, shape=shape, dtype=layout.dtype)
            except PayloadError:
                continue  # reused or invalidated since
            self._invalidate(slot)  # also discards a write-behind copy not taken yet
            dropped += 1
        if dropped:  # the rank that skipped these saves counted them then
            self.stats.inc(CHUNKS_DROPPED, dropped, self.config.tier_names[0])
        if self.tiers is not None:
            self.tiers.drop(keys)

    def clear(self) -> None:
        self._plan = None
        self._loads = []

    def start_load(self) -> None:
        """Verify and start every load of the bound plan (before the forward)."""
        plan = self._plan
        if plan is None or not plan.loads:
            return
        by_req: dict[str, list[LoadSpec]] = defaultdict(list)
        for spec in plan.loads:
            by_req[spec.req_id].append(spec)
        layerwise = self.config.transfer.layerwise
        for req_id, specs in by_req.items():
            if req_id in plan.async_loads or any(s.fetch for s in specs):
                self._start_fetch(req_id, specs)
                continue
            good = self._verified_prefix(specs)
            if not good:
                continue
            srcs = [self._payload(s.slot) for s in good]
            handle = self._engine().load(srcs, [list(s.block_ids) for s in good], layerwise=layerwise,
                                         skip_blocks=good[0].skip_blocks)
            if self._host_kv:
                handle.wait(self.config.timeouts.transfer_s)
            elif not layerwise:
                handle.stream_wait()
            self._loads.append(handle)
            self._count_loaded(len(good))

    def _start_fetch(self, req_id: str, specs: list[LoadSpec]) -> None:
        """Read the lower-tier chunks into their slots in the background (an async load)."""
        items = []
        for s in specs:
            if s.fetch and 0 <= s.slot < self._geo().num_slots:
                self._finish_save(s.slot)
                self._invalidate(s.slot)
                items.append((rank_keys([s.key], self.rank)[0], s.slot))
        tiers = self.tiers
        future = tiers.fetch(items) if tiers is not None and items else None
        self._async[req_id] = _AsyncLoad(specs, future)

    def _poll_async(self) -> set[str]:
        """Advance async loads: fetched -> copy to blocks -> done. Returns the finished requests."""
        done: set[str] = set()
        for req_id, job in list(self._async.items()):
            if job.handle is None:
                if job.fetch is not None and not job.fetch.done():
                    continue
                if not job.dropped:
                    self._copy_fetched(job)
            if job.handle is None or job.handle.done():
                del self._async[req_id]
                if req_id not in self._watch:  # else reported with the finished (delayed) frees
                    done.add(req_id)
        return done

    def _copy_fetched(self, job: _AsyncLoad) -> None:
        try:
            ok = list(job.fetch.result()) if job.fetch is not None else []
        except Exception:
            log.exception("rank %d: lower-tier fetch failed", self.rank)
            ok = []
            for s in job.specs:  # partly written slots: no later load may trust them
                if s.fetch and 0 <= s.slot < self._geo().num_slots:
                    self._invalidate(s.slot)
        fetched, n, slots = iter(ok), 0, self._geo().num_slots
        for s in job.specs:  # fetch results are in spec order, for the specs with a slot
            if s.fetch and not (0 <= s.slot < slots and next(fetched, False)):
                break
            n += 1
        self._fail(job.specs[n:])
        good = self._verified_prefix(job.specs[:n])
        if good:
            job.handle = self._engine().load([self._payload(s.slot) for s in good],
                                             [list(s.block_ids) for s in good],
                                             skip_blocks=good[0].skip_blocks)
            if self._host_kv:
                job.handle.wait(self.config.timeouts.transfer_s)
            self._count_loaded(len(good))

    def _count_loaded(self, chunks: int) -> None:
        self.counters.loaded_chunks += chunks
        self.counters.loaded_bytes += chunks * self._geo().chunk_bytes
        self.stats.record_loaded(chunks * self._geo().chunk_bytes, self.config.tier_names[0])

    def _fail(self, specs: list[LoadSpec]) -> list[LoadSpec]:
        for s in specs:
            self._load_errors.update(s.block_ids[s.skip_blocks:])
        self.counters.failed_chunks += len(specs)
        self.stats.inc("load_failures", len(specs), self.config.tier_names[0])
        if specs:
            log.warning("rank %d: %d chunk(s) of request %s could not be read from a lower tier; "
                        "they will be recomputed", self.rank, len(specs), specs[0].req_id)
        return []

    def _verified_prefix(self, specs: list[LoadSpec]) -> list[LoadSpec]:
        """The leading chunks whose slots hold what the plan expects; the rest are reported failed."""
        for i, spec in enumerate(specs):
            problem = self._check_slot(spec)
            if problem is not None:
                self._failed_reqs.add(spec.req_id)
                failed = specs[i:]
                for s in failed:
                    self._load_errors.update(s.block_ids[s.skip_blocks:])
                self.counters.failed_chunks += len(failed)
                self.stats.inc("load_failures", len(failed), self.config.tier_names[0])
                log.warning("rank %d: load of request %s chunk %s failed (%s); %d chunk(s) will be "
                            "recomputed", self.rank, spec.req_id, spec.key.hex()[:16], problem, len(failed))
                return specs[:i]
        return specs

    def _check_slot(self, spec: LoadSpec) -> str | None:
        if not 0 <= spec.slot < self._geo().num_slots:
            return f"no slot (slot id {spec.slot})"
        self._finish_save(spec.slot)
        if self.tiers is not None and self.tiers.busy(spec.slot):
            return "its slot is still being written by a lower-tier read that timed out"
        layout = self._layout()
        try:
            header = read_header(self._pool().view(spec.slot)[:HEADER_BYTES])
            check_identity(header, key=rank_keys([spec.key], self.rank)[0], namespace=self.namespace,
                           shape=layout.chunk_payload_shape(self.config.chunk_tokens), dtype=layout.dtype)
        except PayloadError as exc:
            return str(exc)
        return None

    def wait_for_layer(self, layer_name: str) -> None:
        """Order the current stream after this layer's loaded bytes (no host block)."""
        idx = self.layer_index.get(layer_name)
        for handle in self._loads:
            if idx is None:
                handle.stream_wait()
            else:
                handle.wait_layer(idx)

    def start_save(self) -> None:
        """Issue this step's saves on the side streams (called after the forward)."""
        plan = self._plan
        if plan is None or not plan.saves:
            return
        saves = self._storable(plan.saves)
        if not saves:
            return
        for spec in saves:
            self._finish_save(spec.slot)  # an older save into a reused slot must land first
            self._invalidate(spec.slot)
        dst = [self._payload(s.slot) for s in saves]
        try:
            handle = self._engine().save([list(s.block_ids) for s in saves], dst)
        except KVortexError:
            log.exception("rank %d: saving %d chunk(s) failed; they stay uncached", self.rank, len(saves))
            return
        for spec in saves:
            self._pending[spec.slot] = _PendingSave(spec, handle)
            self._req_saves[spec.req_id].add(spec.slot)
        if self._host_kv:
            handle.wait(self.config.timeouts.transfer_s)
        self.poll()

    def _storable(self, saves: list[SaveSpec]) -> list[SaveSpec]:
        """The saves this rank makes: none of a request whose load failed this step (its forward
        read the failed blocks' garbage), none into a slot a timed-out lower-tier read may still
        write. A skipped save leaves its slot's magic zeroed, so the scheduler's later load of
        that chunk fails its identity check and is recomputed: never wrong bytes."""
        cpu = self.config.tier_names[0]
        if self._failed_reqs:
            kept = [s for s in saves if s.req_id not in self._failed_reqs]
            if len(kept) < len(saves):
                self.stats.inc(CHUNKS_DROPPED, len(saves) - len(kept), cpu)
            saves = kept
        tiers = self.tiers
        busy = {s.slot for s in saves if tiers.busy(s.slot)} if tiers is not None else set()
        if not busy:
            return saves
        self.stats.inc(SAVE_SKIPPED_SLOT_BUSY, len(busy), cpu)
        log.warning("rank %d: %d chunk(s) not saved: their slot is still being written by a lower-tier "
                    "read that timed out (timeouts.backend_op_s); a later load of them is recomputed",
                    self.rank, len(busy))
        return [s for s in saves if s.slot not in busy]

    def poll(self) -> None:
        """Seal every save whose copy has completed (never blocks)."""
        for slot, p in list(self._pending.items()):
            if p.handle.done():
                self._seal(slot, p)

    def _finish_save(self, slot: int) -> None:
        p = self._pending.get(slot)
        if p is not None:
            p.handle.wait(self.config.timeouts.transfer_s)
            self._seal(slot, p)

    def _seal(self, slot: int, p: _PendingSave) -> None:
        del self._pending[slot]
        layout = self._layout()
        rank_key = rank_keys([p.spec.key], self.rank)[0]
        # The identity header makes a reused or lost slot detectable on load. The payload
        # checksum (0 here) is computed only when a slot is written to a lower tier: hashing
        # every save on the host would cap saves well below the DMA rate.
        write_header(self._pool().view(slot), key=rank_key,
                     namespace=self.namespace, shape=layout.chunk_payload_shape(self.config.chunk_tokens),
                     dtype=layout.dtype, payload_len=self._geo().chunk_bytes, checksum=0)
        if self.tiers is not None:
            self.tiers.write_behind(slot, rank_key)
        slots = self._req_saves.get(p.spec.req_id)
        if slots is not None:
            slots.discard(slot)
            if not slots:
                del self._req_saves[p.spec.req_id]
        self.counters.saved_chunks += 1
        self.counters.saved_bytes += self._geo().chunk_bytes
        self.stats.record_saved(self._geo().chunk_bytes, self.config.tier_names[0])

    def _invalidate(self, slot: int) -> None:
        self._pool().view(slot)[:8].zero_()  # the magic: no load trusts a slot being rewritten
        if self.tiers is not None:
            self.tiers.slot_reused(slot)  # and no write-behind copy taken across this is used

    def handle_preemptions(self, req_ids: set[str]) -> None:
        """Finish the saves of preempted requests before vLLM reuses their blocks."""
        for req_id in req_ids:
            for slot in list(self._req_saves.get(req_id, ())):
                self._finish_save(slot)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str], set[str]]:
        """(requests the scheduler kept alive whose saves are all done, async loads completed).

        An async load of a request that finished (vLLM aborted it while it waited) copies
        nothing into its blocks: they are another request's once vLLM frees them. Where the
        scheduler kept them (vLLM 0.15), the request is reported with the saves, once its load
        ended; else with the loads, as vLLM 0.2x+ expect."""
        self.poll()
        for req_id in finished_req_ids:
            job = self._async.get(req_id)
            if job is not None:
                job.dropped = True
        loaded = self._poll_async()
        done = {r for r in self._watch if r not in self._req_saves and r not in self._async}
        self._watch -= done
        return done, loaded

    def take_load_errors(self) -> set[int]:
        """Blocks that failed to load this step, those the plan marked stale, and those of the
        last step's failures that the plan asks to recheck (``StepPlan.recheck``)."""
        errors, self._load_errors = self._load_errors, set()
        recheck = self._plan.recheck if self._plan is not None else frozenset()
        again = self._last_errors & recheck
        self._last_errors = errors
        return errors | again

    def shutdown(self) -> None:
        start = time.monotonic()
        for slot in list(self._pending):
            try:
                self._finish_save(slot)
            except KVortexError:
                log.warning("rank %d: a save did not finish at shutdown", self.rank)
        for job in self._async.values():
            if job.fetch is not None:
                job.fetch.cancel()
        self._async.clear()
        if self.tiers is not None:
            self.tiers.close()
            self.tiers = None
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        log.debug("rank %d: shut down in %.3fs", self.rank, time.monotonic() - start)

    # ------------------------------------------------------------------ helpers

    def _payload(self, slot: int) -> torch.Tensor:
        return self._pool().view(slot)[HEADER_BYTES : HEADER_BYTES + self._geo().chunk_bytes]

    def _engine(self) -> TransferEngine:
        if self.engine is None:
            raise KVortexError("the KV caches are not registered yet: call register_kv_caches first")
        return self.engine

    def _pool(self) -> PinnedPool:
        if self.pool is None:
            raise KVortexError("the KV caches are not registered yet: call register_kv_caches first")
        return self.pool

    def _layout(self) -> KVLayout:
        if self.layout is None:
            raise KVortexError("the KV caches are not registered yet: call register_kv_caches first")
        return self.layout

    def _geo(self) -> SlotGeometry:
        if self.geometry is None:
            raise KVortexError("the KV caches are not registered yet: call register_kv_caches first")
        return self.geometry


def layout_device(caches: Any) -> torch.device:
    """The device of the first KV tensor."""
    first = caches if isinstance(caches, torch.Tensor) else caches[0]
    return first.device
