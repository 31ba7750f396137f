"""ChunkIndex: a hypothesis state machine against a plain-dict model, plus targeted cases."""

from __future__ import annotations

import threading

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvortex_core.control.index import ChunkIndex, IndexEntry, PinHandle
from kvortex_core.control.stats import Stats
from kvortex_core.errors import ConfigError

KEYS = [bytes([i]) for i in range(24)]
CAPACITY = 1000


class IndexModel(RuleBasedStateMachine):
    """Drives a ChunkIndex and a dict model side by side; the model learns evictions only
    through ``on_evict`` and ``remove``'s return value, so any unreported change shows up."""

    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[bytes, tuple[int, bytes | None]] = {}
        self.pending: dict[bytes, tuple[int, bytes | None]] = {}  # during insert_chain
        self.errors: list[Exception] = []
        self.pins: dict[bytes, int] = {}
        self.index: ChunkIndex

    @initialize(policy=st.sampled_from(["lru", "prefix-lru", "s3fifo"]),
                hw=st.sampled_from([0.5, 0.8, 1.0]), ratio=st.sampled_from([0.1, 0.2, 0.5]))
    def setup(self, policy: str, hw: float, ratio: float) -> None:
        self.policy = policy
        self.index = ChunkIndex("t", CAPACITY, policy=policy, high_watermark=hw,
                                evict_ratio=ratio, on_evict=self.on_evict, stats=Stats())

    def on_evict(self, victims: list[IndexEntry]) -> None:
        try:  # the index logs callback exceptions instead of raising: collect them instead
            self._check_evicted(victims)
        except Exception as exc:  # noqa: BLE001 - re-raised by the invariant
            self.errors.append(exc)

    def _check_evicted(self, victims: list[IndexEntry]) -> None:
        stored = self.index.keys()  # the lock is not held here: calling back must work
        for v in victims:
            assert self.pins.get(v.key, 0) == 0, "a pinned chunk was evicted"
            if v.key in self.pending:  # inserted and evicted within one insert_chain call
                del self.pending[v.key]
                continue
            assert self.model.pop(v.key)[0] == v.size
        if self.policy == "prefix-lru":
            gone = {v.key for v in victims}
            parents = {**self.model, **self.pending}
            orphans = [k for k in stored if parents[k][1] in gone]
            assert not orphans, "prefix-lru evicted a predecessor whose successor stays"

    @rule(i=st.integers(0, len(KEYS) - 1), size=st.integers(0, 400), chain=st.booleans())
    def insert(self, i: int, size: int, chain: bool) -> None:
        key = KEYS[i]
        parent = KEYS[i - 1] if chain and i > 0 else None
        if key in self.model and self.model[key][0] != size and self.pins.get(key):
            return  # resizing a pinned chunk drops its pins; not a supported use
        if key in self.model and self.model[key][0] != size:
            del self.model[key]  # a resize replaces the entry
        if key not in self.model:
            self.pending = {key: (size, parent)}  # visible to on_evict during the insert
        ok = self.index.insert(key, size, parent=parent)
        self.pending = {}
        if ok:
            self.model.setdefault(key, (size, parent))
            assert self.index.used <= CAPACITY
        else:
            assert key not in self.model

    @rule(start=st.integers(0, len(KEYS) - 1), n=st.integers(1, 6), size=st.integers(0, 200))
    def insert_chain(self, start: int, n: int, size: int) -> None:
        keys = KEYS[start : start + n]
        if any(k in self.model for k in keys):
            return  # re-inserts are covered by insert; here every victim's story is unambiguous
        parent = KEYS[start - 1] if start else None
        self.pending = {k: (size, keys[i - 1] if i else parent) for i, k in enumerate(keys)}
        done = self.index.insert_chain(keys, size, parent=parent)
        for k in keys[done:]:
            self.pending.pop(k, None)  # never inserted
        self.model.update(self.pending)
        self.pending = {}
        assert done == len(keys) or keys[done] not in self.model

    @rule(target=handles, n=st.integers(1, 8), start=st.integers(0, len(KEYS) - 1))
    def lookup_and_pin(self, n: int, start: int) -> PinHandle:
        keys = KEYS[start : start + n]
        expected = next((j for j, k in enumerate(keys) if k not in self.model), len(keys))
        hit, handle = self.index.lookup_and_pin(keys, "load")
        assert hit == expected and handle.keys == keys[:hit]
        for k in handle.keys:
            self.pins[k] = self.pins.get(k, 0) + 1
        return handle

    @rule(n=st.integers(1, len(KEYS)), start=st.integers(0, len(KEYS) - 1))
    def lookup(self, n: int, start: int) -> None:
        keys = KEYS[start : start + n]
        expected = next((j for j, k in enumerate(keys) if k not in self.model), len(keys))
        assert self.index.lookup(keys) == expected

    @rule(target=handles, idx=st.lists(st.integers(0, len(KEYS) - 1), max_size=5, unique=True))
    def pin(self, idx: list[int]) -> PinHandle:
        handle = self.index.pin([KEYS[i] for i in idx], "test")
        assert sorted(handle.keys) == sorted(KEYS[i] for i in idx if KEYS[i] in self.model)
        for k in handle.keys:
            self.pins[k] = self.pins.get(k, 0) + 1
        return handle

    @rule(handle=consumes(handles), twice=st.booleans())
    def release(self, handle: PinHandle, twice: bool) -> None:
        handle.release()
        if twice:
            handle.release()  # idempotent
        for k in handle.keys:
            self.pins[k] -= 1

    @rule(nbytes=st.integers(0, CAPACITY))
    def evict(self, nbytes: int) -> None:
        before = self.index.used
        evictable = sum(s for k, (s, _) in self.model.items() if not self.pins.get(k))
        victims = self.index.evict(nbytes)
        freed = sum(v.size for v in victims)
        assert self.index.used == before - freed
        if self.policy != "prefix-lru":  # prefix-lru waits for a chain's tail; the others never stop
            assert freed >= min(nbytes, evictable)  # short of what unpinned entries could free

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        if self.pins.get(key):
            return
        (removed,) = self.index.remove([key, b"missing"])
        assert removed.key == key and self.model.pop(key)[0] == removed.size

    @rule(idx=st.lists(st.integers(0, len(KEYS) - 1), max_size=6))
    def contains(self, idx: list[int]) -> None:
        keys = [KEYS[i] for i in idx]
        mask = sum(1 << j for j, k in enumerate(keys) if k in self.model)
        assert self.index.contains(keys) == mask
        assert self.index.contains_list(keys) == [k in self.model for k in keys]

    @invariant()
    def counts_add_up(self) -> None:
        if not hasattr(self, "index"):
            return
        assert not self.errors, self.errors[0]
        assert set(self.index.keys()) == set(self.model)
        assert self.index.used == sum(s for s, _ in self.model.values()) <= CAPACITY
        assert len(self.index) == len(self.model)
        pinned = sum(self.model[k][0] for k, n in self.pins.items() if n and k in self.model)
        assert self.index.pinned_bytes == pinned
        for k, (size, _) in self.model.items():
            entry = self.index.get(k)
            assert entry is not None and entry.size == size and entry.pins == self.pins.get(k, 0)

    def teardown(self) -> None:
        if hasattr(self, "index"):
            leaks = self.index.close()
            assert len(leaks) == sum(1 for _ in leaks)
            assert self.index.pinned_bytes == 0


IndexModel.TestCase.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
TestIndexModel = IndexModel.TestCase


def chain(index: ChunkIndex, keys: list[bytes], size: int) -> list[bool]:
    out, parent = [], None
    for k in keys:
        out.append(index.insert(k, size, parent=parent))
        parent = k
    return out


def test_watermark_evicts_down_by_ratio() -> None:
    evicted: list[bytes] = []
    idx = ChunkIndex("cpu", 1000, policy="lru", on_evict=lambda v: evicted.extend(e.key for e in v))
    for i in range(8):
        assert idx.insert(bytes([i]), 100)
    assert not evicted and idx.used == 800
    assert idx.insert(b"x", 100)  # would be 900 > 80%: evict so that 60% remain with it
    assert evicted == [bytes([i]) for i in range(3)]
    assert idx.used == 600 and b"x" in idx


def test_lru_order_follows_use() -> None:
    idx = ChunkIndex("cpu", 1000, policy="lru")
    for k in (b"a", b"b", b"c"):
        idx.insert(k, 100)
    idx.touch([b"a"])
    assert [e.key for e in idx.evict(100)] == [b"b"]
    assert idx.lookup([b"c"]) == 1
    assert [e.key for e in idx.evict(100)] == [b"a"]


def test_prefix_lru_evicts_chain_tail_first() -> None:
    idx = ChunkIndex("cpu", 10_000, policy="prefix-lru")
    a, b = [b"a%d" % i for i in range(4)], [b"b%d" % i for i in range(3)]
    chain(idx, a, 100)
    chain(idx, b, 100)
    idx.lookup(b)  # b is newer; a's chain goes first, from its tail
    assert [e.key for e in idx.evict(400)] == a[::-1]
    assert [e.key for e in idx.evict(100)] == [b[2]]


def test_prefix_lru_shared_prefix_waits_for_all_branches() -> None:
    idx = ChunkIndex("cpu", 10_000, policy="prefix-lru")
    idx.insert(b"root", 100)
    idx.insert(b"x", 100, parent=b"root")
    idx.insert(b"y", 100, parent=b"root")
    idx.touch([b"root"])  # the shared root is hot but still goes after both branches
    assert [e.key for e in idx.evict(300)] == [b"x", b"y", b"root"]


def test_insert_keeps_own_predecessor() -> None:
    idx = ChunkIndex("cpu", 1000, policy="prefix-lru")
    assert chain(idx, [bytes([i]) for i in range(11)], 100) == [True] * 10 + [False]
    assert idx.lookup([bytes([i]) for i in range(11)]) == 10


def test_s3fifo_filters_one_hit_wonders_and_readmits_from_ghost() -> None:
    idx = ChunkIndex("cpu", 1000, policy="s3fifo", high_watermark=1.0, evict_ratio=0.1)
    hot, once, new = ([b"%s%d" % (p, i) for i in range(5)] for p in (b"h", b"o", b"n"))
    for k in hot + once:
        idx.insert(k, 100)
    idx.lookup(hot)  # reused: promoted to main when they reach the small queue's tail
    for k in new:
        idx.insert(k, 100)
    assert all(k in idx for k in hot) and not any(k in idx for k in once)
    idx.insert(once[0], 100)  # remembered by the ghost queue: admitted straight into main
    for k in (b"z1", b"z2", b"z3"):
        idx.insert(k, 100)  # new one-hit chunks are evicted from small, not once[0] or hot
    assert once[0] in idx and all(k in idx for k in hot)
    assert not any(k in idx for k in new[:3])


def test_everything_pinned_means_no_room() -> None:
    idx = ChunkIndex("cpu", 300, policy="lru")
    chain(idx, [b"a", b"b"], 100)
    with idx.pin([b"a", b"b"], "load r1") as h:
        assert len(h) == 2 and idx.pinned_bytes == 200
        assert not idx.insert(b"big", 200)
        assert idx.insert(b"c", 100)  # fits without evicting? 300 > 80%: nothing evictable
        assert idx.evict(1000) and b"a" in idx and b"b" in idx
    assert idx.pinned_bytes == 0
    assert idx.insert(b"big", 200) and b"a" not in idx


def test_pin_released_on_exception_and_leak_reported() -> None:
    idx = ChunkIndex("cpu", 1000)
    idx.insert(b"a", 10)
    with pytest.raises(RuntimeError), idx.pin([b"a"], "save r1"):
        raise RuntimeError("boom")
    assert idx.get(b"a").pins == 0  # type: ignore[union-attr]
    stats = Stats()
    idx2 = ChunkIndex("cpu", 1000, stats=stats)
    idx2.insert(b"a", 10)
    h = idx2.pin([b"a", b"nope"], "load req-17")
    assert h.keys == [b"a"]
    (leak,) = idx2.close()
    assert leak.op == "load req-17" and leak.keys == (b"a",)
    assert idx2.get(b"a").pins == 0  # type: ignore[union-attr]
    h.release()  # late release after close is harmless
    assert idx2.get(b"a").pins == 0  # type: ignore[union-attr]
    assert stats.snapshot().counter("pin_leaks", "cpu") == 1


def test_lookup_and_pin_is_atomic() -> None:
    idx = ChunkIndex("cpu", 1000, policy="lru")
    chain(idx, [b"a", b"b", b"c"], 100)
    n, handle = idx.lookup_and_pin([b"a", b"b", b"z", b"c"], "load")
    assert n == 2 and handle.keys == [b"a", b"b"]
    idx.evict(1000)
    assert b"a" in idx and b"b" in idx and b"c" not in idx
    handle.release()


def test_remove_pinned_then_release_keeps_counts() -> None:
    idx = ChunkIndex("cpu", 1000)
    idx.insert(b"a", 10)
    h = idx.pin([b"a"], "load")
    assert [e.key for e in idx.remove([b"a"])] == [b"a"] and idx.pinned_bytes == 0
    idx.insert(b"a", 10)
    h.release()
    assert idx.get(b"a").pins == 0 and idx.pinned_bytes == 0  # type: ignore[union-attr]


def test_reinsert_updates_location_and_size() -> None:
    idx = ChunkIndex("cpu", 1000)
    idx.insert(b"a", 10, location=1)
    idx.insert(b"a", 10, location=2)
    assert idx.get(b"a").location == 2 and idx.used == 10  # type: ignore[union-attr]
    idx.insert(b"a", 30, location=3)
    assert idx.used == 30 and len(idx) == 1


def test_on_evict_runs_outside_the_lock() -> None:
    seen: list[int] = []
    idx: ChunkIndex

    def demote(victims: list[IndexEntry]) -> None:
        done = threading.Event()
        # another thread must be able to use the index while the callback runs
        threading.Thread(target=lambda: (seen.append(idx.lookup([b"k7"])), done.set())).start()
        assert done.wait(10)

    idx = ChunkIndex("cpu", 1000, policy="lru", on_evict=demote)
    for i in range(10):
        idx.insert(b"k%d" % i, 100)
    assert seen and seen[0] == 1


def test_failing_callback_does_not_fail_insert() -> None:
    def broken(victims: list[IndexEntry]) -> None:
        raise OSError("tier down")

    idx = ChunkIndex("cpu", 100, policy="lru", on_evict=broken)
    assert all(idx.insert(bytes([i]), 50) for i in range(5))


def test_stats_and_bad_arguments() -> None:
    stats = Stats()
    idx = ChunkIndex("disk", 1000, stats=stats)
    chain(idx, [b"a", b"b"], 100)
    idx.lookup([b"a", b"b", b"c"])
    snap = stats.snapshot()
    assert snap.counter("hit_chunks", "disk") == 2 and snap.counter("miss_chunks", "disk") == 1
    assert snap.gauges["used_bytes"]["disk"] == 200
    assert snap.tier_hit_rate("disk") == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match="capacity=0"):
        ChunkIndex("x", 0)
    with pytest.raises(ConfigError, match="high_watermark=1.5"):
        ChunkIndex("x", 10, high_watermark=1.5)
    with pytest.raises(ConfigError, match="'mru'"):
        ChunkIndex("x", 10, policy="mru")
    with pytest.raises(ConfigError, match="size=-1"):
        idx.insert(b"n", -1)


def test_insert_chain_links_parents_and_stops_when_full() -> None:
    evicted: list[bytes] = []
    idx = ChunkIndex("cpu", 1000, policy="prefix-lru", high_watermark=1.0,
                     on_evict=lambda v: evicted.extend(e.key for e in v))
    keys = [b"c%d" % i for i in range(12)]
    assert idx.insert_chain(keys, 100, locations=list(range(12))) == 10
    assert idx.lookup(keys) == 10 and idx.get(b"c3").location == 3  # type: ignore[union-attr]
    assert idx.get(b"c3").parent == b"c2" and not evicted  # type: ignore[union-attr]
    idx.insert(b"other", 100)  # the chain makes room from its tail
    assert evicted == [b"c9", b"c8", b"c7"]  # down to (1.0 - 0.2) of capacity


@pytest.mark.parametrize("policy", ["lru", "prefix-lru", "s3fifo"])
def test_heavy_reuse_then_big_eviction_keeps_structure(policy: str) -> None:
    """Many touches (stale heap items), then one eviction that walks whole chains."""
    evicted: list[IndexEntry] = []
    idx = ChunkIndex("cpu", 100_000, policy=policy, high_watermark=1.0, on_evict=evicted.extend)
    chains = [[b"%d-%d" % (c, i) for i in range(50)] for c in range(20)]
    for ch in chains:
        assert idx.insert_chain(ch, 100) == 50
    for _ in range(30):
        for ch in chains[::3]:
            idx.lookup(ch)
    with idx.pin(chains[0][-1:], "save"):
        victims = idx.evict(60_000)
    assert sum(v.size for v in victims) >= 60_000 and idx.used == 100_000 - len(victims) * 100
    assert chains[0][-1] in idx and len(evicted) == len(victims)
    stored = set(idx.keys())
    assert len(stored) + len(victims) == 1000
    if policy == "prefix-lru":  # every stored chunk still has its predecessor
        for ch in chains:
            present = [k in stored for k in ch]
            assert present == sorted(present, reverse=True)


@pytest.mark.parametrize("policy", ["lru", "prefix-lru", "s3fifo"])
def test_pinned_newest_chunks_never_block_evicting_an_older_one(policy: str) -> None:
    """The two newest chunks are pinned (being loaded): an insert must still evict the unpinned
    older one. S3-FIFO tried only its small queue (all pinned) and refused the insert."""
    idx = ChunkIndex("cpu", 300, policy=policy, high_watermark=1.0, evict_ratio=0.001)
    idx.insert(b"a", 100)
    idx.touch([b"a"])  # reused: S3-FIFO moves it to main
    idx.insert(b"b", 100)
    idx.insert(b"c", 100)
    idx.insert(b"d", 100)
    pin = idx.pin([b"c", b"d"], "load")
    assert idx.insert(b"e", 100)
    assert sorted(idx.keys()) == [b"c", b"d", b"e"]
    pin.release()


def test_an_eviction_storm_is_logged_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    """docs/observability.md promised one ``event=eviction_storm`` line per storm; nothing
    logged it (a red-team finding: 594 evictions in 0.3 s, no line). More than twice the
    capacity evicted within the window is a storm: one WARNING line, not one per eviction."""
    import logging

    idx = ChunkIndex("cpu", capacity=10, high_watermark=1.0, evict_ratio=0.1)
    with caplog.at_level(logging.WARNING, logger="kvortex_core"):
        for i in range(100):  # 90 evictions of 1 byte: 9x the capacity
            idx.insert(i.to_bytes(4, "big"), 1)
    storms = [r.getMessage() for r in caplog.records if "event=eviction_storm" in r.getMessage()]
    assert len(storms) == 1, storms
    assert "tier=cpu" in storms[0] and "capacity_bytes=10" in storms[0]
    caplog.clear()
    quiet = ChunkIndex("disk", capacity=10, high_watermark=1.0, evict_ratio=0.1)
    with caplog.at_level(logging.WARNING, logger="kvortex_core"):
        for i in range(30):  # 20 evictions: twice the capacity is churn, not a storm
            quiet.insert(i.to_bytes(4, "big"), 1)
    assert not [r for r in caplog.records if "eviction_storm" in r.getMessage()]
