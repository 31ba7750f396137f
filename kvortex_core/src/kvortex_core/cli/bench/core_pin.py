"""How to pin the host pool: ``cudaHostRegister`` of one pageable buffer vs ``pin_memory=True``.

Measures, per size: the time to get the pinned buffer, how many bytes the CUDA host allocator
really reserved (it rounds up), and host<->GPU bandwidth from each buffer (one contiguous copy
and chunk-sized slot copies), with a pageable buffer as the raw baseline. Needs CUDA.

Kept free of typer so it also runs as a plain script on a machine without our CLI deps:
``python kvortex_core/src/kvortex_core/cli/bench/core_pin.py [OUT.json]``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

GiB = 1 << 30


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _host_reserved() -> int | None:
    import torch

    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is None:
        return None
    s = stats()
    return int(s.get("reserved_bytes.current", s.get("allocated_bytes.current", 0)) or 0) or None


def _bandwidth(host: Any, dev: Any, slot: int, reps: int = 5) -> dict[str, float]:
    """GB/s of host->GPU and GPU->host: whole buffer once, then slot-by-slot copies."""
    import torch

    n = dev.numel()

    def run(fn: Any) -> float:
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return n / best / 1e9

    def slots(to_dev: bool) -> None:
        for off in range(0, n, slot):
            if to_dev:
                dev[off : off + slot].copy_(host[off : off + slot], non_blocking=True)
            else:
                host[off : off + slot].copy_(dev[off : off + slot], non_blocking=True)

    return {
        "h2d_gbps": run(lambda: dev.copy_(host[:n], non_blocking=True)),
        "d2h_gbps": run(lambda: host[:n].copy_(dev, non_blocking=True)),
        "h2d_slots_gbps": run(lambda: slots(True)),
        "d2h_slots_gbps": run(lambda: slots(False)),
    }


def measure_size(nbytes: int, copy_bytes: int = GiB // 4,
                 slot: int = 32 << 20) -> list[dict[str, Any]]:
    """One row per method for a pinned buffer of ``nbytes``."""
    import torch

    dev = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    rows = []
    before = _host_reserved() or 0
    buf, secs = _timed(lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))
    torch.cuda.synchronize()
    after = _host_reserved()
    rows.append({"method": "host_alloc", "bytes": nbytes, "alloc_s": secs,
                 "reserved_bytes": None if after is None else after - before,
                 **_bandwidth(buf, dev, slot)})
    del buf
    getattr(torch._C, "_host_emptyCache", lambda: None)()

    def register() -> Any:
        b = torch.empty(nbytes, dtype=torch.uint8)
        err = torch.cuda.cudart().cudaHostRegister(b.data_ptr(), nbytes, 0)
        assert int(err) == 0, f"cudaHostRegister failed: {err}"
        return b

    buf, secs = _timed(register)
    rows.append({"method": "register", "bytes": nbytes, "alloc_s": secs, "reserved_bytes": nbytes,
                 **_bandwidth(buf, dev, slot)})
    ptr = buf.data_ptr()
    _, unreg = _timed(lambda: torch.cuda.cudart().cudaHostUnregister(ptr))
    rows[-1]["unregister_s"] = unreg
    del buf
    pageable = torch.empty(copy_bytes, dtype=torch.uint8).fill_(1)
    rows.append({"method": "pageable (raw baseline)", "bytes": copy_bytes, "alloc_s": None,
                 "reserved_bytes": None, **_bandwidth(pageable, dev, slot)})
    return rows


def measure_pool(nbytes: int, slot_bytes: int = 32 << 20) -> list[dict[str, Any]]:
    """PinnedPool construction time per pin method (what the engine pays at start)."""
    from kvortex_core.data.pool import PinnedPool

    rows = []
    for method in ("register", "host_alloc"):
        pool, secs = _timed(lambda m=method: PinnedPool(slot_bytes, nbytes, device=0, pin_method=m))
        rows.append({"method": method, "pool_bytes": nbytes, "construct_s": secs,
                     "pinned": pool.pinned, "numa_node": pool.numa_node})
        pool.close()
    return rows


def numa_info() -> dict[str, Any]:
    from kvortex_core.data import numa

    return {"gpu_bus_id": numa.gpu_bus_id(0), "numa_nodes": numa.num_nodes(),
            "gpu_numa_node": numa.gpu_numa_node(0), "libnuma": numa._libnuma() is not None}


def run_all(sizes: tuple[int, ...] = (GiB, 3 * GiB)) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "rows": [r for n in sizes for r in measure_size(n)]}
    try:  # needs the kvortex_core package importable (pydantic & co.)
        out.update(pool=measure_pool(2 * GiB), numa=numa_info())
    except ImportError as exc:
        out["pool_error"] = repr(exc)
    return out


if __name__ == "__main__":
    result = run_all()
    text = json.dumps(result, indent=2)
    print(text)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            fh.write(text)
