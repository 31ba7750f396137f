"""Could the copy engine gather the pages itself? 2-D DMAs (``cudaMemcpy2DAsync``, one per block,
its layers as the rows) against one contiguous copy of the same bytes.

Run on the GPU box: . tests/gpu/device_env.sh && python3 tests/gpu/dma2d_probe.py

MLA (61 layers, 72 KiB pages: one 2-D copy per block, 128 per 8K tokens) and Llama-8B per-layer
NHD (32 layers, 32 KiB pages per K/V: one per block and K/V, 1024 per 8K tokens), pages of random
blocks of a layer-major buffer into the canonical payload ``[L, K, n, page]`` of each 256-token
chunk, device to pinned host and back. Reports GB/s against the raw copy, host time of the
issuing loop, and byte equality. Calls the CUDA runtime through ctypes (which library: printed).
Not collected by pytest.
"""

from __future__ import annotations

import ctypes
import glob
import os
import random
import statistics
import time

import torch


def cudart() -> ctypes.CDLL:
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    roots = [os.path.dirname(torch.__file__), *glob.glob(os.path.join(os.path.dirname(torch.__file__), "..",
                                                                        "nvidia", "*", "lib"))]
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            print("cudart:", name, flush=True)
            return lib
        except OSError:
            pass
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "libcudart.so*"))):
            print("cudart:", path, flush=True)
            return ctypes.CDLL(path)
    raise OSError("no libcudart")


LIB = cudart()
F = LIB.cudaMemcpy2DAsync
F.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
              ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
F.restype = ctypes.c_int
D2H, H2D = 2, 1


def timed(fn, reps: int = 9) -> tuple[float, float]:
    """(median GPU seconds, median host seconds of the call) over reps, synchronized between."""
    gpu, host = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t)
        b.record()
        torch.cuda.synchronize()
        gpu.append(a.elapsed_time(b) / 1e3)
    return statistics.median(gpu), statistics.median(host)


def case(name: str, layers: int, kv: int, page: int, block_tokens: int, tokens: int = 8192) -> None:
    n = 256 // block_tokens  # blocks per chunk
    chunks = tokens // 256
    nb = 2 * tokens // block_tokens
    src = torch.randint(0, 255, (layers, kv, nb, page), dtype=torch.uint8, device="cuda")
    layer_step, kv_step = src.stride(0), src.stride(1)
    chunk_bytes = layers * kv * n * page
    dst = torch.empty(chunks * chunk_bytes, dtype=torch.uint8, pin_memory=True)
    back = torch.zeros_like(src)
    ids = random.Random(1).sample(range(nb), chunks * n)
    stream = torch.cuda.current_stream().cuda_stream
    s0, d0, b0 = src.data_ptr(), dst.data_ptr(), back.data_ptr()

    def copies(kind: int) -> None:
        """Every block's pages, all layers as the rows of one 2-D copy: the cache at ``s0`` into the
        payloads (D2H), or the payloads into the other cache at ``b0`` (H2D)."""
        for c in range(chunks):
            base = d0 + c * chunk_bytes
            for i in range(n):
                blk = ids[c * n + i]
                for k in range(kv):
                    host, dev = base + (k * n + i) * page, (s0 if kind == D2H else b0) + k * kv_step + blk * page
                    dst_ptr, dpitch, src_ptr, spitch = ((host, kv * n * page, dev, layer_step) if kind == D2H
                                                        else (dev, layer_step, host, kv * n * page))
                    err = F(dst_ptr, dpitch, src_ptr, spitch, page, layers, kind, stream)
                    assert err == 0, err

    def save() -> None:
        copies(D2H)

    def load() -> None:
        copies(H2D)

    save()
    load()
    torch.cuda.synchronize()
    ok = torch.equal(back[:, :, ids], src[:, :, ids])
    expect = src[:, :, torch.tensor(ids, device="cuda").view(chunks, n)]  # [L, K, C, n, page]
    ok2 = torch.equal(dst.view(chunks, layers, kv, n, page).cuda(), expect.permute(2, 0, 1, 3, 4))
    raw_dev = torch.empty(chunks * chunk_bytes, dtype=torch.uint8, device="cuda")
    raw_d2h, _ = timed(lambda: dst.copy_(raw_dev, non_blocking=True))
    raw_h2d, _ = timed(lambda: raw_dev.copy_(dst, non_blocking=True))
    t_save, h_save = timed(save)
    t_load, h_load = timed(load)
    gb = chunks * chunk_bytes / 1e9
    print(f"{name}: {chunks * n * kv} 2-D copies of {layers} x {page // 1024} KiB, equal {ok} {ok2}; "
          f"d2h {gb / t_save:.1f} GB/s = {raw_d2h / t_save:.3f} of raw ({gb / raw_d2h:.1f}), issue {h_save * 1e3:.2f} ms; "
          f"h2d {gb / t_load:.1f} GB/s = {raw_h2d / t_load:.3f} of raw ({gb / raw_h2d:.1f}), issue {h_load * 1e3:.2f} ms",
          flush=True)


def main() -> None:
    print(torch.cuda.get_device_name(), flush=True)
    case("mla", 61, 1, 64 * 576 * 2, 64)
    case("llama per-layer NHD", 32, 2, 16 * 8 * 128 * 2, 16)


if __name__ == "__main__":
    main()
