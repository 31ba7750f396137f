"""Layers at falling addresses: the strided plan's falling run against the row plan, same memory.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/falling_ab.py [mla|llama] [tokens]
(``ROUNDS=8``: repetitions of each case; ``CASES=rising,falling,falling-strided,falling-rows``.)

Per-layer tensors carved from one buffer, in layer order (``rising``: one rising run, what one
buffer gives) or reversed (``falling``: one falling run, what consecutive ``cudaMalloc`` calls
give on the H100 VMs, see runs_probe.py), so the placement does not depend on the allocator.
Each case is an engine over those tensors (gather "auto"; ``-strided``: gather="strided",
``-rows``: gather="rows"); saves of fresh sequences
and loads of a stored one, each paired with the raw copy of the same bytes, the cases taking
turns. Not collected by pytest.
"""

from __future__ import annotations

import os
import random
import statistics
import sys

import torch

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import _sequence, make_engine
from kvortex_core.data.layouts import detect_layout


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "mla"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    rounds = int(os.environ.get("ROUNDS", "8"))
    names = os.environ.get("CASES", "rising,falling,falling-strided").split(",")
    dev = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))
    shape = tp.DEEPSEEK_V3 if which == "mla" else tp.LLAMA_8B
    nb = 2 * tokens // shape.block
    dims = (nb, shape.block, shape.head) if shape.mla else (2, nb, shape.block, shape.heads, shape.head)
    gen = torch.Generator(device=dev).manual_seed(0)
    buf = torch.randn((shape.layers, *dims), generator=gen, device=dev, dtype=torch.bfloat16)
    hints = {"kv_count": 1} if shape.mla else None
    cases = {}
    for name in names:
        order = range(shape.layers) if name.startswith("rising") else range(shape.layers - 1, -1, -1)
        caches = [buf[i] for i in order]
        layout = detect_layout(caches, hints)
        gather = name.split("-")[1] if "-" in name else "auto"
        eng = make_engine(caches, layout, 4 * tokens, 64 << 20, hints, gather)
        te = eng._reg.transfer
        runs = [(r.first, r.end, r.reversed) for r in te._strided.runs] if te._strided is not None else None
        print(f"{name}: gather {te.gather_mode}, runs {runs}", flush=True)
        cases[name] = eng
    blocks = random.Random(1).sample(range(nb), tokens // shape.block)
    other = random.Random(2).sample(range(nb), tokens // shape.block)
    stored = _sequence(tokens, 99)
    seqs = iter([_sequence(tokens, 1000 + i) for i in range(len(names) * (rounds + 2))])
    raw = tp.RawCopier(layout.chunk_bytes(tokens), dev)
    raw.d2h()
    raw.h2d()
    for eng in cases.values():  # warm each path
        eng.save(stored, blocks)
        eng.save(next(seqs), blocks)
        eng.load(stored, other)
    ratios: dict[tuple[str, str], list[float]] = {(n, w): [] for n in names for w in ("save", "load")}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            eng = cases[name]
            ours, base = tp.paired(lambda e=eng: e.save(next(seqs), blocks), raw.d2h, dev, 1, warmup=0, complete=True)
            ratios[(name, "save")].append(base[0] / ours[0])
            eng.save(stored, blocks)  # back in the cache if saves evicted it
            ours, base = tp.paired(lambda e=eng: e.load(stored, other), raw.h2d, dev, 1, warmup=0, complete=True)
            ratios[(name, "load")].append(base[0] / ours[0])
    dev_name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    for (name, what), v in ratios.items():
        print(f"{dev_name} {which} {tokens} {name:13s} engine {what} median {statistics.median(v):.3f} "
              f"(min {min(v):.3f}, max {max(v):.3f}, n {len(v)})", flush=True)
    for eng in cases.values():
        eng.close()


if __name__ == "__main__":
    main()
