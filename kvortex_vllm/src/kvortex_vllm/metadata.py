"""The per-step plan the scheduler-side connector ships to every worker, and the slot geometry.

Everything here is plain data (no vLLM, no torch), so the worker side and its GPU check run
where vLLM is not installed, and vLLM can carry the plan between processes with its own
serializer. A plan is small: a few integers and one 32-byte key per chunk moved this step.

Slot geometry is computed on both sides from the same inputs (config, model shape, TP size),
so slot ``i`` means the same chunk on every rank: the scheduler assigns slot ids, every worker
allocates an identical :class:`~kvortex_core.data.pool.PinnedPool`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvortex_core.config import KVortexConfig
from kvortex_core.data.payload import HEADER_BYTES
from kvortex_core.data.pool import per_rank_capacity
from kvortex_core.errors import ConfigError

#: Slot alignment used by the pinned pool (``PinnedPool(alignment=...)``) on every rank.
SLOT_ALIGNMENT = 128


@dataclass(frozen=True)
class LoadSpec:
    """Copy one stored chunk from pool slot ``slot`` into the request's blocks.

    ``block_ids`` are the chunk's blocks (``chunk_tokens / block_size`` of them);
    ``skip_blocks`` leading ones already hold the tokens (a local prefix-cache hit that ends
    inside the chunk) and are left untouched. ``slot`` is -1 when the scheduler could not pin
    the chunk: the worker then reports the blocks as failed so vLLM recomputes them.
    ``fetch``: the chunk is only in a lower tier; the worker reads it into ``slot`` first, and
    the whole request's load runs asynchronously (vLLM's ``load_kv_async`` path).
    """

    req_id: str
    slot: int
    key: bytes
    block_ids: tuple[int, ...]
    skip_blocks: int = 0
    fetch: bool = False


@dataclass(frozen=True)
class SaveSpec:
    """Copy the chunk held in ``block_ids`` into pool slot ``slot`` under ``key``."""

    req_id: str
    slot: int
    key: bytes
    block_ids: tuple[int, ...]


@dataclass
class StepPlan:
    """What every worker does this step. Built once per step by the scheduler side."""

    step: int
    num_slots: int
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    #: Requests vLLM preempted: their blocks are freed, so their pending saves must finish first.
    preempted: frozenset[str] = frozenset()
    #: Finished requests whose blocks vLLM keeps until the workers report their saves done.
    await_saves: frozenset[str] = frozenset()
    #: Requests whose loads vLLM runs asynchronously: reported through finished_recving.
    async_loads: frozenset[str] = frozenset()
    #: ``(key, slot)`` of chunks saved by a forward that ran over a failed load's blocks (wrong
    #: KV on every rank): each rank invalidates the slot (-1: none) if it still holds the chunk
    #: and deletes the chunk from its lower tiers.
    drop: list[tuple[bytes, int]] = field(default_factory=list)
    #: vLLM block ids a failed load left with garbage that a request scheduled this step holds
    #: as computed (vLLM's prefix cache handed them out): every rank reports them as failed
    #: loads this step, so vLLM discards the step's result for that request and recomputes them.
    stale: frozenset[int] = frozenset()
    #: Blocks the previous step loaded that a request of this step reads as computed context.
    #: Under vLLM's asynchronous scheduling this step was scheduled before that load's outcome
    #: was known: a rank whose load of one of them failed reports it failed again in this step,
    #: so vLLM discards what this step computed over it.
    recheck: frozenset[int] = frozenset()

    def is_empty(self) -> bool:
        return not (self.loads or self.saves or self.preempted or self.await_saves or self.drop or self.stale
                    or self.recheck)


@dataclass(frozen=True)
class SlotGeometry:
    """Bytes per chunk payload and per slot, and the number of slots of one rank's pool."""

    chunk_bytes: int
    slot_bytes: int
    num_slots: int
    capacity_bytes: int


def cpu_tier_capacity(config: KVortexConfig) -> int:
    """The node capacity of the first tier, which must be the pinned ``cpu`` tier."""
    first = config.tier_names[0]
    tier = config.tiers[first]
    if tier.type != "cpu":
        raise ConfigError(
            f"the vLLM connector needs the first tier to be of type 'cpu' (pinned host memory), "
            f"got tiers.{first}.type = {tier.type!r}; add e.g. "
            "tiers: {cpu: {type: cpu, capacity: 8GiB}} before the other tiers"
        )
    return int(tier.capacity)


def slot_geometry(config: KVortexConfig, chunk_bytes: int, tp_size: int) -> SlotGeometry:
    """The pool geometry of one rank: a header area plus one chunk payload per slot."""
    if chunk_bytes <= 0:
        raise ConfigError(f"chunk payload of {chunk_bytes} bytes: the model shape looks empty")
    ranks = config.ranks_per_node or tp_size
    capacity = per_rank_capacity(cpu_tier_capacity(config), ranks)
    raw = HEADER_BYTES + chunk_bytes
    slot_bytes = -(-raw // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
    num_slots = capacity // slot_bytes
    if num_slots < 1:
        raise ConfigError(
            f"the cpu tier gives each of {ranks} rank(s) {capacity} bytes, less than one chunk "
            f"slot of {slot_bytes} bytes; raise tiers.cpu.capacity or lower chunk_tokens"
        )
    return SlotGeometry(chunk_bytes, slot_bytes, num_slots, num_slots * slot_bytes)
