"""Orchestration of ``kvortex bench transfer``: which cases run at which sizes, rows for the table."""

from __future__ import annotations

import time
from typing import Any

import torch

from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.common import Measurement, ratio_spread
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.transfer import TransferEngine

CHUNK_TOKENS = 256


def run_all(device: torch.device, sizes: list[int], *, reps: int, mla_layers: int, staging: int,
            parts: set[str], extra_tokens: int | None = None) -> dict[str, Any]:
    """Run the selected parts; a CPU run shrinks the model so it stays a quick smoke test."""
    cpu = device.type != "cuda"
    llama = tp.Shape("llama-3.1-8b(cpu-scaled)", 2, 2, 64, 16) if cpu else tp.LLAMA_8B
    mla = tp.Shape("mla(cpu-scaled)", 2, 1, 64, 64, mla=True) if cpu else tp.Shape(
        "deepseek-v3-mla", mla_layers, 1, 576, 64, mla=True)
    res: dict[str, Any] = {
        "device_name": torch.cuda.get_device_name(device) if not cpu else "cpu",
        "sizes": sizes, "reps": reps, "staging_bytes": staging, "chunk_tokens": CHUNK_TOKENS,
        "rows": [], "cases": {}, "extra_tokens": extra_tokens,
    }
    t0 = time.perf_counter()
    if "verify" in parts:
        res["verify"] = tp.verify_layouts(device)
    # MLA from 8K tokens up: in one buffer as vLLM 0.30+ allocates every layer, and per layer (older
    # vLLM). Where "auto" took a strided plan for separate per-layer tensors (they landed evenly
    # spaced), the same layout again through the row plan, what it takes for irregularly placed
    # layers (from 8K tokens up)
    big = [s for s in sizes if s >= 8192] or [max(sizes)]
    for shape, unified in ((llama, True), (llama, False), (mla, True), (mla, False)):
        label = _bandwidth(res, shape, device, sizes if shape is llama else big, reps, staging, parts, unified)
        if not unified and res["gather"][label]["mode"] != "rows":
            _bandwidth(res, shape, device, big, reps, staging, parts, unified, "rows")
    res["elapsed_s"] = time.perf_counter() - t0
    return res


def _bandwidth(res: dict[str, Any], shape: tp.Shape, device: torch.device, sizes: list[int], reps: int,
               staging: int, parts: set[str], unified: bool, gather: str = "auto") -> str:
    """Save/load ratios at each size; extras (bidir, matmul, layer-wise) on the first layout only.
    Returns the case label.

    The caches come from fresh device allocations (the allocator's cache emptied first), as a
    serving engine allocates them once at start: carved from the blocks an earlier case freed,
    separate per-layer tensors would land at irregular addresses.
    """
    max_tokens = max(sizes)
    num_blocks = 2 * max_tokens // shape.block
    tp.settle()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    caches = tp.make_caches(shape, num_blocks, device, unified=unified)
    hints = {"kv_count": 1} if unified and shape.mla else None
    layout = detect_layout(caches, hints)
    label = f"{shape.name} {'unified-LBNHC' if unified else 'per-layer'}" + ("" if gather == "auto" else f"-{gather}")
    extra_tokens = min(max_tokens, res.get("extra_tokens") or (8192 if device.type == "cuda" else max_tokens))
    # room for the both-directions case too: a stored sequence and every rep's fresh one (when a
    # save has to evict, it may take chunks of the sequence the concurrent load has not pinned yet)
    engine = _engine(parts, caches, layout, max(max_tokens, (reps + 4) * extra_tokens // 2), staging, hints,
                     gather)
    # the plan this layout gets: the engine's own, else (no engine part) one built only to look
    plan = engine._reg.transfer if engine is not None else TransferEngine(
        caches, layout, chunk_tokens=CHUNK_TOKENS, staging_bytes=staging, gather=gather)
    res.setdefault("gather", {})[label] = {"mode": plan.gather_mode, "runs": [
        [r.first, r.end, r.reversed] for r in plan._strided.runs] if plan._strided is not None else None}
    if engine is None:
        plan.close()
    try:
        for tokens in sizes:
            raw = tp.raw_copy(layout.chunk_bytes(tokens), device, reps)
            case: dict[str, Any] = {"raw": raw}
            if "te" in parts:
                te = tp.transfer_engine_case(shape, tokens, caches, layout, CHUNK_TOKENS, staging, 2, reps,
                                             gather)
                case["te"] = te
                _rows(res, f"{label} {tokens} te", te, raw)
            if engine is not None and "engine" in parts:
                from kvortex_core.cli.bench.transfer_engine import engine_case

                eng = engine_case(engine, shape, tokens, layout, reps)
                case["engine"] = eng
                _rows(res, f"{label} {tokens} engine", eng, raw)
            if engine is not None and "stream" in parts and (tokens >= 8192 or device.type != "cuda"):
                from kvortex_core.cli.bench.transfer_engine import STREAM_CALLS, engine_stream

                burst = engine_stream(engine, shape, tokens, layout, reps)
                case["engine_stream"] = burst
                _rows(res, f"{label} {tokens} engine x{STREAM_CALLS}", burst, raw)
            res["cases"][f"{label}/{tokens}"] = case
        if "bidir" in parts and device.type == "cuda":
            bidir = res.setdefault("bidir", {})
            bidir[f"{label} te"] = _bidir(shape, caches, layout, extra_tokens, staging, reps, gather)
            if engine is not None:
                from kvortex_core.cli.bench.transfer_engine import engine_bidir

                bidir[f"{label} engine"] = engine_bidir(engine, shape, extra_tokens, layout, reps)
        if shape.mla or not unified or gather != "auto":
            return label
        if "sweep" in parts:
            res["sweep"] = _sweep(shape, caches, layout, extra_tokens, reps)
        if "layerwise" in parts:
            res["layerwise"] = _layerwise(shape, caches, layout, extra_tokens, staging, reps)
        if "matmul" in parts and device.type == "cuda":
            res["matmul"] = _matmul(shape, caches, layout, extra_tokens, staging)
    finally:
        if engine is not None:
            engine.close()
    return label


def _engine(parts: set[str], caches: list[torch.Tensor], layout: Any, max_tokens: int, staging: int,
            hints: dict[str, Any] | None, gather: str) -> Any:
    if not parts & {"engine", "stream"}:
        return None
    from kvortex_core.cli.bench.transfer_engine import make_engine

    return make_engine(caches, layout, max_tokens, staging, hints, gather)


def _rows(res: dict[str, Any], label: str, ours: dict[str, Any], raw: dict[str, Measurement]) -> None:
    """Ratios against the raw copies paired with ours (run back to back), else the size's raw."""
    d2h, h2d = ours.get("raw_save", raw["d2h"]), ours.get("raw_load", raw["h2d"])
    res["rows"].append(tp.summary_row(f"{label} save", ours["save"], d2h))
    if "save_sealed" in ours:
        res["rows"].append(tp.summary_row(f"{label} save+seal", ours["save_sealed"], d2h))
    res["rows"].append(tp.summary_row(f"{label} load", ours["load"], h2d))
    if "raw_pool" in ours:  # the same raw copy, into the engine's registered pinned pool
        pool = ours["raw_pool"]
        res["rows"].append(tp.summary_row(f"{label} raw-into-pool d2h", pool["d2h"], pool["raw_d2h"]))
        res["rows"].append(tp.summary_row(f"{label} raw-into-pool h2d", pool["h2d"], pool["raw_h2d"]))


def _te_pair(shape: tp.Shape, caches: list[torch.Tensor], layout: Any, tokens: int, staging: int,
             gather: str = "auto") -> Any:
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK_TOKENS, staging_bytes=staging, gather=gather)
    chunks = tp.random_chunks(layout.num_blocks, tokens, shape.block, CHUNK_TOKENS, 11)
    other = tp.random_chunks(layout.num_blocks, tokens, shape.block, CHUNK_TOKENS, 12)
    slot = layout.chunk_bytes(CHUNK_TOKENS)
    device = caches[0].device
    dst = list(tp.pinned(slot * len(chunks), device).split(slot))
    src = list(tp.pinned(slot * len(chunks), device).split(slot))
    return te, chunks, other, dst, src


def _bidir(shape: tp.Shape, caches: list[torch.Tensor], layout: Any, tokens: int, staging: int,
           reps: int, gather: str = "auto") -> dict[str, Any]:
    """Save one sequence while loading another, vs raw copies both ways at once."""
    te, chunks, other, dst, src = _te_pair(shape, caches, layout, tokens, staging, gather)
    device = caches[0].device
    nbytes = layout.chunk_bytes(tokens)

    def both() -> None:
        hs = te.save(chunks, dst)
        hl = te.load(src, other)
        hs.wait()
        hl.wait()

    ours_s, raw_s = tp.paired(both, tp.RawCopier(nbytes, device).both, device, reps, complete=True)
    return {"tokens": tokens, **tp.summary_row("both directions", Measurement("te both", ours_s, 2 * nbytes),
                                               Measurement("raw both (paired)", raw_s, 2 * nbytes))}


def _matmul(shape: tp.Shape, caches: list[torch.Tensor], layout: Any, tokens: int, staging: int) -> dict[str, Any]:
    te, chunks, other, dst, src = _te_pair(shape, caches, layout, tokens, staging)
    device = caches[0].device

    def transfers() -> None:
        hs = te.save(chunks, dst)
        hl = te.load(src, other)
        hs.wait()
        hl.wait()

    gpu = torch.empty(layout.chunk_bytes(tokens), dtype=torch.uint8, device=device)
    gpu2 = torch.empty_like(gpu)
    host, host2 = tp.pinned(gpu.numel(), device), tp.pinned(gpu.numel(), device)
    s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def raw() -> None:  # side streams, like ours: the matmul stream is never blocked by copies
        with torch.cuda.stream(s1):
            host.copy_(gpu, non_blocking=True)
        with torch.cuda.stream(s2):
            gpu2.copy_(host2, non_blocking=True)
        s1.synchronize()
        s2.synchronize()

    return {"ours": tp.matmul_slowdown(device, transfers), "raw_copy": tp.matmul_slowdown(device, raw)}


def _layerwise(shape: tp.Shape, caches: list[torch.Tensor], layout: Any, tokens: int, staging: int,
               reps: int) -> dict[str, Any]:
    """Layer-wise load with a simulated per-layer compute of about the same duration."""
    te, _, other, _, src = _te_pair(shape, caches, layout, tokens, staging)
    device = caches[0].device
    t_load = min(tp.timed(lambda: te.load(src, other, layerwise=True).wait(), device, reps))
    # a few large matmuls per layer (a real layer is ~10-20 kernels, usually CUDA-graphed), not
    # dozens of small ones whose launches alone would keep the host busier than the GPU
    n = 4096 if device.type == "cuda" else 64
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    # per-layer compute about as long as the per-layer transfer (matmuls timed in a batch of 50)
    per_mm = min(tp.timed(lambda: [a @ a for _ in range(50)], device, 3)) / 50
    per_layer = max(1, round(t_load / layout.num_layers / max(per_mm, 1e-7)))

    def compute_layer() -> None:
        for _ in range(per_layer):
            a @ a

    t_compute = min(tp.timed(lambda: [compute_layer() for _ in range(layout.num_layers)], device, reps))

    def overlapped() -> None:
        h = te.load(src, other, layerwise=True)
        for layer in range(layout.num_layers):
            h.wait_layer(layer)
            compute_layer()
        h.wait()

    t_both = min(tp.timed(overlapped, device, reps))
    hidden = (t_load + t_compute - t_both) / t_load if t_load > 0 else 0.0
    return {"tokens": tokens, "load_s": t_load, "compute_s": t_compute, "overlapped_s": t_both,
            "hidden_fraction": max(0.0, min(1.0, hidden)),
            "serial_s": t_load + t_compute, "ideal_s": max(t_load, t_compute)}


def _sweep(shape: tp.Shape, caches: list[torch.Tensor], layout: Any, tokens: int, reps: int) -> list[dict[str, Any]]:
    """Staging size and stream count against the ratio (tuning data, not a headline). Every
    ratio is the median over repetitions of ours and the raw copy run back to back."""
    device = caches[0].device
    nbytes = layout.chunk_bytes(tokens)
    rows: list[dict[str, Any]] = [_raw_pieces(nbytes, device, reps, 16 << 20)]
    for staging, streams in ((32 << 20, 1), (32 << 20, 2), (64 << 20, 2), (128 << 20, 2)):
        te = tp.transfer_engine_case(shape, tokens, caches, layout, CHUNK_TOKENS, staging, streams, reps)
        rows.append({"staging": staging, "streams": streams,
                     "save_ratio": ratio_spread(te["save"].seconds, te["raw_save"].seconds)["median"],
                     "load_ratio": ratio_spread(te["load"].seconds, te["raw_load"].seconds)["median"],
                     **te["diag"]})
    return rows


def _raw_pieces(nbytes: int, device: torch.device, reps: int, piece: int) -> dict[str, Any]:
    """The raw copy cut in ``piece``-byte DMAs on one stream, paired with the whole copy: the
    cost of splitting alone."""
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=device)
    host = tp.pinned(nbytes, device)
    pairs = list(zip(gpu.split(piece), host.split(piece), strict=True))
    raw = tp.RawCopier(nbytes, device)

    def d2h() -> None:
        for g, h in pairs:
            h.copy_(g, non_blocking=True)

    def h2d() -> None:
        for g, h in pairs:
            g.copy_(h, non_blocking=True)

    save = ratio_spread(*tp.paired(d2h, raw.d2h, device, reps))["median"]
    load = ratio_spread(*tp.paired(h2d, raw.h2d, device, reps))["median"]
    return {"raw_pieces": piece, "save_ratio": save, "load_ratio": load}
