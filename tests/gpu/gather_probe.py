"""One chunk gathered through a strided view of all layers (block ids as the index, no row
table) against the row-table gather: byte equality, GPU time of each kernel (also with the ids
read in place from pinned memory), host time on a cold path, and the layers' address steps.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/gather_probe.py
Not collected by pytest (no ``test_`` prefix). Results: docs/benchmarks/transfer.md.
"""

from __future__ import annotations

import itertools
import statistics
import time

import torch
from probes import gpu_us

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import make_engine
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.rows import alias_bytes


def strided_view(views: list[torch.Tensor]) -> torch.Tensor | None:
    """``[L, K, B, N, H, D]`` over all layers (in complex128), or None when layers are not uniform."""
    es = views[0].element_size()
    strides = [0 if size == 1 else st for size, st in zip(views[0].shape, views[0].stride(), strict=True)]
    ptrs = [v.data_ptr() for v in views]
    step = ptrs[1] - ptrs[0] if len(ptrs) > 1 else 0
    if any(b - a != step for a, b in itertools.pairwise(ptrs)) or any(v.stride() != views[0].stride() for v in views):
        return None
    start = min(ptrs)
    last = views[-1]
    extent = sum((s - 1) * st for s, st in zip(last.shape, last.stride(), strict=True)) + 1
    end = last.data_ptr() + extent * es
    alias = alias_bytes(start, end - start, views[0].device)
    w = 16
    if step % w or any(st * es % w for st in strides[:-1]) or views[0].shape[-1] * es % w:
        return None
    wide = alias[: (end - start) // w * w].view(torch.complex128)
    b, k, n, h, d = views[0].shape
    sb, sk, sn, sh, _ = (st * es // w for st in strides)
    return torch.as_strided(wide, (len(views), k, b, n, h, d * es // w), (step // w, sk, sb, sn, sh, 1),
                            (ptrs[0] - start) // w)


def main() -> None:
    dev = torch.device("cuda")
    raw = tp.RawCopier(1 << 30, dev)
    for name, shape, unified in (("llama unified", tp.LLAMA_8B, True), ("llama per-layer", tp.LLAMA_8B, False),
                                 ("mla per-layer", tp.DEEPSEEK_V3, False)):
        case(name, shape, unified, raw, dev)


def case(name, shape, unified, raw, dev) -> None:
    caches = tp.make_caches(shape, 2 * 8192 // shape.block, dev, unified=unified)
    layout = detect_layout(caches)
    eng = make_engine(caches, layout, 8192, 64 << 20, None)
    te = eng._reg.transfer
    rp, lay = te._rows, te.layout
    v = strided_view(te.views)
    print(name, "uniform:", v is not None, "row bytes", rp.row_bytes, flush=True)
    ptrs = [t.data_ptr() for t in te.views]
    print("  layer steps (bytes):", sorted({b - a for a, b in itertools.pairwise(ptrs)})[:8],
          "runs:", 1 + sum(1 for i in range(2, len(ptrs)) if ptrs[i] - ptrs[i - 1] != ptrs[i - 1] - ptrs[i - 2]),
          flush=True)
    if v is None:
        eng.close()
        return
    chunk = tp.random_chunks(layout.num_blocks, 8192, shape.block, 256, 1)[0]
    ids = torch.tensor(chunk, device=dev)
    nbytes = layout.chunk_bytes(256)
    out_a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    out_b = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    rows = rp.call_rows(ids.view(1, -1), lay.block_size, lay.kv_count, lay.num_kv_heads).reshape(-1)
    wide = rp.wide_rows
    oa = out_a.view(wide.dtype).view(-1, wide.shape[1])
    ob = out_b.view(torch.complex128).view(v.shape[0], v.shape[1], len(chunk), *v.shape[3:])
    torch.index_select(wide, 0, rows, out=oa)
    torch.index_select(v, 2, ids, out=ob)
    torch.cuda.synchronize()
    print("  equal:", torch.equal(out_a, out_b), flush=True)
    t_rows = gpu_us(lambda: torch.index_select(wide, 0, rows, out=oa))
    t_str = gpu_us(lambda: torch.index_select(v, 2, ids, out=ob))
    t_add = gpu_us(lambda: rp.call_rows(ids.view(1, -1), lay.block_size, lay.kv_count, lay.num_kv_heads))
    # load direction: scatter back through the view
    host_ids = torch.tensor(chunk).pin_memory()
    uva = alias_bytes(host_ids.data_ptr(), host_ids.numel() * 8, dev).view(torch.int64)
    torch.index_select(v, 2, uva, out=ob)
    torch.cuda.synchronize()
    print("  uva index equal:", torch.equal(out_a, out_b), flush=True)
    print(f"  gpu us strided gather with uva index: {gpu_us(lambda: torch.index_select(v, 2, uva, out=ob)):.1f}",
          flush=True)
    t_sc_rows = gpu_us(lambda: wide.index_copy_(0, rows, oa))
    t_sc_str = gpu_us(lambda: v.index_copy_(2, ids, ob))
    print(f"  gpu us: rows gather {t_rows:.1f} + row kernel {t_add:.1f}; strided gather {t_str:.1f}; "
          f"scatter rows {t_sc_rows:.1f} strided {t_sc_str:.1f}", flush=True)
    ha, hb = [], []
    for _ in range(15):
        torch.cuda.synchronize()
        raw.d2h()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = rp.call_rows(ids.view(1, -1), lay.block_size, lay.kv_count, lay.num_kv_heads).reshape(-1)
        torch.index_select(wide, 0, r, out=oa)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        raw.d2h()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        torch.index_select(v, 2, ids, out=ob)
        t3 = time.perf_counter()
        ha.append((t1 - t0) * 1e6)
        hb.append((t3 - t2) * 1e6)
    print(f"  host cold us: rows+gather {statistics.median(ha):.0f}, strided {statistics.median(hb):.0f}",
          flush=True)
    eng.close()


if __name__ == "__main__":
    main()
