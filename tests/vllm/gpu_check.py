"""GPU check of the connector's worker side (no vLLM needed): byte-exact saves/loads and bandwidth.

KV caches are allocated exactly as vLLM 0.15 (FlashAttention, per layer ``(2, B, N, H, D)``,
NHD or HND) and vLLM 0.33 (one buffer, per-layer ``[B, H, N, C]`` views, LBNHC or BLNHC) do,
with a Llama-3-8B rank shape (32 layers, 8 KV heads, head size 128, bf16, 16-token blocks,
256-token chunks = 32 MiB). For each layout the worker executes a save plan and a load plan of
``--chunks`` chunks; the loaded blocks must equal the saved ones bit for bit. Bandwidth is
reported next to a raw baseline measured in the same run: one contiguous copy of the same
bytes between the GPU and pinned host memory, and the transfer engine alone (no worker).

    python tests/vllm/gpu_check.py --chunks 32 --repeats 3 --out result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from vllm_kv_alloc import cross_layer_v015, flash_attn_v015, unified_v033

from kvortex_core.config import KVortexConfig
from kvortex_core.control.keys import ChunkHasher, KeyNamespace
from kvortex_vllm.compat import cross_layer_views
from kvortex_vllm.metadata import LoadSpec, SaveSpec, StepPlan
from kvortex_vllm.worker import WorkerSide

L, H, D, N, CHUNK = 32, 8, 128, 16, 256
BPC = CHUNK // N
DTYPE = torch.bfloat16
DEV = "cuda"  # --device cpu runs a small smoke test of this script anywhere

def _cross(b: int, hnd: bool) -> dict[str, torch.Tensor]:
    phys, order, _, _ = cross_layer_v015(L, b, N, H, D, DTYPE, DEV, hnd=hnd)
    return {f"layer.{i}": v for i, v in enumerate(cross_layer_views(phys, order))}


LAYOUTS = {
    "vllm-0.15 cross-layer NHD": lambda b: _cross(b, False),
    "vllm-0.15 flash_attn NHD": lambda b: flash_attn_v015(L, b, N, H, D, DTYPE, DEV)[0],
    "vllm-0.15 flash_attn HND": lambda b: flash_attn_v015(L, b, N, H, D, DTYPE, DEV, hnd=True)[0],
    "vllm-0.33 unified LBNHC": lambda b: unified_v033(L, b, N, H, D, DTYPE, DEV, order="LBNHC")[0],
    "vllm-0.33 unified BLNHC": lambda b: unified_v033(L, b, N, H, D, DTYPE, DEV, order="BLNHC")[0],
}


def blocks_of(name: str, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The given blocks of one layer tensor, in vLLM's own indexing for that layout."""
    return t[:, ids] if name.startswith("vllm-0.15") else t[ids]  # (2, B, ...) vs [B, H, N, C]


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def timed(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def raw_baseline(nbytes: int, repeats: int) -> dict[str, float]:
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=DEV)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=DEV == "cuda")
    d2h = timed(lambda: host.copy_(gpu, non_blocking=True), repeats)
    h2d = timed(lambda: gpu.copy_(host, non_blocking=True), repeats)
    return {"raw_d2h_GBps": nbytes / d2h / 1e9, "raw_h2d_GBps": nbytes / h2d / 1e9}


def check_layout(name: str, chunks: int, repeats: int) -> dict[str, Any]:
    num_blocks = 2 * chunks * BPC + 8
    caches = LAYOUTS[name](num_blocks)
    gen = torch.Generator(device=DEV).manual_seed(0)
    for t in caches.values():
        t.copy_(torch.randn(t.shape, generator=gen, device=DEV, dtype=torch.float32).to(DTYPE))
    chunk_bytes = L * 2 * CHUNK * H * D * 2
    cap = chunks * (chunk_bytes + 8192)
    cfg = KVortexConfig(chunk_tokens=CHUNK, tiers={"cpu": {"type": "cpu", "capacity": cap}})
    ns = KeyNamespace("llama-3-8b", "", "bfloat16", "LKTHD-kv2", L, H, D)
    worker = WorkerSide(cfg, ns.digest())
    t0 = time.perf_counter()
    worker.register_kv_caches(caches)
    setup_s = time.perf_counter() - t0
    keys = ChunkHasher(ns, CHUNK).keys(list(range(chunks * CHUNK)))
    a = list(range(1, 1 + chunks * BPC))
    b = list(range(1 + chunks * BPC, 1 + 2 * chunks * BPC))
    saves = [SaveSpec("A", i, keys[i], tuple(a[i * BPC:(i + 1) * BPC])) for i in range(chunks)]
    loads = [LoadSpec("B", i, keys[i], tuple(b[i * BPC:(i + 1) * BPC])) for i in range(chunks)]
    step = iter(range(1, 10**6))

    def save() -> None:
        worker.bind(StepPlan(next(step), worker.geometry.num_slots, saves=saves))
        worker.start_save()
        worker.clear()
        for s in list(worker._pending):  # completion as the connector sees it: sealed slots
            worker._finish_save(s)

    def load() -> None:
        worker.bind(StepPlan(next(step), worker.geometry.num_slots, loads=loads))
        worker.start_load()
        for layer in caches:
            worker.wait_for_layer(layer)
        worker.clear()

    save_s = timed(save, repeats)
    load_s = timed(load, repeats)
    worker.config.transfer.layerwise = False
    load_whole_s = timed(load, repeats)
    errors = worker.take_load_errors()
    ia, ib = torch.tensor(a, device=DEV), torch.tensor(b, device=DEV)
    exact = all(torch.equal(blocks_of(name, t, ia), blocks_of(name, t, ib)) for t in caches.values())
    eng = worker.engine
    views = [worker._payload(i) for i in range(chunks)]
    bl = [list(s.block_ids) for s in saves]
    eng_save_s = timed(lambda: eng.save(bl, views).wait(), repeats)
    eng_load_s = timed(lambda: eng.load(views, [list(s.block_ids) for s in loads]).wait(), repeats)
    total = chunks * chunk_bytes
    worker.shutdown()
    caches.clear()
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {
        "layout": name, "chunks": chunks, "bytes": total, "byte_exact": exact and not errors,
        "load_errors": len(errors), "pool_setup_s": round(setup_s, 3),
        "worker_save_GBps": total / save_s / 1e9, "worker_load_layerwise_GBps": total / load_s / 1e9,
        "worker_load_GBps": total / load_whole_s / 1e9,
        "engine_save_GBps": total / eng_save_s / 1e9, "engine_load_GBps": total / eng_load_s / 1e9,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device")
        return 2
    total = args.chunks * L * 2 * CHUNK * H * D * 2
    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    result: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__,
                              **raw_baseline(total, args.repeats), "layouts": []}
    for name in LAYOUTS:
        r = check_layout(name, args.chunks, args.repeats)
        r["save_vs_raw"] = r["worker_save_GBps"] / result["raw_d2h_GBps"]
        r["load_vs_raw"] = r["worker_load_GBps"] / result["raw_h2d_GBps"]
        result["layouts"].append(r)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    print(json.dumps({k: v for k, v in result.items() if k != "layouts"}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0 if all(r["byte_exact"] for r in result["layouts"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
