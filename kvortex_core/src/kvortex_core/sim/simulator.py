"""Trace-driven simulation of the control plane: the real hasher, index and eviction policies.

No tensors move: each request is turned into chunk keys by :class:`ChunkHasher`, looked up in
one :class:`ChunkIndex` per tier (the same code the engine runs), and its missing chunks are
inserted the way the engine stores them: into the first tier; a chunk reaches a lower tier when
the tier above evicts it (demotion, the default) or right away (``write_through``); a hit found
only in a lower tier is promoted into the first. Token hit rate and bytes read and written per
tier come out per run.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kvortex_core.control.index import ChunkIndex, IndexEntry
from kvortex_core.control.keys import ChunkHasher, KeyNamespace
from kvortex_core.sim.trace import Request

#: Bytes of KV per token for Llama-3.1-8B in bf16: 32 layers x K,V x 8 heads x 128 x 2 bytes.
LLAMA_8B_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2
SIM_NAMESPACE = KeyNamespace("sim", "", "bfloat16", "canonical", 32, 8, 128)


@dataclass
class PreparedTrace:
    """A trace hashed once into chunk keys, shared by every (policy, capacity) run."""

    keys: list[list[bytes]]
    tokens: list[int]
    chunk_tokens: list[int]
    chunk_bytes: list[int]
    unique_chunks: int
    working_set_bytes: int

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)


def prepare(
    requests: Iterable[Request],
    *,
    chunk_tokens: int = 256,
    bytes_per_token: int = LLAMA_8B_BYTES_PER_TOKEN,
    algorithm: str = "sha256",
) -> PreparedTrace:
    """Hash every request into chunk keys with the real :class:`ChunkHasher`.

    Token requests are cut into ``chunk_tokens`` chunks. Block-hash requests (Mooncake) are
    already one id per block: they are chained through a hasher with one "token" per chunk,
    so each block becomes one chunk of ``block_tokens`` tokens.
    """
    by_tokens = ChunkHasher(SIM_NAMESPACE, chunk_tokens, algorithm)
    by_block = ChunkHasher(SIM_NAMESPACE, 1, algorithm)
    keys, tokens, ctoks = [], [], []
    for r in requests:
        if r.tokens is not None:
            keys.append(by_tokens.keys(r.tokens))
            ctoks.append(chunk_tokens)
        else:
            keys.append(by_block.keys(r.block_hashes or []))
            ctoks.append(r.block_tokens)
        tokens.append(r.num_tokens)
    unique: dict[bytes, int] = {}
    for ks, ct in zip(keys, ctoks, strict=True):
        for k in ks:
            unique[k] = ct * bytes_per_token
    return PreparedTrace(
        keys, tokens, ctoks, [c * bytes_per_token for c in ctoks], len(unique), sum(unique.values())
    )


@dataclass
class TierResult:
    """What one tier did over a run."""

    name: str
    capacity: int
    hit_tokens: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0


@dataclass
class SimResult:
    """One (policy, capacity) run over a prepared trace."""

    policy: str
    capacity_fraction: float
    requests: int
    total_tokens: int
    tiers: list[TierResult] = field(default_factory=list)

    @property
    def hit_tokens(self) -> int:
        return sum(t.hit_tokens for t in self.tiers)

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.total_tokens if self.total_tokens else 0.0

    def tier_hit_rate(self, name: str) -> float:
        tier = next(t for t in self.tiers if t.name == name)
        return tier.hit_tokens / self.total_tokens if self.total_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["token_hit_rate"] = self.token_hit_rate
        return out


class _Tier:
    def __init__(self, name: str, capacity: int, policy: str, hw: float, ratio: float) -> None:
        self.result = TierResult(name, capacity)
        self.below: _Tier | None = None  # demotion target (None: evicted chunks are dropped)
        self.index = ChunkIndex(
            name,
            capacity,
            policy=policy,
            high_watermark=hw,
            evict_ratio=ratio,
            on_evict=self._evicted,
        )

    def _evicted(self, entries: list[IndexEntry]) -> None:
        self.result.evictions += len(entries)
        below = self.below
        if below is None:
            return
        for e in entries:  # as the tiering does: demote unless the chunk is already below
            if e.key not in below.index and below.index.insert(e.key, e.size, parent=e.parent):
                below.result.bytes_written += e.size


def simulate(
    trace: PreparedTrace,
    *,
    policy: str,
    capacities: Sequence[tuple[str, int]],
    capacity_fraction: float = 0.0,
    high_watermark: float = 1.0,
    evict_ratio: float = 0.05,
    write_through: bool = False,
) -> SimResult:
    """Replay ``trace`` through one index per ``(tier name, capacity bytes)``, first = hottest."""
    tiers = [_Tier(n, c, policy, high_watermark, evict_ratio) for n, c in capacities]
    if not write_through:
        for upper, lower in itertools.pairwise(tiers):
            upper.below = lower
    result = SimResult(
        policy, capacity_fraction, len(trace.keys), trace.total_tokens, [t.result for t in tiers]
    )
    for r, keys in enumerate(trace.keys):
        _replay_one(
            tiers, keys, trace.chunk_tokens[r], trace.chunk_bytes[r], trace.tokens[r], write_through
        )
    for t in tiers:
        t.index.close()
    return result


def _replay_one(
    tiers: list[_Tier],
    keys: list[bytes],
    ctok: int,
    cbytes: int,
    n_tokens: int,
    write_through: bool,
) -> None:
    if not keys:
        return
    masks = [t.index.contains(keys) for t in tiers]
    served_by: list[int] = []  # tier index serving each chunk of the hit prefix
    for i in range(len(keys)):
        bit = 1 << i
        where = next((ti for ti, m in enumerate(masks) if m & bit), None)
        if where is None:
            break
        served_by.append(where)
    hit = len(served_by)
    first = tiers[0]
    for ti, tier in enumerate(tiers):
        mine = [i for i in range(hit) if served_by[i] == ti]
        if mine:
            # A trace's last block may be partial (Mooncake input_length): never count past it.
            tier.result.hit_tokens += sum(max(0, min(ctok, n_tokens - i * ctok)) for i in mine)
            tier.result.bytes_read += len(mine) * cbytes
            tier.index.touch([keys[i] for i in mine])
    # Promote lower-tier hits, then store the recomputed suffix, in prefix order.
    for i in range(len(keys)):
        if i < hit and served_by[i] == 0:
            continue
        parent = keys[i - 1] if i else None
        if not masks[0] >> i & 1 and first.index.insert(keys[i], cbytes, parent=parent):
            first.result.bytes_written += cbytes
        if i >= hit and write_through:
            _write_behind(tiers, masks, keys[i], i, cbytes, parent)


def _write_behind(
    tiers: list[_Tier], masks: list[int], key: bytes, i: int, cbytes: int, parent: bytes | None
) -> None:
    for ti in range(1, len(tiers)):
        if masks[ti] >> i & 1:
            tiers[ti].index.touch([key])
        elif tiers[ti].index.insert(key, cbytes, parent=parent):
            tiers[ti].result.bytes_written += cbytes


def sweep(
    trace: PreparedTrace,
    *,
    policies: Sequence[str],
    fractions: Sequence[float],
    lower_tiers: Sequence[tuple[str, float]] = (),
    high_watermark: float = 1.0,
    evict_ratio: float = 0.05,
    write_through: bool = False,
) -> list[SimResult]:
    """Every policy at every first-tier capacity (fraction of the working set).

    ``lower_tiers`` are ``(name, factor)``: a lower tier holds ``factor`` x the first tier.
    """
    out = []
    for frac in fractions:
        cap = max(1, int(frac * trace.working_set_bytes))
        caps = [("cpu", cap)] + [(n, max(1, int(cap * f))) for n, f in lower_tiers]
        for policy in policies:
            out.append(
                simulate(
                    trace,
                    policy=policy,
                    capacities=caps,
                    capacity_fraction=frac,
                    high_watermark=high_watermark,
                    evict_ratio=evict_ratio,
                    write_through=write_through,
                )
            )
    return out


def ideal_hit_rate(trace: PreparedTrace) -> float:
    """Token hit rate of an unbounded cache: the ceiling every policy is compared against."""
    seen: set[bytes] = set()
    hit = 0
    for keys, ctok, n_tokens in zip(trace.keys, trace.chunk_tokens, trace.tokens, strict=True):
        n = 0
        while n < len(keys) and keys[n] in seen:
            n += 1
        hit += min(n * ctok, n_tokens)
        seen.update(keys)
    total = trace.total_tokens
    return hit / total if total else 0.0
