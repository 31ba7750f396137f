"""``kvortex bench core``: the control plane's costs against raw baselines of the same run.

- hashing a prompt per algorithm (list and numpy input) vs a raw hash loop over pre-cut bytes;
- ``lookup``/``contains`` of a prompt's keys vs a plain ``dict`` membership loop, by index size;
- insert with eviction per policy vs a raw ``OrderedDict`` LRU, by index size;
- pool allocate+free vs a raw ``list`` pop/append.

Every row gives our time, the raw time and ``ratio = raw / ours`` (1.0 = as fast as raw).
Results go to ``<out>/core.json`` plus a table.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from kvortex_core.cli.bench.common import OutOption

Row = dict[str, Any]


def register(app: typer.Typer) -> None:
    app.command("core")(core)


def core(
    tokens: Annotated[str, typer.Option(help="prompt lengths (tokens) to hash")] =
        "8192,32768,131072",
    chunk_tokens: Annotated[int, typer.Option(min=1)] = 256,
    entries: Annotated[str, typer.Option(help="index sizes (chunks)")] = "1000,10000,100000",
    reps: Annotated[int, typer.Option(min=1, help="timed repetitions (median is reported)")] = 20,
    out: OutOption = Path("bench-results"),
    pin: Annotated[bool, typer.Option(help="with CUDA: also compare cudaHostRegister vs "
                                           "pin_memory=True for the pool (1 and 3 GiB)")] = True,
) -> None:
    """Measure hashing, lookup, insert/evict and pool costs vs raw Python baselines."""
    from kvortex_core.cli.bench.common import (
        hardware,
        parse_numbers,
        parse_sizes,
        write_results,
    )

    sizes = parse_sizes(tokens)
    counts = parse_numbers(entries, "--entries")
    rows = [*bench_hashing(sizes, chunk_tokens, reps), *bench_lookup(counts, reps),
            *bench_insert(counts, max(3, reps // 10)), *bench_pool(reps)]
    payload: dict[str, Any] = {"rows": rows, "chunk_tokens": chunk_tokens}
    if pin and _cuda():
        from kvortex_core.cli.bench.core_pin import run_all

        payload["pin"] = run_all()
    path = write_results(out, "core", payload)
    _print(rows, hardware().get("cpu", "?"))
    if "pin" in payload:
        _print_pin(payload["pin"])
    typer.echo(f"results: {path}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _median(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    from kvortex_core.cli.bench.common import repeat

    times = sorted(repeat(fn, reps, warmup=warmup))
    return times[len(times) // 2]


def _row(case: str, size: int, ours: float, raw: float, unit: str = "ms", per: int = 1) -> Row:
    scale = {"ms": 1e3, "us": 1e6}[unit]
    return {"case": case, "size": size, "unit": unit, "ours": ours * scale / per,
            "raw": raw * scale / per, "ratio": raw / ours if ours > 0 else 0.0}


def bench_hashing(sizes: list[int], chunk_tokens: int, reps: int) -> list[Row]:
    """ChunkHasher.keys per algorithm and input type vs hashing pre-cut chunk bytes."""
    import numpy as np

    from kvortex_core.control.keys import ALGORITHMS, ChunkHasher, KeyNamespace, digest_function

    ns = KeyNamespace("bench/model", "main", "bfloat16", "nhd", 32, 8, 128)
    rows = []
    for n in sizes:
        as_list = np.random.default_rng(0).integers(0, 128_000, n).tolist()
        as_array = np.asarray(as_list, dtype=np.int64)
        raw_bytes = np.asarray(as_list, dtype="<u4").tobytes()
        step = chunk_tokens * 4
        chunks = [raw_bytes[i : i + step] for i in range(0, len(raw_bytes) - step + 1, step)]
        for alg in ALGORITHMS:
            digest = digest_function(alg)
            raw = _median(lambda d=digest, c=chunks: [d(x) for x in c], reps)
            hasher = ChunkHasher(ns, chunk_tokens, alg)
            for kind, data in (("list", as_list), ("numpy", as_array)):
                ours = _median(lambda h=hasher, d=data: h.keys(d), reps)
                rows.append(_row(f"hash {alg} ({kind})", n, ours, raw))
    return rows


def _chains(n_entries: int, chain_len: int = 512) -> list[list[bytes]]:
    import hashlib

    keys = [hashlib.sha256(i.to_bytes(8, "little")).digest() for i in range(n_entries)]
    return [keys[i : i + chain_len] for i in range(0, n_entries, chain_len)]


def _filled_index(chains: list[list[bytes]], policy: str = "prefix-lru") -> Any:
    from kvortex_core.control.index import ChunkIndex

    total = sum(len(c) for c in chains)
    index = ChunkIndex("bench", total * 10, policy=policy, high_watermark=1.0)
    for chain in chains:
        parent = None
        for key in chain:
            index.insert(key, 10, parent=parent)
            parent = key
    return index


def bench_lookup(counts: list[int], reps: int) -> list[Row]:
    """lookup/contains of one 512-key prompt (full hit) vs a dict loop, by index size."""
    rows = []
    for n in counts:
        chains = _chains(max(n, 512))
        index, plain = _filled_index(chains), {k: 10 for c in chains for k in c}
        probe = chains[0]

        def raw_prefix(probe: list[bytes] = probe, plain: dict[bytes, int] = plain) -> int:
            for i, k in enumerate(probe):
                if k not in plain:
                    return i
            return len(probe)

        def raw_mask(probe: list[bytes] = probe, plain: dict[bytes, int] = plain) -> int:
            return sum(1 << i for i, k in enumerate(probe) if k in plain)

        lookup = _median(lambda i=index, p=probe: i.lookup(p), reps)
        contains = _median(lambda i=index, p=probe: i.contains(p), reps)
        rows.append(_row(f"lookup {len(probe)} keys", n, lookup, _median(raw_prefix, reps), "us"))
        rows.append(_row(f"contains {len(probe)} keys", n, contains, _median(raw_mask, reps), "us"))
    return rows


def bench_insert(counts: list[int], reps: int = 3) -> list[Row]:
    """Inserting 2x capacity chained keys (so half are evicted) per policy vs an OrderedDict LRU.

    Each repetition starts from an empty index; the median of ``reps`` runs is reported.
    """
    from kvortex_core.control.index import ChunkIndex

    rows = []
    for n in counts:
        keys = [k for c in _chains(2 * n) for k in c]

        def raw(keys: list[bytes] = keys, n: int = n) -> None:
            lru: OrderedDict[bytes, int] = OrderedDict()
            for k in keys:
                lru[k] = 10
                if len(lru) > n:
                    lru.popitem(last=False)

        raw_s = _median(raw, reps, warmup=0)
        for policy in ("lru", "prefix-lru", "s3fifo"):

            def ours(policy: str = policy, keys: list[bytes] = keys, n: int = n) -> None:
                index, parent = ChunkIndex("bench", n * 10, policy=policy), None
                for i, k in enumerate(keys):
                    index.insert(k, 10, parent=parent if i % 512 else None)
                    parent = k

            ours_s = _median(ours, reps, warmup=0)
            rows.append(_row(f"insert+evict {policy}", n, ours_s, raw_s, "us", per=len(keys)))
    return rows


def bench_pool(reps: int) -> list[Row]:
    """PinnedPool allocate+free pairs vs list pop/append (the same free-stack, unlocked)."""
    import warnings

    from kvortex_core.data.pool import PinnedPool

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pool = PinnedPool(4096, 4096 * 1024)
    free = list(range(1024))
    ops = 10_000

    def ours() -> None:
        for _ in range(ops):
            pool.free(pool.allocate())  # type: ignore[arg-type]

    def raw() -> None:
        for _ in range(ops):
            free.append(free.pop())

    row = _row("pool allocate+free", 1024, _median(ours, reps), _median(raw, reps), "us", per=ops)
    pool.close()
    return [row]


def _print(rows: list[Row], cpu: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kvortex bench core ({cpu})")
    for col in ("case", "size", "ours", "raw", "ratio raw/ours"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        table.add_row(r["case"], str(r["size"]), f"{r['ours']:.3f} {r['unit']}",
                      f"{r['raw']:.3f} {r['unit']}", f"{r['ratio']:.2f}")
    Console(width=120).print(table)


def _print_pin(pin: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pool pinning ({pin['gpu']})")
    for col in ("method", "GiB", "alloc s", "reserved GiB", "H2D GB/s", "D2H GB/s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in pin["rows"]:
        table.add_row(r["method"], f"{r['bytes'] / 2**30:.2f}",
                      "-" if r["alloc_s"] is None else f"{r['alloc_s']:.3f}",
                      "-" if r["reserved_bytes"] is None else f"{r['reserved_bytes'] / 2**30:.2f}",
                      f"{r['h2d_slots_gbps']:.1f}", f"{r['d2h_slots_gbps']:.1f}")
    Console(width=120).print(table)
