"""Both directions at once from two Python threads: eager per-chunk calls vs one CUDA graph replay
per chunk. Would graphs close the MLA both-directions gap?

    python3 tests/gpu/graph_bidir_probe.py [tokens ...]       (CUDA; ROUNDS=8, BUSY_US=0,60)

The question (sessions 6-20): through ``KVortexEngine``, a save on one thread and a load on
another reach 0.87-0.95 of the raw copy both ways for MLA, while one thread enqueueing every copy
up front reaches 0.96-0.98 (``pool_bidir_probe.py``). The timelines show the load's thread
starved for the GIL: every torch call releases and re-takes it, so two enqueuing threads hand it
over at almost every call. A graph replay is one call for what takes ~6 eager calls per chunk.

MLA-like shape (61 layers of [blocks, 64, 576] bf16 in one buffer; as in the rows plan, a block's
page of one layer is one row of complex128, 244 rows per chunk),
256-token chunks (4 blocks, 17.2 MiB), random blocks. Per chunk, as the transfer engine does:

* save: upload the chunk's block ids, row table (``torch.add``), ``index_select`` into a staging
  half on a kernel stream, hand over, DMA staging -> the chunk's pinned slot on a DMA stream,
  record the half's free event;
* load: DMA slot -> staging half, hand over, ids upload, row table, ``index_copy_`` into the cache.

Variants (taking turns each round, every repetition paired with the raw copy each way at once):

* ``eager``: those calls, the two staging halves alternating, as the transfer engine issues them;
* ``halves``: eager, each staging half on a stream of its own that runs its chunk's gather and
  DMA in order (no hand-over events between a kernel stream and a DMA stream: ~half the calls);
* ``chained``: ``halves`` plus an event per chunk and, before each chunk's DMA (save) or scatter
  (load), a wait for the previous chunk's event on the other stream (chunks complete in order);
* ``graph``: per (chunk slot, staging half) one captured ``torch.cuda.CUDAGraph`` holding the same
  ops (ids upload from the chunk's own pinned ids, row table, gather/scatter, DMA), replayed on the
  half's stream: one host call per chunk.

``BUSY_US``: pure-Python work per chunk on each thread (the engine's bookkeeping holds the GIL
~50 calls per chunk), a list of values. Every graph result is checked against eager's bytes.
Not collected by pytest.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import statistics
import sys
import time

import torch

from kvortex_core.cli.bench import transfer_parts as tp

LAYERS, BS, WIDTH, CHUNK_BLOCKS = 61, 64, 576, 4
PAGE = BS * WIDTH * 2 // 16  # a block's page of one layer (72 KiB) is one row of complex128, as the rows plan makes it
ROWS_PER_BLOCK = 1


def registered(nbytes: int) -> torch.Tensor:
    """Page-locked with ``cudaHostRegister``, as the engine's pool (not the caching host allocator)."""
    t = torch.empty(nbytes, dtype=torch.uint8)
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, 0)
    assert int(err) == 0, err
    return t


def busy(us: float) -> None:
    if us <= 0:
        return
    end = time.perf_counter() + us * 1e-6
    while time.perf_counter() < end:
        pass


class Bidir:
    def __init__(self, tokens: int, dev: torch.device) -> None:
        self.dev = dev
        self.n = n = tokens // (BS * CHUNK_BLOCKS)
        self.blocks = blocks = 2 * n * CHUNK_BLOCKS + 8
        cache = torch.randn(LAYERS * blocks * BS * WIDTH, device=dev, dtype=torch.bfloat16)
        self.cache = cache
        self.wide = cache.view(torch.complex128).view(-1, PAGE)
        layer_rows = blocks * ROWS_PER_BLOCK
        self.offsets = (torch.arange(LAYERS, device=dev).view(LAYERS, 1, 1) * layer_rows
                        + torch.arange(ROWS_PER_BLOCK, device=dev).view(1, 1, ROWS_PER_BLOCK)).contiguous()
        self.chunk_rows = LAYERS * CHUNK_BLOCKS * ROWS_PER_BLOCK
        self.chunk_bytes = self.chunk_rows * PAGE * 16
        slots = registered(2 * n * self.chunk_bytes)
        self.slots = [slots[i * self.chunk_bytes:(i + 1) * self.chunk_bytes].view(torch.complex128).view(-1, PAGE)
                      for i in range(2 * n)]
        self.save_slots, self.load_slots = self.slots[:n], self.slots[n:]
        perm = torch.randperm(blocks - 8)
        self.save_ids = perm[:n * CHUNK_BLOCKS].view(n, CHUNK_BLOCKS).clone()
        self.load_ids = perm[n * CHUNK_BLOCKS:2 * n * CHUNK_BLOCKS].view(n, CHUNK_BLOCKS).clone()
        # per chunk, its pinned ids (the graph reads them from a fixed address)
        ids_h = registered(2 * n * 64).view(torch.int64).view(2 * n, 8)
        ids_h[:n, :CHUNK_BLOCKS].copy_(self.save_ids)
        ids_h[n:, :CHUNK_BLOCKS].copy_(self.load_ids)
        # one upload of a call's block ids at its start (the engine's _index_tensors): a small
        # H2D copy per chunk would queue behind the other direction's 17 MiB H2D DMAs
        self.ids_h = {"save": ids_h[:n, :CHUNK_BLOCKS], "load": ids_h[n:, :CHUNK_BLOCKS]}
        self.ids_d = {k: torch.zeros(n, CHUNK_BLOCKS, dtype=torch.int64, device=dev) for k in self.ids_h}
        for s in self.load_slots:  # what the loads bring in
            s.view(torch.int64).copy_(torch.randint(-2**62, 2**62, s.view(torch.int64).shape, dtype=torch.int64))
        self.dirs = {d: self._direction() for d in ("save", "load")}
        self.graphs: dict[str, list[list[torch.cuda.CUDAGraph]]] = {}

    def _direction(self) -> dict:
        dev = self.dev
        return {
            "stage": [torch.empty(self.chunk_rows, PAGE, dtype=torch.complex128, device=dev) for _ in range(2)],
            "rows": [torch.empty(LAYERS, CHUNK_BLOCKS, ROWS_PER_BLOCK, dtype=torch.int64, device=dev)
                     for _ in range(2)],
            "ks": torch.cuda.Stream(dev), "ds": torch.cuda.Stream(dev),
            "gs": [torch.cuda.Stream(dev), torch.cuda.Stream(dev)],
            "free": [None, None],
        }

    # --- the ops of one chunk (used eagerly, and captured)
    def _rows(self, d: dict, h: int, ids: torch.Tensor) -> torch.Tensor:
        torch.add(self.offsets, ids.view(1, CHUNK_BLOCKS, 1), alpha=ROWS_PER_BLOCK, out=d["rows"][h])
        return d["rows"][h].view(-1)

    def upload(self, name: str, first: torch.cuda.Stream, second: torch.cuda.Stream) -> None:
        with torch.cuda.stream(first):
            self.ids_d[name].copy_(self.ids_h[name], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(first)
        second.wait_event(ev)

    def save_ops(self, c: int, h: int) -> None:
        d = self.dirs["save"]
        torch.index_select(self.wide, 0, self._rows(d, h, self.ids_d["save"][c]), out=d["stage"][h])
        self.save_slots[c].copy_(d["stage"][h], non_blocking=True)

    def load_ops(self, c: int, h: int) -> None:
        d = self.dirs["load"]
        d["stage"][h].copy_(self.load_slots[c], non_blocking=True)
        self.wide.index_copy_(0, self._rows(d, h, self.ids_d["load"][c]), d["stage"][h])

    def capture(self) -> None:
        for name, ops in (("save", self.save_ops), ("load", self.load_ops)):
            d = self.dirs[name]
            per: list[list[torch.cuda.CUDAGraph]] = []
            for c in range(self.n):
                hs = []
                for h in range(2):
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, stream=d["gs"][h]):
                        ops(c, h)
                    hs.append(g)
                per.append(hs)
            self.graphs[name] = per
        torch.cuda.synchronize()

    # --- one direction, per chunk, on the calling thread
    def eager_save(self, busy_us: float) -> None:
        d = self.dirs["save"]
        ks, ds = d["ks"], d["ds"]
        self.upload("save", ks, ks)
        for c in range(self.n):
            busy(busy_us)
            h = c % 2
            if d["free"][h] is not None:
                ks.wait_event(d["free"][h])
            with torch.cuda.stream(ks):
                torch.index_select(self.wide, 0, self._rows(d, h, self.ids_d["save"][c]), out=d["stage"][h])
                ev = torch.cuda.Event()
                ev.record(ks)
            ds.wait_event(ev)
            with torch.cuda.stream(ds):
                self.save_slots[c].copy_(d["stage"][h], non_blocking=True)
                free = torch.cuda.Event()
                free.record(ds)
            d["free"][h] = free
        d["free"][(self.n - 1) % 2].synchronize()
        d["free"][self.n % 2].synchronize()

    def eager_load(self, busy_us: float) -> None:
        d = self.dirs["load"]
        ks, ds = d["ks"], d["ds"]
        self.upload("load", ks, ks)
        for c in range(self.n):
            busy(busy_us)
            h = c % 2
            if d["free"][h] is not None:
                ds.wait_event(d["free"][h])
            with torch.cuda.stream(ds):
                d["stage"][h].copy_(self.load_slots[c], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(ds)
            ks.wait_event(ev)
            with torch.cuda.stream(ks):
                self.wide.index_copy_(0, self._rows(d, h, self.ids_d["load"][c]), d["stage"][h])
                free = torch.cuda.Event()
                free.record(ks)
            d["free"][h] = free
        d["free"][(self.n - 1) % 2].synchronize()
        d["free"][self.n % 2].synchronize()

    def dmas_only(self) -> None:
        sv, ld = self.dirs["save"], self.dirs["load"]
        with torch.cuda.stream(sv["ds"]):
            for c in range(self.n):
                self.save_slots[c].copy_(sv["stage"][c % 2], non_blocking=True)
        with torch.cuda.stream(ld["ds"]):
            for c in range(self.n):
                ld["stage"][c % 2].copy_(self.load_slots[c], non_blocking=True)
        sv["ds"].synchronize()
        ld["ds"].synchronize()

    def halves_dir(self, name: str, busy_us: float) -> None:
        """Eager, each staging half on a stream of its own doing its chunk's gather and DMA (or DMA
        and scatter) in stream order: no hand-over between a kernel and a DMA stream."""
        d = self.dirs[name]
        ops = self.save_ops if name == "save" else self.load_ops
        self.upload(name, d["gs"][0], d["gs"][1])
        for c in range(self.n):
            busy(busy_us)
            h = c % 2
            with torch.cuda.stream(d["gs"][h]):
                ops(c, h)
        for s in d["gs"]:
            s.synchronize()

    def chained_dir(self, name: str, busy_us: float) -> None:
        """``halves``, with what the engine needs on top: an event per chunk (a save commits each
        chunk as it lands) and, before each chunk's DMA (save) or scatter (load), a wait for the
        previous chunk's event on the other half's stream, so chunks complete in order."""
        d = self.dirs[name]
        gs = d["gs"]
        self.upload(name, gs[0], gs[1])
        last = None
        for c in range(self.n):
            busy(busy_us)
            h = c % 2
            with torch.cuda.stream(gs[h]):
                if name == "save":
                    torch.index_select(self.wide, 0, self._rows(d, h, self.ids_d["save"][c]), out=d["stage"][h])
                    if last is not None:
                        gs[h].wait_event(last)
                    self.save_slots[c].copy_(d["stage"][h], non_blocking=True)
                else:
                    d["stage"][h].copy_(self.load_slots[c], non_blocking=True)
                    if last is not None:
                        gs[h].wait_event(last)
                    self.wide.index_copy_(0, self._rows(d, h, self.ids_d["load"][c]), d["stage"][h])
                ev = torch.cuda.Event()
                ev.record(gs[h])
            last = ev
        last.synchronize()
        for s in gs:
            s.synchronize()

    def graph_dir(self, name: str, busy_us: float) -> None:
        d, graphs = self.dirs[name], self.graphs[name]
        self.upload(name, d["gs"][0], d["gs"][1])
        for c in range(self.n):
            busy(busy_us)
            h = c % 2
            with torch.cuda.stream(d["gs"][h]):
                graphs[c][h].replay()
        for s in d["gs"]:
            s.synchronize()


def main() -> None:
    dev = torch.device("cuda")
    sizes = [int(a) for a in sys.argv[1:]] or [8192, 16384]
    rounds = int(os.environ.get("ROUNDS", "8"))
    busies = [float(b) for b in os.environ.get("BUSY_US", "0,60").split(",")]
    pool = concurrent.futures.ThreadPoolExecutor(2)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  rounds {rounds}", flush=True)
    for tokens in sizes:
        b = Bidir(tokens, dev)
        b.eager_save(0)  # lazy initialisation before capture
        b.eager_load(0)
        b.capture()
        raw = tp.RawCopier(b.n * b.chunk_bytes, dev)

        def run(kind: str, busy_us: float, b: Bidir = b) -> None:
            if kind == "eager":
                fs = [pool.submit(b.eager_save, busy_us), pool.submit(b.eager_load, busy_us)]
            elif kind == "chained":
                fs = [pool.submit(b.chained_dir, "save", busy_us), pool.submit(b.chained_dir, "load", busy_us)]
            elif kind == "halves":
                fs = [pool.submit(b.halves_dir, "save", busy_us), pool.submit(b.halves_dir, "load", busy_us)]
            else:
                fs = [pool.submit(b.graph_dir, "save", busy_us), pool.submit(b.graph_dir, "load", busy_us)]
            for f in fs:
                f.result()

        # correctness: graph bytes == eager bytes, both ways
        base = b.cache.clone()
        torch.cuda.synchronize()
        run("eager", 0)
        torch.cuda.synchronize()
        want_slots = [s.clone() for s in b.save_slots]
        want_cache = b.cache.clone()
        b.cache.copy_(base)
        for s in b.save_slots:
            s.zero_()
        torch.cuda.synchronize()
        run("graph", 0)
        torch.cuda.synchronize()
        def bits(t: torch.Tensor) -> torch.Tensor:  # compared bit for bit (random bits hold NaNs)
            return t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int64)

        same = torch.equal(bits(want_cache), bits(b.cache)) and all(
            torch.equal(bits(w), bits(s)) for w, s in zip(want_slots, b.save_slots, strict=True))
        rows = (b.offsets + b.load_ids[0].to(dev).view(1, -1, 1) * ROWS_PER_BLOCK).view(-1)
        loaded_ok = torch.equal(bits(b.wide.index_select(0, rows).cpu()), bits(b.load_slots[0]))
        rows = (b.offsets + b.save_ids[0].to(dev).view(1, -1, 1) * ROWS_PER_BLOCK).view(-1)
        saved_ok = torch.equal(bits(base.view(torch.complex128).view(-1, PAGE).index_select(0, rows).cpu()),
                               bits(b.save_slots[0]))
        print(f"{tokens} tokens, {b.n} chunks of {b.chunk_bytes / 2**20:.1f} MiB each way: graph == eager: {same}, "
              f"chunk 0 saved == its blocks: {saved_ok}, loaded == its slot: {loaded_ok}", flush=True)
        # where the time goes: each direction alone, and the copies alone (no kernels)
        for label, fn, base_fn in (("eager save alone", functools.partial(b.eager_save, 0), raw.d2h),
                                   ("eager load alone", functools.partial(b.eager_load, 0), raw.h2d),
                                   ("halves save alone", functools.partial(b.halves_dir, "save", 0), raw.d2h),
                                   ("chained save alone", functools.partial(b.chained_dir, "save", 0), raw.d2h),
                                   ("chained load alone", functools.partial(b.chained_dir, "load", 0), raw.h2d),
                                   ("graph save alone", functools.partial(b.graph_dir, "save", 0), raw.d2h),
                                   ("DMAs only, both", b.dmas_only, raw.both)):
            ours, rawt = tp.paired(fn, base_fn, dev, 5, warmup=1, complete=True)
            print(f"  {tokens} {label}: median {statistics.median([r / o for r, o in zip(rawt, ours)]):.3f} "
                  f"(ours {statistics.median(ours) * 1e3:.2f} ms, raw {statistics.median(rawt) * 1e3:.2f} ms)",
                  flush=True)
        kinds = [(k, bu) for bu in busies for k in os.environ.get("KINDS", "eager,halves,chained,graph").split(",")]
        ratios: dict[tuple[str, float], list[float]] = {k: [] for k in kinds}
        for k in kinds:
            run(*k)
        for r in range(rounds):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for k in order:
                ours, rawt = tp.paired(lambda k=k: run(*k), raw.both, dev, 1, warmup=0, complete=True)
                ratios[k].append(rawt[0] / ours[0])
        for k in kinds:
            v = ratios[k]
            print(f"  {tokens} {k[0]:5s} busy {k[1]:4.0f} us/chunk: median {statistics.median(v):.3f} "
                  f"(min {min(v):.3f}, max {max(v):.3f}, n {len(v)})", flush=True)
        del b, raw
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
