"""Scheduler side of the connector: the control plane (keys, index, slots, per-step plans).

One instance per engine, in vLLM's EngineCore process. It decides everything: which prompt
chunks are stored (a :class:`~kvortex_core.control.index.ChunkIndex` whose entries carry the
pool slot id), what each step loads and saves, and when a slot is reused. Workers only execute
the :class:`~kvortex_vllm.metadata.StepPlan`, so lookups need no IPC and every rank agrees on
what exists. Nothing here imports vLLM: requests and scheduler outputs are read through the
few attributes named in :mod:`kvortex_vllm.compat`.

Contracts kept here: a hit never covers the last prompt token (vLLM must compute one); only
whole chunks present now are counted; loaded chunks stay pinned until the workers have run the
step; a request with saves keeps its blocks until the workers report the saves done.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvortex_core.config import KVortexConfig
from kvortex_core.control.index import ChunkIndex, IndexEntry, PinHandle
from kvortex_core.control.keys import ChunkHasher, KeyNamespace, validate_chunk_tokens
from kvortex_core.control.stats import Stats
from kvortex_core.tiering.counters import STALE_BLOCKS_REPORTED
from kvortex_vllm import compat
from kvortex_vllm.lower import SchedulerTiers
from kvortex_vllm.metadata import LoadSpec, SaveSpec, SlotGeometry, StepPlan

log = logging.getLogger(__name__)

#: Steps a load pin outlives its plan: one for the step itself, one for async scheduling.
_PIN_STEPS = 2


@dataclass
class _Request:
    """What the control plane tracks about one live request."""

    req_id: str
    prompt: list[int]
    keys: list[bytes]
    block_ids: list[int] = field(default_factory=list)
    #: Chunks below this index are stored (saved, loaded or found present): nothing to save.
    saved_upto: int = 0
    #: Set by get_num_new_matched_tokens: (local computed tokens, tokens we supply, async?).
    matched: tuple[int, int, bool] | None = None
    pending_loads: list[LoadSpec] = field(default_factory=list)
    has_saves: bool = False
    #: When get_num_new_matched_tokens first answered "ask again" (a shared tier was asked).
    deferred_at: float | None = None
    #: Its lookup is in the metrics (once per request, however often vLLM asks).
    counted: bool = False
    #: Known before a cache reset: it neither loads nor saves any more (see ``SchedulerSide.reset``).
    stale: bool = False
    #: vLLM's preemption count of the request when this state was made.
    preemptions: int = 0
    #: The step whose plan first carries this state (see ``build_plan``'s preempted ids).
    born: int = 0
    #: Chunks this request's own plans saved (not those found stored): if a load of an earlier
    #: chunk fails, the forward that computed them read garbage, and they must go.
    own_saves: set[bytes] = field(default_factory=set)
    #: A load of it failed: only cpu hits from now on (see ``on_load_errors``).
    no_async: bool = False
    #: No chunk from this index on is saved: it computed (or holds as computed) a block that a
    #: failed load left with garbage (see ``_poisoned``).
    taint_from: int = 1 << 62
    #: The last step whose plan scheduled it.
    last_step: int = 0


@dataclass
class _Pin:
    handle: PinHandle
    release_at: int


class SchedulerSide:
    """The control plane of one engine."""

    def __init__(
        self,
        config: KVortexConfig,
        namespace: KeyNamespace,
        geometry: SlotGeometry,
        block_size: int,
        stats: Stats | None = None,
        tiers: SchedulerTiers | None = None,
        *,
        active: bool = True,
        recheck: bool = False,
    ) -> None:
        """``active`` False: no request is keyed (no hits, no saves), for models whose prefill
        vLLM itself never skips (pooling models it gives no prefix caching). ``recheck``: fill
        ``StepPlan.recheck`` (vLLM schedules asynchronously, see ``compat.recheck_failed_loads``)."""
        validate_chunk_tokens(config.chunk_tokens, block_size)
        self.config = config
        self.geometry = geometry
        self.block_size = block_size
        self.chunk_tokens = config.chunk_tokens
        self.blocks_per_chunk = config.chunk_tokens // block_size
        self.hasher = ChunkHasher(namespace, config.chunk_tokens, config.hash_algorithm)
        self.stats = stats or Stats()
        self.tiers = tiers
        ev = config.eviction
        self.index = ChunkIndex(
            "cpu", geometry.capacity_bytes, policy=ev.policy, high_watermark=ev.high_watermark,
            evict_ratio=ev.evict_ratio, on_evict=self._on_evict, stats=self.stats,
        )
        self._free_slots = list(range(geometry.num_slots - 1, -1, -1))
        self._requests: dict[str, _Request] = {}
        self._pins: list[_Pin] = []
        self._await_saves: set[str] = set()
        self._frees_aborted_loads = compat.frees_blocks_of_aborted_loads()
        #: Finished requests whose blocks vLLM keeps until their saves are reported done.
        self._saving: set[str] = set()
        # Asynchronous loads in flight, by request: their pins, and the chunks being fetched.
        # Both outlive an aborted request: workers still write the slots until they report.
        self._async_pins: dict[str, list[PinHandle]] = {}
        self._fetching: dict[bytes, str] = {}
        self._async_reqs: set[str] = set()  # async loads planned since the last plan
        # block id -> (req, key, step): maps failed-load reports back to chunks for a few steps.
        self._recent_loads: dict[int, tuple[str, bytes, int]] = {}
        #: Chunks claimed for saving by the plan being built (released once it is built).
        self._plan_pins: list[PinHandle] = []
        #: ``(key, slot)`` of chunks computed over a failed load, for the next plan's ``drop``.
        self._drop: list[tuple[bytes, int]] = []
        #: vLLM block ids a failed load left with garbage (and blocks computed over them), until a
        #: step rewrites them. vLLM 0.33 keeps them in its prefix cache and as computed for the
        #: requests sharing them, counting on the loading request to recompute them; when that
        #: request is aborted first, later requests get them as context (found by fuzzing).
        self._poisoned: set[int] = set()
        #: States of requests forgotten within the last steps, with the step they were forgotten
        #: at (see ``_forget``).
        self._gone: list[tuple[_Request, int]] = []
        self._step = 0
        self._active = active
        self._recheck = recheck
        #: Folded into every request's keys after a cache reset (random: see ``reset``).
        self._epoch = b""

    # ------------------------------------------------------------------ lookups

    def _state(self, request: Any) -> _Request:
        req_id = request.request_id
        st = self._requests.get(req_id)
        preemptions = int(getattr(request, "num_preemptions", 0) or 0)
        if st is not None and st.preemptions != preemptions:
            # preempted since (its blocks are gone) and resumed before build_plan saw the
            # preemption: vLLM does that in one step when something outside schedule() preempted
            # it (reset_prefix_cache with reset_running_requests). Start over, as for a new request.
            st = None
        if st is None:
            prompt = list(compat.prompt_token_ids(request))
            st = _Request(req_id, prompt, self._keys(request, prompt), preemptions=preemptions,
                          born=self._step + 1)
            self._requests[req_id] = st
        return st

    def _keys(self, request: Any, prompt: list[int]) -> list[bytes]:
        """The request's chunk keys: its tokens, and its LoRA adapter, cache salt and multimodal
        items (``compat.key_extras``); no keys (no hits, no saves) when it cannot be keyed safely."""
        extras = compat.key_extras(request, self.chunk_tokens) if self._active else None
        if extras is None:
            return []
        whole, per_chunk = extras
        if self._epoch:
            whole = b"epoch\0" + self._epoch + whole
        prefix = self.hasher.request_seed(whole) if whole else None
        return self.hasher.keys(prompt, prefix=prefix, extras=per_chunk or None)

    def reset(self) -> bool:
        """vLLM's connector cache reset (weights updated in place, sleep, ``reset_prefix_cache``
        with the connector): from now on no chunk stored before is found again.

        Lower tiers cannot be emptied from here (they may be shared), so later requests are keyed
        apart instead: a random epoch joins every key, and a chunk stored before matches none. The
        cpu tier's unpinned chunks are dropped and their slots freed (pinned ones, in flight,
        stay until evicted; nothing can reach them). Requests already known neither load nor
        save any more: their KV may be the old weights'. A restart starts from no epoch: the
        weights are then the model files' again, whose chunks stay valid.

        Returns False while asynchronous loads from a lower tier are in flight (they still land
        the old KV); everything above is done anyway, so a retry after they finish succeeds.
        """
        self._epoch = os.urandom(16)
        for st in self._requests.values():
            st.stale = True
            st.matched = None
        idle = []
        stored = self.index.keys()  # a list (ChunkIndex is no dict)
        for key in stored:
            entry = self.index.get(key)
            if entry is not None and not entry.pins:
                idle.append(key)
        for entry in self.index.remove(idle):
            if entry.location is not None:
                self._free_slots.append(entry.location)
        log.info("connector cache reset: %d cpu chunks dropped, later requests keyed apart", len(idle))
        if self._async_pins:
            # a lower-tier load already under way still lands its (old) KV in its request's
            # blocks: the reset did not fully happen, as vLLM's own prefix-cache reset fails
            # while requests hold blocks; the caller retries once those loads are done
            log.warning("connector cache reset with %d asynchronous loads in flight: reported as "
                        "failed (their KV is the old one); reset again once they finish",
                        len(self._async_pins))
            return False
        return True

    def stored_prefix(self, keys: Sequence[bytes]) -> tuple[int, list[bool]]:
        """Leading chunks loadable now, and per key whether it is in the cpu tier.

        No side effect on recency or pins (vLLM may ask several times).
        """
        in_cpu = self.index.contains_list(keys)
        if self._fetching:  # a slot still being filled from a lower tier is nobody's hit yet
            in_cpu = [c and k not in self._fetching for k, c in zip(keys, in_cpu, strict=True)]
        below = (self.tiers.present(keys, [not c for c in in_cpu]) if self.tiers is not None and not all(in_cpu)
                 else in_cpu)
        n = 0
        while n < len(keys) and (in_cpu[n] or (below[n] and keys[n] not in self._fetching)):
            n += 1
        return n, in_cpu

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` we can load now (whole chunks, never the last token).

        The second value is True when a lower tier must be read first (an asynchronous load).
        ``None`` ("ask again next step") is answered while a shared tier's answer about the
        next chunk is on its way, for at most ``timeouts.remote_lookup_s`` per request: the
        scheduler loop never waits on the network, and a slow tier only costs a miss.
        """
        st = self._state(request)
        # vLLM must compute at least one prompt token to sample from: cap below the last one.
        # A request that must not read cached KV (prompt logprobs need a forward over every
        # prompt token; or asked for) loads nothing: vLLM 0.33 zeroes our answer for it, older
        # ones do not, and their prompt logprobs then began after the loaded prefix.
        skip = bool(getattr(request, "skip_reading_prefix_cache", False))
        usable = 0 if st.stale or skip else min(max(len(st.prompt) - 1, 0) // self.chunk_tokens, len(st.keys))
        hit, in_cpu = self.stored_prefix(st.keys[:usable])
        if hit < usable and self.tiers is not None:
            if self._should_ask_again(st, st.keys[hit]):
                return None, False
            hit, in_cpu = self.stored_prefix(st.keys[:usable])  # an answer that just arrived counts
        if st.no_async:  # its load failed once: no lower-tier read for it any more
            held = num_computed_tokens // self.chunk_tokens  # vLLM holds these itself
            hit = next((i for i in range(held, hit) if not in_cpu[i]), hit)
        hit = self._fetchable(hit, in_cpu, num_computed_tokens // self.chunk_tokens)
        hit_tokens = hit * self.chunk_tokens
        new = max(hit_tokens - num_computed_tokens, 0)
        # Asynchronous only when a chunk we would load (not one vLLM already holds) is below.
        is_async = bool(new) and not all(in_cpu[num_computed_tokens // self.chunk_tokens : hit])
        st.matched = (num_computed_tokens, hit_tokens, is_async) if new else None
        if not st.counted:  # vLLM asks again while a request waits for blocks: count it once
            st.counted = True
            self.stats.record_lookup(len(st.prompt), max(hit_tokens, num_computed_tokens))
        return new, is_async

    def _fetchable(self, hit: int, in_cpu: list[bool], first: int) -> int:
        """``hit`` cut where the chunks to read from below would need more cpu slots than could
        be freed now (the rest would be planned only to fail: a recompute either way)."""
        if all(in_cpu[first:hit]):
            return hit
        slot = self.geometry.slot_bytes
        room = (self.index.capacity - self.index.pinned_bytes) // slot - sum(in_cpu[first:hit])
        for i in range(first, hit):
            if not in_cpu[i]:
                room -= 1
                if room < 0:
                    return i
        return hit

    def _should_ask_again(self, st: _Request, key: bytes) -> bool:
        """A shared tier's answer for ``key`` is on its way (the lookup above asked): wait a step."""
        if self.tiers is None or not self.tiers.unknown(key):
            return False
        now = time.monotonic()
        if st.deferred_at is None:
            st.deferred_at = now
        return now - st.deferred_at < self.config.timeouts.remote_lookup_s

    def update_state_after_alloc(self, request: Any, block_ids: list[int], num_external_tokens: int) -> None:
        """Plan the load of the matched chunks into the blocks vLLM just allocated."""
        st = self._state(request)
        st.block_ids = list(block_ids)
        if num_external_tokens <= 0 or st.matched is None:
            st.matched = None  # vLLM took none of the hit: nothing of it may linger
            return
        start = st.matched[0]
        end = start + num_external_tokens
        c0, c1 = start // self.chunk_tokens, end // self.chunk_tokens
        keys = st.keys[c0:c1]
        pins = [self.index.pin(keys, f"load {st.req_id}")]  # cpu hits first: claims below cannot evict them
        # A chunk to read from below needs the async path; a sync load that finds one gone
        # (cannot happen between lookup and allocation) reports it failed instead.
        missing = [k for k in keys if k not in self.index] if st.matched[2] else []
        fetch = set()
        for k in missing:
            i = st.keys.index(k)
            if self._claim_slot(k, st.keys[i - 1] if i else None) is None:
                break
            # pinned at once: the next claim must not evict it and hand its slot out again
            pins.append(self.index.pin([k], f"fetch {st.req_id}"))
            fetch.add(k)
            self._fetching[k] = st.req_id
        is_async = st.matched[2]
        if is_async:  # vLLM waits for this request's finished_recving: pins live until then
            self._async_pins[st.req_id] = pins
            self._async_reqs.add(st.req_id)
        else:
            self._pins.extend(_Pin(h, self._step + _PIN_STEPS) for h in pins)
        self.index.touch(keys)
        skip = (start - c0 * self.chunk_tokens) // self.block_size
        bpc = self.blocks_per_chunk
        for i, key in enumerate(keys, start=c0):
            entry = self.index.get(key)
            slot = entry.location if entry is not None and entry.location is not None else -1
            blocks = tuple(block_ids[i * bpc : (i + 1) * bpc])
            st.pending_loads.append(LoadSpec(st.req_id, slot, key, blocks, skip if i == c0 else 0,
                                             fetch=key in fetch))
        st.saved_upto = max(st.saved_upto, c1)
        st.matched = None

    # ------------------------------------------------------------------ per-step plan

    def build_plan(self, out: Any) -> StepPlan:
        """Turn this step's scheduler output into the workers' plan (and advance one step)."""
        self._step += 1
        self._release_pins(self._step)
        # kept while an async load is in flight: its failures are reported when it ends
        self._recent_loads = {b: v for b, v in self._recent_loads.items()
                              if v[2] + _PIN_STEPS >= self._step or v[0] in self._async_pins}
        self._gone = [(st, at) for st, at in self._gone if at + _PIN_STEPS >= self._step]
        preempted = frozenset(getattr(out, "preempted_req_ids", None) or ())
        for req_id in preempted:
            st = self._requests.get(req_id)
            if st is not None and st.born == self._step:
                continue  # preempted and resumed before this plan: this state is the resumed one's
            self._forget(req_id)
        plan = StepPlan(self._step, self.geometry.num_slots, preempted=preempted,
                        await_saves=frozenset(self._await_saves), async_loads=frozenset(self._async_reqs),
                        drop=self._drop)
        self._drop = []
        self._await_saves.clear()
        self._async_reqs.clear()
        for st in self._requests.values():  # async loads ship while their request waits unscheduled
            plan.loads.extend(st.pending_loads)
            for spec in st.pending_loads:
                for b in spec.block_ids[spec.skip_blocks:]:
                    self._recent_loads[b] = (st.req_id, spec.key, self._step)
            st.pending_loads = []
        try:
            scheduled = []
            for req_id, new_blocks, replace, computed in compat.scheduled_requests(out):
                st = self._requests.get(req_id)
                if st is None:
                    continue
                if replace:
                    st.block_ids = list(new_blocks)
                else:
                    st.block_ids.extend(new_blocks)
                scheduled.append((st, computed, computed + out.num_scheduled_tokens.get(req_id, 0)))
                st.last_step = self._step
            if self._poisoned:
                plan.stale = self._check_poisoned(scheduled, plan.loads)
            if self._recheck:
                plan.recheck = self._loaded_last_step_read_now(scheduled, plan.loads)
            for st, _, done in scheduled:
                plan.saves.extend(self._plan_saves(st, done))
        finally:
            for pin in self._plan_pins:
                pin.release()
            self._plan_pins.clear()
        return plan

    def _check_poisoned(self, scheduled: list[tuple[_Request, int, int]], loads: list[LoadSpec]) -> frozenset[int]:
        """Blocks this step rewrites (computes, or loads: a load that fails poisons them again)
        are clean again. A request whose context (blocks it holds as computed) still includes a
        poisoned one got it from vLLM's prefix cache after the failed load's own request was
        preempted or aborted before recomputing it: it saves nothing from that chunk on, and
        those blocks are returned, for every rank to report as failed loads this step, so vLLM
        discards what the request computed over them and recomputes them."""
        bs = self.block_size
        for spec in loads:
            self._poisoned.difference_update(spec.block_ids[spec.skip_blocks:])
        for st, computed, done in scheduled:  # first: what this forward writes anew
            self._poisoned.difference_update(st.block_ids[-(-computed // bs):-(-done // bs)])
        stale: set[int] = set()
        for st, computed, done in scheduled:
            held = self._held(st, computed)
            bad = [b for b in held if b in self._poisoned]
            if not bad:
                continue
            stale.update(bad)
            # what it writes this step is computed over them: garbage too, until recomputed
            self._poisoned.update(st.block_ids[-(-computed // bs):-(-done // bs)])
            log.warning("request %s was handed %d KV block(s) that a failed load left unrecomputed: "
                        "reported as failed loads, so vLLM recomputes them", st.req_id, len(bad))
            at = held.index(bad[0])
            st.taint_from = min(st.taint_from, at // self.blocks_per_chunk)
        if stale:
            self.stats.inc(STALE_BLOCKS_REPORTED, len(stale), self.config.tier_names[0])
        return frozenset(stale)

    def _held(self, st: _Request, computed: int) -> list[int]:
        """The blocks a request holds as computed before this step: its forward's context."""
        return st.block_ids[:-(-computed // self.block_size)]

    def _loaded_last_step_read_now(self, scheduled: list[tuple[_Request, int, int]],
                                   loads: list[LoadSpec]) -> frozenset[int]:
        """Blocks the last step loaded that a request of this step holds as computed context
        (see ``StepPlan.recheck``), but for those this step loads anew."""
        last = {b for b, (_, _, step) in self._recent_loads.items() if step == self._step - 1}
        if not last:
            return frozenset()
        read = {b for st, computed, _ in scheduled for b in self._held(st, computed)}
        fresh = {b for spec in loads for b in spec.block_ids[spec.skip_blocks:]}
        return frozenset((last & read) - fresh)

    def _plan_saves(self, st: _Request, computed: int) -> list[SaveSpec]:
        """Save every prompt chunk that is fully computed after this step and not yet stored."""
        full = 0 if st.stale else min(min(computed, len(st.prompt)) // self.chunk_tokens, len(st.keys))
        bpc = self.blocks_per_chunk
        saves: list[SaveSpec] = []
        full = min(full, st.taint_from)
        while st.saved_upto < full:
            i = st.saved_upto
            blocks = st.block_ids[i * bpc : (i + 1) * bpc]
            if len(blocks) < bpc:
                break  # blocks not known yet (should not happen); retry next step
            key = st.keys[i]
            if key in self.index:
                self.index.touch([key])
            else:
                slot = self._claim_slot(key, st.keys[i - 1] if i else None)
                if slot is None:
                    break  # everything is pinned: skip saving now, the chunk is just not cached
                # Pinned while this plan is built: a later claim of the same plan must not evict
                # it and hand its slot to a second save (one slot, two payloads in one step).
                self._plan_pins.append(self.index.pin([key], f"save {st.req_id}"))
                saves.append(SaveSpec(st.req_id, slot, key, tuple(blocks)))
                st.own_saves.add(key)
                st.has_saves = True
                if self.tiers is not None:
                    self.tiers.note_written(key)
            st.saved_upto = i + 1
        return saves

    def _claim_slot(self, key: bytes, parent: bytes | None) -> int | None:
        if not self.index.insert(key, self.geometry.slot_bytes, parent=parent):
            return None
        entry = self.index.get(key)
        if not self._free_slots or entry is None:  # cannot happen: capacity is counted in slots
            self.index.remove([key])
            return None
        entry.location = self._free_slots.pop()
        return entry.location

    def _on_evict(self, victims: list[IndexEntry]) -> None:
        for entry in victims:
            if entry.location is not None:
                self._free_slots.append(entry.location)
        log.debug("evicted %d chunk(s) from the cpu tier", len(victims))

    def _release_pins(self, step: int) -> None:
        keep = []
        for pin in self._pins:
            if pin.release_at <= step:
                pin.handle.release()
            else:
                keep.append(pin)
        self._pins = keep

    # ------------------------------------------------------------------ outputs and lifecycle

    def on_load_errors(self, block_ids: Iterable[int]) -> None:
        """Workers could not load these blocks: forget those chunks so they are recomputed and
        re-saved, and drop every chunk a forward computed over them.

        The forward of the failing step read the failed blocks' garbage: the loading request,
        and any request vLLM let share those blocks from its prefix cache in the same step,
        computed wrong KV for every chunk after them (on every rank: TP all-reduces). vLLM
        recomputes those requests from the failed block; their copies saved meanwhile must go.
        """
        # Only the first report of a load's failure counts. The same blocks come back later as
        # echoes: reported stale (``_check_poisoned``) or rechecked (``StepPlan.recheck``), which
        # vLLM needs and this side already knows of. Taken for news, an echo arriving after the
        # request recomputed those blocks would mark them garbage again, roll the request back
        # again, and so on for ever (found by fuzzing under asynchronous scheduling).
        invalid = {b for b in block_ids if b in self._recent_loads and b not in self._poisoned}
        bad: dict[str, set[bytes]] = {}
        loaded_at: dict[int, int] = {}
        for b in invalid:
            req_id, key, step = self._recent_loads.pop(b)
            bad.setdefault(req_id, set()).add(key)
            loaded_at[b] = step
        failed = {k for keys in bad.values() for k in keys}
        tainted: list[bytes] = []
        states = [(st, invalid, True) for st in self._requests.values()]
        for st, _ in self._gone:  # forgotten since: its blocks are its own only up to its last step
            states.append((st, {b for b, at in loaded_at.items() if at <= st.last_step}, False))
        for st, mine_invalid, live in states:
            at = next((i for i, b in enumerate(st.block_ids) if b in mine_invalid), None)
            if at is None:
                if not live or st.req_id not in bad:
                    continue
                at = min((st.keys.index(k) for k in bad[st.req_id] if k in st.keys),
                         default=len(st.keys)) * self.blocks_per_chunk
            first = at // self.blocks_per_chunk
            st.saved_upto = min(st.saved_upto, first)
            self._poisoned.update(st.block_ids[at:])  # garbage, and what was computed over it
            # vLLM 0.33 keeps a request whose asynchronous load failed among its in-flight
            # prefills and reserves blocks for it against itself at its next asynchronous
            # load, which then never fits (the request waits for ever): cpu hits only from now.
            st.no_async = True
            mine = [k for k in st.keys[first:] if k in st.own_saves and k not in failed]
            st.own_saves.difference_update(mine)
            tainted += mine
            if mine:
                log.warning("request %s computed %d chunk(s) over a failed load: dropped", st.req_id, len(mine))
            if live and at == 0 and st.req_id in self._async_pins:
                # An asynchronous load that left nothing valid: vLLM frees all of the request's
                # blocks and gives it new ones when it schedules it again. Blocks another request
                # gets meanwhile are that request's, never this one's garbage.
                st.block_ids = []
        for k in dict.fromkeys(tainted):  # each rank drops its copies (slot -1: not in the cpu tier)
            entry = self.index.get(k)
            located = entry is not None and entry.location is not None
            self._drop.append((k, int(entry.location) if located else -1))  # type: ignore[union-attr]
        removed = self.index.remove([*failed, *tainted])
        self._on_evict(removed)
        if self.tiers is not None and (failed or tainted):
            self.tiers.forget([*failed, *tainted], load_failed=bool(failed))
        for req_id, keys in bad.items():
            log.warning("load of %d chunk(s) for request %s failed; they will be recomputed", len(keys), req_id)

    def on_loads_finished(self, req_ids: Iterable[str]) -> None:
        """Asynchronous loads the workers completed (or gave up on): their chunks are ordinary now."""
        for req_id in req_ids:
            for handle in self._async_pins.pop(req_id, ()):
                handle.release()
            for k in [k for k, r in self._fetching.items() if r == req_id]:
                del self._fetching[k]

    def request_finished(self, request: Any) -> bool:
        """True when the request's blocks must outlive it until the workers finish its saves.

        Asked again for a request it already answered True for (vLLM 0.15 finishes a request
        aborted while a batch of it is in flight once more when that batch returns), it answers
        True again: False would let vLLM free the request, and the workers' report of its saves
        then trips vLLM's scheduler (found by fuzzing under asynchronous scheduling)."""
        req_id = request.request_id
        if req_id in self._saving:
            return True
        st = self._requests.get(req_id)
        # Aborted while its asynchronous load runs: vLLM 0.15 frees its blocks at once, and the
        # load then wrote into blocks another request held (a red-team finding: wrong KV). Its
        # blocks are kept until the workers report the load ended (they skip its copy).
        loading = req_id in self._async_pins and self._frees_aborted_loads
        delay = bool(st and st.has_saves) or loading
        self._forget(req_id)
        if delay:
            self._await_saves.add(req_id)
            self._saving.add(req_id)
        return delay

    def on_saves_finished(self, req_ids: Iterable[str]) -> None:
        """The workers reported these requests' saves (and any aborted async load) done: vLLM
        frees their blocks now."""
        req_ids = list(req_ids)
        self._saving.difference_update(req_ids)
        self.on_loads_finished([r for r in req_ids if r in self._async_pins])

    def _forget(self, req_id: str) -> None:
        """Drop a request's state (finish, abort, preemption); its load pins expire with their step.

        With asynchronous scheduling, vLLM may abort or preempt a request after scheduling a step
        and before that step's output arrives: a load of that step that failed is reported
        then. The state is kept for ``on_load_errors`` until every step it was in has reported."""
        st = self._requests.pop(req_id, None)
        if st is not None:
            self._gone.append((st, self._step))

    def close(self) -> None:
        for pin in self._pins:
            pin.handle.release()
        self._pins = []
        self.on_loads_finished(list(self._async_pins))
        self.index.close()
        if self.tiers is not None:
            self.tiers.close()
