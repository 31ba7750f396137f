"""Scratch: host cost of row computation from ids read in place (UVA) vs upload + add."""
import statistics
import time

import torch
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import make_engine
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.rows import alias_bytes

dev = torch.device("cuda")
shape = tp.LLAMA_8B
caches = tp.make_caches(shape, 1024, dev, unified=True)
layout = detect_layout(caches)
eng = make_engine(caches, layout, 8192, 64 << 20, None)
te = eng._reg.transfer
rp, d, lay = te._rows, te._save, te.layout
chunks = tp.random_chunks(layout.num_blocks, 8192, 16, 256, 1)[:2]
c, n = len(chunks), len(chunks[0])
host = torch.empty(4096, dtype=torch.int64, pin_memory=True)
uva = alias_bytes(host.data_ptr(), host.numel() * 8, dev).view(torch.int64)
offsets = rp.block_offsets(lay.block_size, lay.kv_count, lay.num_kv_heads)
lk, inner = offsets.shape
off4 = offsets.view(1, lk, 1, inner)
ids4 = uva[: c * n].view(c, 1, n, 1)
host[: c * n] = torch.tensor(chunks).view(-1)
with d.streams.on(d.streams.first):
    ref = rp.call_rows(d.upload_ids(chunks), lay.block_size, lay.kv_count, lay.num_kv_heads)
    got = torch.add(off4, ids4, alpha=rp.block_rows)
torch.cuda.synchronize()
print("uva rows equal:", torch.equal(ref.reshape(-1), got.reshape(-1)), flush=True)
raw = tp.RawCopier(1 << 30, dev)
a, b = [], []
for _ in range(15):
    torch.cuda.synchronize(); raw.d2h(); torch.cuda.synchronize()
    t0 = time.perf_counter()
    with d.streams.on(d.streams.first):
        r1 = rp.call_rows(d.upload_ids(chunks), lay.block_size, lay.kv_count, lay.num_kv_heads)
    t1 = time.perf_counter()
    torch.cuda.synchronize(); raw.d2h(); torch.cuda.synchronize()
    t2 = time.perf_counter()
    with d.streams.on(d.streams.first):
        host[: c * n] = torch.frombuffer(bytearray(8 * c * n), dtype=torch.int64)  # a host write like upload's
        r2 = torch.add(off4, ids4, alpha=rp.block_rows)
    t3 = time.perf_counter()
    a.append((t1 - t0) * 1e6); b.append((t3 - t2) * 1e6)
print(f"cold upload+rows {statistics.median(a):.0f} us, uva add {statistics.median(b):.0f} us", flush=True)


def gpu_us(fn, reps=20):
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / reps


eng2 = make_engine(caches, layout, 8192, 64 << 20, None)
rp = eng2._reg.transfer._rows
dev_ids = torch.tensor(chunks, device=dev).view(c, 1, n, 1)
print(f"gpu us: add device ids {gpu_us(lambda: torch.add(off4, dev_ids, alpha=rp.block_rows)):.1f}, "
      f"add uva ids {gpu_us(lambda: torch.add(off4, ids4, alpha=rp.block_rows)):.1f}", flush=True)
eng2.close()
