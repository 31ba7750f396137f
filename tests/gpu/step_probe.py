"""The host steps of an engine save up to its first DMA, each with its start and duration.

Wraps the engine's and the transfer engine's steps (hashing, slot reservation, id lending,
stream waits and event records, indices, the gather) with timestamps and prints, per
condition, the median start (from the call) and duration of each step before the first DMA
is enqueued. Conditions as in ``cold_probe.py``: ``bench`` (a sync, a raw copy, a sync, then
the call) and ``hot`` (the call right after the previous one returned, a sync between).
The wrappers add ~1 us per step.

Run on the GPU box: . tests/gpu/device_env.sh && ROUNDS=8 python3 tests/gpu/step_probe.py [mla|llama] [tokens] [unified|per-layer]
Not collected by pytest.
"""

from __future__ import annotations

import collections
import inspect
import os
import statistics
import sys
import time

from probes import engine_probe, mark_first_dma, probe_args

import kvortex_core.data.transfer as transfer_mod
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.data import ids as ids_mod
from kvortex_core.data import rows as rows_mod
from kvortex_core.data import streams as streams_mod

MARKS: list[tuple[str, float, float]] = []
ON = [False]


def wrap(owner: object, name: str, label: str) -> None:
    fn = getattr(owner, name, None)
    if fn is None:
        return

    def wrapped(*a, **k):
        if not ON[0]:
            return fn(*a, **k)
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            MARKS.append((label, t, time.perf_counter()))

    if isinstance(inspect.getattr_static(owner, name), staticmethod):
        wrapped = staticmethod(wrapped)
    setattr(owner, name, wrapped)


def main() -> None:
    rounds = int(os.environ.get("ROUNDS", "8"))
    which, tokens, unified = probe_args(sys.argv)
    pr = engine_probe(which, tokens, unified, capacity_tokens=(2 * rounds + 4) * tokens)
    eng, reg, blocks, raw, dev = pr.engine, pr.engine._reg, pr.blocks, pr.raw, pr.device
    print(pr.describe(), flush=True)
    te = reg.transfer
    for owner, name, label in (
        (reg.hasher, "keys", "hash"), (reg.tiers, "begin_save", "begin_save"), (te, "save", "te.save"),
        (te, "_lend_ids", "lend_ids"), (te, "_indices", "indices"), (te, "_gather_batch", "gather"),
        (te, "_index_tensors", "index_tensors"), (te, "_next_stage", "next_stage"),
        (transfer_mod._Direction, "idle", "idle"), (streams_mod.StreamSet, "wait", "stream_wait"),
        (streams_mod.StreamSet, "record", "record"), (streams_mod.StreamSet, "record_current", "record_current"),
        (streams_mod.StreamSet, "hand_over", "hand_over"), (ids_mod.IdsArena, "lend", "arena.lend"),
        (rows_mod.RowPlan, "call_rows", "call_rows"), (rows_mod.StridedPlan, "gather", "strided.gather"),
        (transfer_mod.TransferHandle, "__init__", "handle"),
    ):
        wrap(owner, name, label)
    first = mark_first_dma()
    seqs = pr.sequences(count=2 * rounds + 2)
    eng.save(next(seqs), blocks)
    out: dict[str, list[tuple[float, list[tuple[str, float, float]]]]] = {"bench": [], "hot": []}
    for _ in range(rounds):
        for cond, runs in out.items():
            tp.sync(dev)
            if cond == "bench":
                raw.d2h()
                tp.sync(dev)
            MARKS.clear()
            first.clear()
            ON[0] = True
            t0 = time.perf_counter()
            eng.save(next(seqs), blocks)
            ON[0] = False
            steps = [(n, (a - t0) * 1e6, (b - a) * 1e6) for n, a, b in MARKS if a < first[0]]
            runs.append(((first[0] - t0) * 1e6, steps))
    for cond, runs in out.items():
        print(f"{cond}: first DMA enqueued {statistics.median(r[0] for r in runs):.0f} us after the call")
        by: dict[tuple[int, str], list[tuple[float, float]]] = collections.defaultdict(list)
        for _, steps in runs:
            seen: collections.Counter[str] = collections.Counter()
            for n, a, d in sorted(steps, key=lambda s: s[1]):
                by[(seen[n], n)].append((a, d))
                seen[n] += 1
        rows = sorted(((statistics.median(a for a, _ in v), statistics.median(d for _, d in v), k[1]) for k, v in by.items()))
        for a, d, n in rows:
            print(f"   start {a:7.1f} us  took {d:7.1f} us  {n}")


if __name__ == "__main__":
    main()
