"""Both directions through KVortexEngine, ways of enqueuing compared in one process.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/bidir_variants.py [mla|llama] [tokens] [unified|per-layer]
(``VARIANTS=inline,workers,...`` picks the variants, ``ROUNDS=8`` the repetitions of each.)

Each repetition is the benchmark's both-directions case (``save_async`` of a fresh sequence
while ``load_async`` of a stored one), paired with the raw copies both ways; the variants take
turns, so each sees the same state of the VM. Variants:

* ``inline``: as shipped (each engine thread enqueues its own copies);
* ``workers``: the engine's calls hand their enqueues to the transfer engine's two direction
  threads (``inline=False``);
* ``one``: as ``workers``, with one enqueuer thread for both directions;
* ``si200``: as shipped, with the interpreter's GIL switch interval at 200 us (default 5 ms);
* ``commit1``: as shipped, a save's chunks indexed once at its end (no waits per 64 MiB);
* ``parts1``: as shipped, each call one part (no small first part, no doubling parts);
* ``p1c1``: ``parts1`` and ``commit1`` together.

Not collected by pytest.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from collections.abc import Iterator

from probes import engine_probe, probe_args

import kvortex_core.engine as engine_mod
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence


def main() -> None:
    which, tokens, unified = probe_args(sys.argv)
    rounds = int(os.environ.get("ROUNDS", "8"))
    variants = os.environ.get("VARIANTS", "inline,workers,one,si200,commit1").split(",")
    pr = engine_probe(which, tokens, unified, capacity_tokens=(4 + len(variants) * rounds + 4) * tokens)
    eng, te = pr.engine, pr.engine._reg.transfer
    print(pr.describe(), flush=True)
    stored = _sequence(tokens, 99)
    eng.save(stored, pr.blocks)
    seqs = pr.sequences(count=len(variants) * rounds + 8)
    real_save, real_load = te.save, te.load
    save_worker, load_worker = te._save.worker, te._load.worker

    @contextlib.contextmanager
    def variant(name: str) -> Iterator[None]:
        if name in ("workers", "one"):
            te.save = lambda *a, **k: real_save(*a, **{**k, "inline": False})
            te.load = lambda *a, **k: real_load(*a, **{**k, "inline": False})
            if name == "one":
                te._load.worker = save_worker
        interval = sys.getswitchinterval()
        if name == "si200":
            sys.setswitchinterval(0.0002)
        group = engine_mod._COMMIT_GROUP_BYTES
        if name in ("commit1", "p1c1"):
            engine_mod._COMMIT_GROUP_BYTES = 1 << 50
        if name in ("parts1", "p1c1"):
            eng._parts = lambda n, reg: [(0, n)]
        try:
            yield
        finally:
            te.save, te.load = real_save, real_load
            te._load.worker = load_worker
            sys.setswitchinterval(interval)
            engine_mod._COMMIT_GROUP_BYTES = group
            eng.__dict__.pop("_parts", None)

    def both() -> None:
        hs = eng.save_async(next(seqs), pr.blocks)
        hl = eng.load_async(stored, pr.other)
        moved = (hs.wait(), hl.wait())
        if moved != (tokens, tokens):
            raise RuntimeError(f"moved {moved}, not {tokens} each")

    raw_both = pr.raw.both if pr.device.type == "cuda" else lambda: (pr.raw.d2h(), pr.raw.h2d())
    raw_both()  # its streams are made on first use
    for name in variants:  # warm each path
        with variant(name):
            both()
    ratios: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for name in order:
            with variant(name):
                ours, raw = tp.paired(both, raw_both, pr.device, 1, warmup=0, complete=True)
            ratios[name].append(raw[0] / ours[0])
    for name in variants:
        v = ratios[name]
        print(f"{which} {tokens} {'unified' if unified else 'per-layer'} {name:8s} median {statistics.median(v):.3f} "
              f"(min {min(v):.3f}, max {max(v):.3f}, n {len(v)})", flush=True)
    eng.close()


if __name__ == "__main__":
    main()
