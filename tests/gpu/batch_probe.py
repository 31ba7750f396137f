"""Could one ``cuMemcpyBatchAsync`` call (CUDA 12.8+ driver) move a save's or load's pages with no
gather kernel? Pages of random blocks of separately allocated per-layer caches straight into
(and back from) the canonical payload in pinned memory, against one contiguous copy of the same
bytes, paired per repetition.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/batch_probe.py [mla|llama] [tokens]

Per repetition, after a sync, a raw copy and a sync (as ``bench transfer`` before each call):
``batch``: an event on the caller's stream, the copy stream waits on it, the pointer tables are
built with numpy, one batch call per direction (or one per chunk: ``per-chunk``), an event,
``event.synchronize()``; the clock stops when that returns. ``raw``: one ``copy_`` + sync.
Reports the median ratio raw / batch, the host time of the batch call, and byte equality.
Not collected by pytest.
"""

from __future__ import annotations

import ctypes
import random
import statistics
import sys
import time

import numpy as np
import torch

LIB = ctypes.CDLL("libcuda.so.1")


class Loc(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class Attrs(ctypes.Structure):
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", Loc), ("dstLocHint", Loc),
                ("flags", ctypes.c_uint)]


P = ctypes.c_void_p
try:
    FN = LIB.cuMemcpyBatchAsync_v2
    FN.argtypes = [P, P, P, ctypes.c_size_t, P, P, ctypes.c_size_t, P]
    V2 = True
except AttributeError:
    FN = LIB.cuMemcpyBatchAsync
    FN.argtypes = [P, P, P, ctypes.c_size_t, P, P, ctypes.c_size_t, P, P]
    V2 = False
FN.restype = ctypes.c_int
print("entry point:", "cuMemcpyBatchAsync_v2" if V2 else "cuMemcpyBatchAsync", flush=True)

ATTRS = Attrs(1, Loc(0, 0), Loc(0, 0), 0)  # source access in stream order, no hints
ATTRS_OVL = Attrs(1, Loc(0, 0), Loc(0, 0), 1)  # ... prefer overlap with compute
ZERO = (ctypes.c_size_t * 1)(0)
FAIL = ctypes.c_size_t(0)


def batch(dst: np.ndarray, src: np.ndarray, sizes: np.ndarray, stream: int, attrs: Attrs = ATTRS) -> None:
    n = len(dst)
    if V2:
        err = FN(dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, n, ctypes.byref(attrs), ZERO, 1, stream)
    else:
        err = FN(dst.ctypes.data, src.ctypes.data, sizes.ctypes.data, n, ctypes.byref(attrs), ZERO, 1,
                 ctypes.byref(FAIL), stream)
    if err:
        raise RuntimeError(f"cuMemcpyBatchAsync: CUresult {err} (fail index {FAIL.value})")


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "mla"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 8192
    reps = 9
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, which, tokens, flush=True)
    if which == "mla":
        layers, bt, page_elems, kv = 61, 64, 64 * 576, 1
    else:
        layers, bt, page_elems, kv = 32, 16, 16 * 8 * 128, 2
    page = page_elems * 2  # bf16 bytes
    nb = 2 * tokens // bt
    n_blocks = tokens // bt
    caches = [torch.randn(kv, nb, page_elems, device=dev, dtype=torch.bfloat16) for _ in range(layers)]
    ids = np.array(random.Random(1).sample(range(nb), n_blocks), dtype=np.uint64)
    back_ids = np.array(random.Random(2).sample(range(nb), n_blocks), dtype=np.uint64)
    total = layers * kv * n_blocks * page
    per_chunk = 256 // bt
    chunks = n_blocks // per_chunk
    # payload: chunk-major, then [L, K, blocks of the chunk, page]
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    h0 = host.data_ptr()
    bases = np.array([c.data_ptr() for c in caches], dtype=np.uint64)
    kv_step = np.uint64(caches[0].stride(0) * 2)

    def tables(block_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # order: chunk, layer, k/v, block in chunk
        c = np.arange(chunks, dtype=np.uint64)[:, None, None, None]
        lyr = np.arange(layers)[None, :, None, None]
        k = np.arange(kv, dtype=np.uint64)[None, None, :, None]
        j = np.arange(per_chunk, dtype=np.uint64)[None, None, None, :]
        blk = block_ids.reshape(chunks, 1, 1, per_chunk)
        dev_ptr = bases[lyr] + k * kv_step + blk * np.uint64(page)
        chunk_bytes = np.uint64(layers * kv * per_chunk * page)
        host_ptr = (np.uint64(h0) + c * chunk_bytes + (lyr.astype(np.uint64) * np.uint64(kv) + k)
                    * np.uint64(per_chunk * page) + j * np.uint64(page))
        return (np.ascontiguousarray(np.broadcast_to(dev_ptr, (chunks, layers, kv, per_chunk)).ravel()),
                np.ascontiguousarray(np.broadcast_to(host_ptr, (chunks, layers, kv, per_chunk)).ravel()))

    n = chunks * layers * kv * per_chunk
    sizes = np.full(n, page, dtype=np.uint64)
    raw_src = torch.empty(total, dtype=torch.uint8, device=dev)
    raw_dst = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    side = torch.cuda.Stream()
    s = side.cuda_stream
    print(f"{n} copies of {page} B, {total / 2**20:.0f} MiB, {chunks} chunks", flush=True)

    def raw(d2h: bool) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        (raw_dst.copy_(raw_src, non_blocking=True) if d2h else raw_src.copy_(raw_dst, non_blocking=True))
        torch.cuda.synchronize()
        return time.perf_counter() - t

    host_call: dict[str, list[float]] = {}

    def ours(name: str, d2h: bool, per_chunk_calls: bool, attrs: Attrs = ATTRS, head: int = 0) -> float:
        torch.cuda.synchronize()
        raw(True)
        torch.cuda.synchronize()
        t = time.perf_counter()
        ev = torch.cuda.Event()
        ev.record()
        side.wait_event(ev)
        dptr, hptr = tables(ids if d2h else back_ids)
        dst, src = (hptr, dptr) if d2h else (dptr, hptr)
        c0 = time.perf_counter()
        if per_chunk_calls:
            step = layers * kv * per_chunk
            for i in range(0, n, step):
                batch(dst[i:i + step], src[i:i + step], sizes[i:i + step], s, attrs)
        elif head:
            batch(dst[:head], src[:head], sizes[:head], s, attrs)
            batch(dst[head:], src[head:], sizes[head:], s, attrs)
        else:
            batch(dst, src, sizes, s, attrs)
        host_call.setdefault(name, []).append(time.perf_counter() - c0)
        done = torch.cuda.Event()
        done.record(side)
        done.synchronize()
        return time.perf_counter() - t

    # correctness: save then load into other blocks, compare
    saved_idx = torch.from_numpy(ids.astype(np.int64)).to(dev)
    loaded_idx = torch.from_numpy(back_ids.astype(np.int64)).to(dev)
    want = [c[:, saved_idx].clone() for c in caches]  # the two samples overlap: keep the saved pages
    ours("warm", True, False)
    ours("warm", False, False)
    torch.cuda.synchronize()
    ok = all(torch.equal(w, c[:, loaded_idx]) for w, c in zip(want, caches, strict=True))
    print("byte-exact round trip:", ok, flush=True)

    variants = [("save batch", True, False, ATTRS, 0), ("save per-chunk", True, True, ATTRS, 0),
                ("save batch overlap-flag", True, False, ATTRS_OVL, 0),
                ("save head 2 chunks + rest", True, False, ATTRS, 2 * layers * kv * per_chunk),
                ("load batch", False, False, ATTRS, 0), ("load per-chunk", False, True, ATTRS, 0)]
    ratios: dict[str, list[float]] = {v[0]: [] for v in variants}
    for r in range(reps):
        for name, d2h, pc, attrs, head in variants:
            if r % 2:
                a = ours(name, d2h, pc, attrs, head)
                b = raw(d2h)
            else:
                b = raw(d2h)
                a = ours(name, d2h, pc, attrs, head)
            ratios[name].append(b / a)
    for name, _, _, _, _ in variants:
        rs = ratios[name]
        print(f"{name:28s} ratio median {statistics.median(rs):.3f} (min {min(rs):.3f} max {max(rs):.3f}); "
              f"host of the batch calls {statistics.median(host_call[name]) * 1e6:.0f} us", flush=True)
    # GPU-only throughput of one batch (events around it)
    for d2h in (True, False):
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            dptr, hptr = tables(ids)
            dst, src = (hptr, dptr) if d2h else (dptr, hptr)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(side)
            batch(dst, src, sizes, s)
            b.record(side)
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        rt = []
        for _ in range(5):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            (raw_dst.copy_(raw_src, non_blocking=True) if d2h else raw_src.copy_(raw_dst, non_blocking=True))
            b.record()
            torch.cuda.synchronize()
            rt.append(a.elapsed_time(b) / 1e3)
        print(f"{'d2h' if d2h else 'h2d'} GPU time: batch {total / statistics.median(times) / 1e9:.1f} GB/s, "
              f"raw {total / statistics.median(rt) / 1e9:.1f} GB/s", flush=True)


def head_main(which: str) -> None:
    """A save's head, cold: the rows plan's torch steps for its first two chunks (row table ``add``,
    ``index_select`` into staging, DMA into pinned memory) against one batch call for the same pages,
    each after a sync, a raw copy and a sync; the clock stops when the copies completed."""
    from kvortex_core.data.ids import host_alias

    dev = torch.device("cuda")
    layers, page_elems = (61, 64 * 576) if which == "mla" else (32, 2 * 16 * 8 * 128)
    page = page_elems * 2
    nb, n_blocks = 512, 8  # MLA: two 256-token chunks; Llama: the K and V pages of 128 tokens
    # separately placed layers, irregular gaps of whole pages (as the row plan gets them)
    offs = [sum(nb + j % 3 for j in range(i)) for i in range(layers)]
    big = torch.randn((offs[-1] + nb) * page_elems, device=dev, dtype=torch.bfloat16)
    alias = big.view(-1, page_elems)
    caches = [alias[o:o + nb] for o in offs]
    ids_list = random.Random(3).sample(range(nb), n_blocks)
    ids_host = torch.tensor(ids_list, dtype=torch.int64).pin_memory()
    ids_dev = host_alias(ids_host, dev)  # read in place by the row kernel, as the shipped head does
    base_rows = torch.tensor(offs, device=dev)[:, None]
    staging = torch.empty(layers * n_blocks, page_elems, device=dev, dtype=torch.bfloat16)
    dst = torch.empty(layers * n_blocks * page_elems, dtype=torch.bfloat16, pin_memory=True)
    side = torch.cuda.Stream()
    raw_src = torch.empty(549 * 2**20, dtype=torch.uint8, device=dev)
    raw_dst = torch.empty(549 * 2**20, dtype=torch.uint8, pin_memory=True)
    bases = np.array([c.data_ptr() for c in caches], dtype=np.uint64)
    h0 = dst.data_ptr()

    def cold() -> None:
        torch.cuda.synchronize()
        raw_dst.copy_(raw_src, non_blocking=True)
        torch.cuda.synchronize()

    def torch_head() -> float:
        cold()
        t = time.perf_counter()
        ev = torch.cuda.Event()
        ev.record()
        with torch.cuda.stream(side):
            side.wait_event(ev)
            rows = torch.add(base_rows, ids_dev[None, :]).view(-1)
            torch.index_select(alias, 0, rows, out=staging)
            dst.view(-1, page_elems).copy_(staging, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        done.synchronize()
        return time.perf_counter() - t

    def batch_head() -> float:
        cold()
        t = time.perf_counter()
        ev = torch.cuda.Event()
        ev.record()
        side.wait_event(ev)
        lyr = np.arange(layers)[:, None]
        blk = np.array(ids_list, dtype=np.uint64)[None, :]
        src = np.ascontiguousarray((bases[lyr] + blk * np.uint64(page)).ravel())
        dsts = np.uint64(h0) + np.arange(layers * n_blocks, dtype=np.uint64) * np.uint64(page)
        sizes = np.full(layers * n_blocks, page, dtype=np.uint64)
        batch(dsts, src, sizes, side.cuda_stream)
        done = torch.cuda.Event()
        done.record(side)
        done.synchronize()
        return time.perf_counter() - t

    want = torch.stack([c[ids_list] for c in caches]).view(-1).cpu()
    torch_head()
    ok_t = torch.equal(dst, want)
    dst.zero_()
    batch_head()
    ok_b = torch.equal(dst, want)
    print(f"head {which}: {layers * n_blocks} pages of {page} B ({layers * n_blocks * page / 2**20:.1f} MiB), "
          f"byte-exact torch {ok_t} batch {ok_b}", flush=True)
    res: dict[str, list[float]] = {"torch": [], "batch": []}
    for r in range(25):
        for name, fn in (("torch", torch_head), ("batch", batch_head))[:: 1 if r % 2 else -1]:
            res[name].append(fn())
    for name, xs in res.items():
        xs.sort()
        print(f"  {name:6s} cold head to copies done: median {statistics.median(xs) * 1e6:.0f} us, "
              f"p10 {xs[len(xs) // 10] * 1e6:.0f}, p90 {xs[9 * len(xs) // 10] * 1e6:.0f}", flush=True)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "head":
    head_main(sys.argv[2] if len(sys.argv) > 2 else "mla")
elif __name__ == "__main__":
    main()
