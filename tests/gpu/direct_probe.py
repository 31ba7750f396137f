"""Direct copies: gather kernels that write straight into pinned host memory (and scatters that
read from it) through unified addressing, with no staging buffer and no DMA, against the raw
``copy_`` of the same bytes.

For an 8K-token sequence of each shape: bandwidth of torch ``index_select``/``index_copy_`` on
a device alias of the pinned slots, of a Triton row kernel at several grid sizes, both
directions at once, and a bf16 matmul's slowdown while they run.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/direct_probe.py
Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import triton
import triton.language as tl

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import make_engine
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.rows import alias_bytes, build_row_plan


@triton.jit
def gather_rows(src, rows, dst_ptrs, n_rows, rows_per_chunk, ROW: tl.constexpr, RB: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, ROW)
    for start in range(pid * RB, n_rows, nprog * RB):
        r = start + tl.arange(0, RB)
        m = r < n_rows
        row = tl.load(rows + r, mask=m, other=0)
        vals = tl.load(src + row[:, None] * ROW + cols[None, :], mask=m[:, None])
        c = r // rows_per_chunk
        base = tl.load(dst_ptrs + c, mask=m, other=0).to(tl.pointer_type(tl.int32))
        tl.store(base[:, None] + ((r % rows_per_chunk)[:, None] * ROW + cols[None, :]), vals, mask=m[:, None])


@triton.jit
def scatter_rows(dst, rows, src_ptrs, n_rows, rows_per_chunk, ROW: tl.constexpr, RB: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, ROW)
    for start in range(pid * RB, n_rows, nprog * RB):
        r = start + tl.arange(0, RB)
        m = r < n_rows
        row = tl.load(rows + r, mask=m, other=0)
        c = r // rows_per_chunk
        base = tl.load(src_ptrs + c, mask=m, other=0).to(tl.pointer_type(tl.int32))
        vals = tl.load(base[:, None] + ((r % rows_per_chunk)[:, None] * ROW + cols[None, :]), mask=m[:, None])
        tl.store(dst + row[:, None] * ROW + cols[None, :], vals, mask=m[:, None])


def med(xs):
    return statistics.median(xs)


def case(name, shape, unified, dev, grids):
    tokens = 8192
    caches = tp.make_caches(shape, 2 * tokens // shape.block, dev, unified=unified)
    layout = detect_layout(caches)
    eng = make_engine(caches, layout, tokens, 64 << 20, None)
    te = eng._reg.transfer
    rp, lay = te._rows or build_row_plan(te.views, caches), te.layout
    chunks = tp.random_chunks(layout.num_blocks, tokens, shape.block, 256, 1)
    chunks2 = tp.random_chunks(layout.num_blocks, tokens, shape.block, 256, 2)
    nbytes = layout.chunk_bytes(256)
    total = nbytes * len(chunks)
    raw = tp.RawCopier(total, dev)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    uva = alias_bytes(host.data_ptr(), total, dev)
    uva2 = alias_bytes(host2.data_ptr(), total, dev)
    wide = rp.wide_rows
    ids = torch.tensor(chunks, device=dev)
    ids2 = torch.tensor(chunks2, device=dev)
    rows = rp.call_rows(ids, lay.block_size, lay.kv_count, lay.num_kv_heads).reshape(len(chunks), -1)
    rows2 = rp.call_rows(ids2, lay.block_size, lay.kv_count, lay.num_kv_heads).reshape(len(chunks), -1)
    rpc = rows.shape[1]
    row_i32 = rp.row_bytes // 4
    src32 = wide.view(torch.uint8).view(torch.int32).view(-1, row_i32) if wide.dtype != torch.int32 else wide
    ptrs = torch.tensor([host.data_ptr() + c * nbytes for c in range(len(chunks))], dtype=torch.int64, device=dev)
    ptrs2 = torch.tensor([host2.data_ptr() + c * nbytes for c in range(len(chunks))], dtype=torch.int64, device=dev)
    flat_rows, flat_rows2 = rows.reshape(-1).contiguous(), rows2.reshape(-1).contiguous()
    n_rows = flat_rows.numel()
    print(f"== {name}: {len(chunks)} chunks x {nbytes / 2**20:.1f} MiB, row {rp.row_bytes} B, rows {n_rows}",
          flush=True)

    # reference payload through the engine's own path: index_select into a device buffer
    ref = torch.empty(total, dtype=torch.uint8, device=dev)
    wide_out = ref.view(wide.dtype).view(-1, wide.shape[1])
    torch.index_select(wide, 0, flat_rows, out=wide_out)

    def torch_save():
        out = uva.view(wide.dtype).view(len(chunks), rpc, wide.shape[1])
        for c in range(len(chunks)):
            torch.index_select(wide, 0, rows[c], out=out[c])

    def torch_load():
        src = uva2.view(wide.dtype).view(len(chunks), rpc, wide.shape[1])
        for c in range(len(chunks)):
            wide.index_copy_(0, rows2[c], src[c])

    def tri_save(grid, rb=8, stream=None):
        def run():
            gather_rows[(grid,)](src32, flat_rows, ptrs, n_rows, rpc, ROW=row_i32, RB=rb)
        return run

    def tri_save_per_chunk(grid, rb=8):
        def run():
            for c in range(len(chunks)):
                gather_rows[(grid,)](src32, rows[c], ptrs[c:c + 1], rpc, rpc, ROW=row_i32, RB=rb)
        return run

    def tri_load(grid, rb=8):
        def run():
            scatter_rows[(grid,)](src32, flat_rows2, ptrs2, n_rows, rpc, ROW=row_i32, RB=rb)
        return run

    # correctness
    tri_save(64)()
    torch.cuda.synchronize()
    print("  triton save equal:", torch.equal(host.to(dev), ref), flush=True)
    host.zero_()
    torch_save()
    torch.cuda.synchronize()
    print("  torch save equal:", torch.equal(host.to(dev), ref), flush=True)
    snapshot = [c.clone() for c in caches]
    host2.copy_(ref.cpu())
    tri_load(64)()
    check = torch.empty(total, dtype=torch.uint8, device=dev)
    torch.index_select(wide, 0, flat_rows2, out=check.view(wide.dtype).view(-1, wide.shape[1]))
    torch.cuda.synchronize()
    print("  triton load equal:", torch.equal(check, ref), flush=True)
    for c, s in zip(caches, snapshot, strict=True):
        c.copy_(s)
    del snapshot

    def ratio(fn, rawfn, reps=9):
        ours, base = tp.paired(fn, rawfn, dev, reps)
        rs = [b / o for o, b in zip(ours, base, strict=True)]
        return med(rs), total / med(ours) / 1e9, total / med(base) / 1e9

    def show(label, fn, rawfn):
        r, g, b = ratio(fn, rawfn)
        print(f"  {label:34s} ratio {r:.3f}  {g:6.1f} GB/s (raw {b:5.1f})", flush=True)

    show("torch index_select -> host", torch_save, raw.d2h)
    show("torch index_copy_ <- host", torch_load, raw.h2d)
    for g in grids:
        show(f"triton save grid {g}", tri_save(g), raw.d2h)
    for g in grids:
        show(f"triton load grid {g}", tri_load(g), raw.h2d)
    show("triton save per-chunk grid 32", tri_save_per_chunk(32), raw.d2h)
    show("triton save grid 32 rb 4", tri_save(32, 4), raw.d2h)
    show("triton save grid 32 rb 16", tri_save(32, 16), raw.d2h)
    show("triton load grid 32 rb 16", tri_load(32, 16), raw.h2d)

    # both directions at once, two streams
    s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)
    for g in (16, 32, 64):
        sv, ld = tri_save(g), tri_load(g)

        def both(sv=sv, ld=ld):
            with torch.cuda.stream(s1):
                sv()
            with torch.cuda.stream(s2):
                ld()
        ours, base = tp.paired(both, raw.both, dev, 9)
        rs = [b / o for o, b in zip(ours, base, strict=True)]
        print(f"  both ways triton grid {g:3d}            ratio {med(rs):.3f}  {2 * total / med(ours) / 1e9:6.1f} GB/s "
              f"(raw {2 * total / med(base) / 1e9:5.1f})", flush=True)

    # launch cost on the host (cold: after a sync and a raw copy)
    hs = []
    for _ in range(9):
        torch.cuda.synchronize()
        raw.d2h()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        tri_save(32)()
        hs.append((time.perf_counter() - t0) * 1e6)
    print(f"  triton launch host us (cold) median {med(hs):.0f} min {min(hs):.0f}", flush=True)

    # matmul slowdown
    for label, bg in (("raw copies", lambda: (raw.d2h(), raw.h2d())),
                      ("torch direct", lambda: (torch_save(), torch_load())),
                      ("triton grid 16", lambda: (tri_save(16)(), tri_load(16)())),
                      ("triton grid 32", lambda: (tri_save(32)(), tri_load(32)())),
                      ("triton grid 64", lambda: (tri_save(64)(), tri_load(64)()))):
        side = torch.cuda.Stream(dev)

        def bgs(bg=bg, side=side):
            with torch.cuda.stream(side):
                bg()
            side.synchronize()
        m = tp.matmul_slowdown(dev, bgs, iters=100)
        print(f"  matmul slowdown with {label:16s} {m['slowdown'] * 100:+.1f} %", flush=True)
    eng.close()


def main() -> None:
    dev = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    grids = [int(g) for g in sys.argv[1].split(",")] if len(sys.argv) > 1 else [8, 16, 32, 64, 132]
    case("llama unified", tp.LLAMA_8B, True, dev, grids)
    case("mla per-layer", tp.DEEPSEEK_V3, False, dev, grids)
    case("llama per-layer", tp.LLAMA_8B, False, dev, grids)


if __name__ == "__main__":
    main()
