# ruff: noqa: B023  (each closure runs within its own loop iteration)
"""GPU and host time of one chunk's gather and scatter by each plan, layers rising or falling.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/gather_kernels.py [mla|llama]

Per-layer tensors carved from one buffer in layer order (one rising run) or reversed (one
falling run, as consecutive ``cudaMalloc`` calls place them). For one 256-token chunk of
shuffled blocks: the strided plan (rising: ``index_select``; falling: ``index.Tensor_out`` /
``index_put_``), the row plan (row table kernel + ``index_select`` / ``index_copy_``), each
checked byte-equal to plain indexing; GPU time per call (CUDA events over 50 calls) and host
time per call, hot (back to back) and cold (after a device sync and a 1 GiB copy). Not collected by pytest.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time

import torch
from probes import gpu_us

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.data.layouts import detect_layout, layer_views
from kvortex_core.data.rows import build_row_plan, build_strided_plan


def host_us(fn, raw: tp.RawCopier, cold: bool) -> float:
    out = []
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(15):
        sync()
        if cold:
            raw.d2h()
            sync()
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
    return statistics.median(out)


def main() -> None:
    which = sys.argv[1] if len(sys.argv) > 1 else "mla"
    dev = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))
    shape = tp.DEEPSEEK_V3 if which == "mla" else tp.LLAMA_8B
    nb = 2 * 8192 // shape.block
    dims = (nb, shape.block, shape.head) if shape.mla else (2, nb, shape.block, shape.heads, shape.head)
    buf = torch.randn((shape.layers, *dims), device=dev, dtype=torch.bfloat16)
    hints = {"kv_count": 1} if shape.mla else None
    raw = tp.RawCopier(1 << 30, dev)
    ids_list = random.Random(1).sample(range(nb), 256 // shape.block)
    ids = torch.tensor(ids_list, device=dev)
    for order in ("rising", "falling"):
        caches = [buf[i] for i in (range(shape.layers) if order == "rising" else range(shape.layers - 1, -1, -1))]
        layout = detect_layout(caches, hints)
        views = layer_views(caches, layout)  # [B, K, N, H, D] per layer
        expect = torch.stack([v[ids].transpose(0, 1) for v in views])  # [L, K, n, N, H, D]
        sp = build_strided_plan(views)
        rp = build_row_plan(views, caches)
        plans = {}
        if sp is not None:
            out = torch.empty(expect.numel() * 2 // torch.empty((), dtype=sp.dtype).element_size(),
                              dtype=sp.dtype, device=dev).view(*expect.shape[:-1], -1)
            plans["strided"] = (lambda o=out: sp.gather(0, shape.layers, ids, o),
                                lambda o=out: sp.scatter(0, shape.layers, ids, o), out)
        if rp is not None:
            wide = rp.wide_rows
            rout = torch.empty(expect.numel() * 2 // wide.element_size(), dtype=wide.dtype,
                               device=dev).view(-1, wide.shape[1])

            def rows():
                return rp.call_rows(ids.view(1, -1), layout.block_size, layout.kv_count,
                                    layout.num_kv_heads).view(-1)

            plans["rows"] = (lambda o=rout: torch.index_select(wide, 0, rows(), out=o),
                             lambda o=rout: wide.index_copy_(0, rows(), o), rout)
        for name, (gather, scatter, out) in plans.items():
            gather()
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            sync()
            ok = torch.equal(out.view(torch.uint8).view(-1), expect.contiguous().view(torch.uint8).view(-1))
            scatter()  # writes the same bytes back: the cache is unchanged
            sync()
            same = torch.equal(torch.stack([v[ids].transpose(0, 1) for v in views]), expect)
            print(f"{which} {order:7s} {name:7s} equal {ok} {same}: gather gpu {gpu_us(gather):6.1f} us, "
                  f"host hot {host_us(gather, raw, False):5.1f} cold {host_us(gather, raw, True):5.1f}; "
                  f"scatter gpu {gpu_us(scatter):6.1f} us, host hot {host_us(scatter, raw, False):5.1f} "
                  f"cold {host_us(scatter, raw, True):5.1f}", flush=True)


if __name__ == "__main__":
    main()
