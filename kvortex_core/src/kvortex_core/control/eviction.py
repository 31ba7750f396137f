"""Eviction policies of :class:`~kvortex_core.control.index.ChunkIndex`.

A policy only orders entries; the index owns the entries, the lock, the byte accounting and the
pins. Every method is called with the index lock held. ``select(need)`` removes and returns
unpinned victims whose sizes add up to at least ``need`` bytes (fewer when too much is pinned).

- ``lru``: least recently used first.
- ``prefix-lru`` (default): only *leaves* are candidates — chunks none of whose successors
  (children in the prefix tree) are stored — least recently used first. A chunk without its
  predecessor can never be hit, so a chain is evicted from its tail.
- ``s3fifo``: S3-FIFO (Yang et al., SOSP'23): a small FIFO (10% of the bytes) filters one-hit
  wonders, a main FIFO with 2-bit frequency counters re-inserts reused entries (lazy promotion),
  and a ghost FIFO of recently evicted keys admits returning keys straight into main.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

from kvortex_core.errors import ConfigError

if TYPE_CHECKING:
    from kvortex_core.control.index import IndexEntry

POLICIES = ("lru", "prefix-lru", "s3fifo")


class EvictionPolicy(Protocol):
    """What :class:`ChunkIndex` needs from a policy (all calls under the index lock)."""

    def on_insert(self, entry: IndexEntry) -> None: ...
    def on_access(self, entry: IndexEntry) -> None: ...
    def on_remove(self, entry: IndexEntry) -> None: ...
    def select(self, need: int) -> list[IndexEntry]: ...


class LRUPolicy:
    """Least recently used first; pinned entries are skipped, not reordered."""

    def __init__(self) -> None:
        self._order: OrderedDict[bytes, IndexEntry] = OrderedDict()

    def on_insert(self, entry: IndexEntry) -> None:
        self._order[entry.key] = entry

    def on_access(self, entry: IndexEntry) -> None:
        self._order.move_to_end(entry.key)

    def on_remove(self, entry: IndexEntry) -> None:
        self._order.pop(entry.key, None)

    def select(self, need: int) -> list[IndexEntry]:
        victims, freed = [], 0
        for entry in self._order.values():
            if freed >= need:
                break
            if entry.pins == 0:
                victims.append(entry)
                freed += entry.size
        for entry in victims:
            del self._order[entry.key]
        return victims


class PrefixLRUPolicy:
    """LRU over the leaves of the prefix tree: successors go before their predecessors.

    A min-heap of ``(tick, key)`` with lazy invalidation: an item is live while its entry is
    stored, is a leaf and still has that tick. Stale items are skipped and the heap is rebuilt
    when it grows past twice the number of entries.
    """

    def __init__(self, entries: dict[bytes, IndexEntry]) -> None:
        self._entries = entries
        self._children: dict[bytes, int] = {}
        self._heap: list[tuple[int, bytes]] = []

    def _is_leaf(self, key: bytes) -> bool:
        return key not in self._children

    def _push(self, entry: IndexEntry) -> None:
        heapq.heappush(self._heap, (entry.tick, entry.key))

    def _compact(self) -> None:
        """Drop stale items once they outnumber live entries (never in the middle of select)."""
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [(e.tick, k) for k, e in self._entries.items() if self._is_leaf(k)]
            heapq.heapify(self._heap)

    def on_insert(self, entry: IndexEntry) -> None:
        parent = entry.parent
        if parent is not None:
            self._children[parent] = self._children.get(parent, 0) + 1
        if self._is_leaf(entry.key):
            self._push(entry)
            self._compact()

    def on_access(self, entry: IndexEntry) -> None:
        if self._is_leaf(entry.key):
            self._push(entry)
            self._compact()

    def on_remove(self, entry: IndexEntry) -> None:
        parent = entry.parent
        if parent is None:
            return
        left = self._children[parent] - 1
        if left:
            self._children[parent] = left
            return
        del self._children[parent]
        parent_entry = self._entries.get(parent)
        if parent_entry is not None:
            self._push(parent_entry)  # it just became a leaf

    def select(self, need: int) -> list[IndexEntry]:
        self._compact()
        victims, freed, held = [], 0, []
        heap, entries = self._heap, self._entries  # on_remove below pushes here, never compacts
        while freed < need and heap:
            tick, key = heapq.heappop(heap)
            entry = entries.get(key)
            if entry is None or entry.tick != tick or not self._is_leaf(key) or entry.evicting:
                continue  # stale heap item
            if entry.pins:
                held.append((tick, key))
                continue
            entry.evicting = True  # the index deletes it; duplicates in the heap are now stale
            victims.append(entry)
            freed += entry.size
            self.on_remove(entry)
        for item in held:
            heapq.heappush(heap, item)
        return victims


class S3FIFOPolicy:
    """S3-FIFO over bytes: small queue = 10% of capacity, ghost holds as many keys as main."""

    SMALL_FRACTION = 0.1
    MAX_FREQ = 3

    def __init__(self, capacity: int) -> None:
        self._small_target = max(1, int(capacity * self.SMALL_FRACTION))
        self._small: OrderedDict[bytes, IndexEntry] = OrderedDict()  # oldest first
        self._main: OrderedDict[bytes, IndexEntry] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._small_bytes = 0

    def on_insert(self, entry: IndexEntry) -> None:
        entry.freq = 0
        if entry.key in self._ghost:  # evicted recently and back: admit straight into main
            del self._ghost[entry.key]
            self._main[entry.key] = entry
        else:
            self._small[entry.key] = entry
            self._small_bytes += entry.size

    def on_access(self, entry: IndexEntry) -> None:
        entry.freq = min(entry.freq + 1, self.MAX_FREQ)

    def on_remove(self, entry: IndexEntry) -> None:
        if self._small.pop(entry.key, None) is not None:
            self._small_bytes -= entry.size
        else:
            self._main.pop(entry.key, None)

    def _remember(self, key: bytes) -> None:
        self._ghost[key] = None
        while len(self._ghost) > max(len(self._main), 1):
            self._ghost.popitem(last=False)

    def _evict_small(self) -> IndexEntry | bool:
        """Tail of small: reused -> promoted to main (True); pinned -> back to the head (False);
        else evicted (the entry)."""
        key, entry = self._small.popitem(last=False)
        self._small_bytes -= entry.size
        if entry.pins:
            self._small[key] = entry
            self._small_bytes += entry.size
            return False
        if entry.freq > 0:
            entry.freq = 0
            self._main[key] = entry
            return True
        self._remember(key)
        return entry

    def _evict_main(self) -> IndexEntry | bool:
        """Tail of main: reused -> re-inserted with freq - 1 (True); pinned -> re-inserted (False);
        else evicted (the entry)."""
        key, entry = self._main.popitem(last=False)
        if entry.pins:
            self._main[key] = entry
            return False
        if entry.freq > 0:
            entry.freq -= 1
            self._main[key] = entry
            return True
        return entry

    def select(self, need: int) -> list[IndexEntry]:
        victims, freed = [], 0
        # Each entry is revisited at most MAX_FREQ + 2 times before it is evicted or found
        # pinned, so this bound only trips when everything left is pinned.
        budget = (self.MAX_FREQ + 2) * (len(self._small) + len(self._main)) + 1
        # Pinned entries met in a row per queue: a queue whose every entry is pinned (a load
        # holding all the newest chunks, say) must not stop eviction from the other one.
        pinned_run = {"small": 0, "main": 0}
        while freed < need and (self._small or self._main) and budget > 0:
            budget -= 1
            small_full = pinned_run["small"] >= len(self._small)
            main_full = pinned_run["main"] >= len(self._main)
            if small_full and main_full:
                break  # everything left is pinned
            use_small = bool(self._small) and not small_full and (
                self._small_bytes >= self._small_target or not self._main or main_full)
            queue = "small" if use_small else "main"
            result = self._evict_small() if use_small else self._evict_main()
            if result is False:
                pinned_run[queue] += 1
                continue
            pinned_run = {"small": 0, "main": 0}
            if result is not True:
                victims.append(result)
                freed += result.size
        return victims


def make_policy(name: str, entries: dict[bytes, IndexEntry], capacity: int) -> EvictionPolicy:
    """The policy called ``name`` for an index holding ``entries``."""
    if name == "lru":
        return LRUPolicy()
    if name == "prefix-lru":
        return PrefixLRUPolicy(entries)
    if name == "s3fifo":
        return S3FIFOPolicy(capacity)
    raise ConfigError(
        f"eviction policy {name!r} is not supported; use one of {', '.join(POLICIES)}"
    )
