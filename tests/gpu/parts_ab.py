"""A/B of the engine's first part size, in one process: each repetition runs a raw copy, then a
save and a load of 8K tokens per candidate size (order rotating), and reports per candidate the
median of (raw / ours) over the repetitions.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/parts_ab.py [mla|llama] [tokens] [unified|per-layer]
``SIZES_MIB=24,36``: the candidates (``kvortex_core.engine._FIRST_PART_BYTES``). Not collected by pytest.
"""

from __future__ import annotations

import os
import statistics
import sys

from probes import engine_probe, probe_args

import kvortex_core.engine as engine_mod
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence


def main() -> None:
    sizes = [int(float(x) * (1 << 20)) for x in os.environ.get("SIZES_MIB", "24,36").split(",")]
    reps = int(os.environ.get("REPS", "12"))
    which, tokens, unified = probe_args(sys.argv)
    # room for every save: a full tier would evict during the timed calls
    pr = engine_probe(which, tokens, unified, capacity_tokens=(reps * len(sizes) + 4) * tokens)
    eng, reg, dev = pr.engine, pr.engine._reg, pr.device
    stored = _sequence(pr.tokens, 99)
    eng.save(stored, pr.blocks)
    seqs = pr.sequences(count=200)
    ratios: dict[int, dict[str, list[float]]] = {s: {"save": [], "load": []} for s in sizes}
    parts = {}
    tp.settle()
    for rep in range(reps):
        order = sizes[rep % len(sizes):] + sizes[:rep % len(sizes)]
        raw_d2h = tp.once(pr.raw.d2h, dev)
        raw_h2d = tp.once(pr.raw.h2d, dev)
        for size in order:
            engine_mod._FIRST_PART_BYTES = size
            reg.parts.clear()
            parts[size] = eng._parts(pr.tokens // 256, reg)
            seq = next(seqs)
            moved = []
            s = tp.once(lambda seq=seq, moved=moved: moved.append(eng.save(seq, pr.blocks)), dev, complete=True)
            ld = tp.once(lambda moved=moved: moved.append(eng.load(stored, pr.other)), dev, complete=True)
            assert moved == [tokens, tokens], moved
            if rep:  # the first is a warm-up
                ratios[size]["save"].append(raw_d2h / s)
                ratios[size]["load"].append(raw_h2d / ld)
    print(pr.describe())
    for size in sizes:
        r = ratios[size]
        print(f"  first part {size / (1 << 20):5.1f} MiB, parts {[b - a for a, b in parts[size]]}: "
              f"save {statistics.median(r['save']):.3f} load {statistics.median(r['load']):.3f} "
              f"({len(r['save'])} reps)", flush=True)
    eng.close()


if __name__ == "__main__":
    main()
