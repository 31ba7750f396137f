"""``kvortex bench ttft``: prefill time vs loading the same prefix's KV through KVortex.

For each prompt length: the prefill of a random-weight Llama-3.1-8B-shaped model (the raw
baseline, measured in the same run) against loading the prefix's KV from the cpu tier, and
from the disk tier, into a paged cache; the loaded KV is compared bit for bit with the computed
KV. Then the overhead on requests that miss: lookup + prefill + save against the bare prefill.
Built for a CUDA GPU; ``--tiny`` runs the same code on CPU with a toy model (smoke test).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer

from kvortex_core.cli.bench.common import (
    OutOption,
    RepsOption,
    Series,
    parse_choices,
    parse_sizes,
    plot_lines,
    print_table,
    ratio_spread,
    spread,
    write_results,
)

DEFAULT_TOKENS = "1K,2K,4K,8K,16K,32K"
#: Tiers the TTFT benchmark can load from.
TTFT_TIERS = ("cpu", "disk")


def register(app: typer.Typer) -> None:
    """Add ``kvortex bench ttft`` to the bench app."""
    app.command("ttft")(ttft_cmd)


def ttft_cmd(
    out: OutOption = Path("bench-results"),
    reps: RepsOption = 3,
    tokens: Annotated[str, typer.Option(help="prompt lengths")] = DEFAULT_TOKENS,
    layers: Annotated[int, typer.Option(min=1, help="decoder layers (Llama-3.1-8B has 32)")] = 32,
    tiers: Annotated[str, typer.Option(help="tiers to load from: cpu,disk")] = ",".join(TTFT_TIERS),
    overhead_tokens: Annotated[
        str, typer.Option(help="lengths for the miss-overhead test")
    ] = "1K,8K,32K",
    overhead_requests: Annotated[
        int, typer.Option(min=1, help="back-to-back misses per repetition")
    ] = 4,
    disk_path: Annotated[Path, typer.Option(help="directory for the disk tier")] = Path(
        "/tmp/kvortex-ttft-disk"
    ),
    drop_caches: Annotated[
        bool, typer.Option(help="drop the page cache before disk loads (root only)")
    ] = True,
    chunk_tokens: int = 256,
    tiny: Annotated[
        bool, typer.Option(help="toy model on CPU: checks the harness, not speed")
    ] = False,
) -> None:
    """TTFT: prefill vs KV load from each tier, with the loaded KV verified."""
    from kvortex_core.cli.bench.common import missing_packages

    wanted = set(parse_choices(tiers, "--tiers", TTFT_TIERS))  # the arguments first, then the packages
    if missing_packages("transformers"):  # the model is built with it
        raise typer.BadParameter("kvortex bench ttft builds its Llama-shaped model with transformers, "
                                 "which is not installed: pip install transformers", param_hint="ttft")
    import torch

    from kvortex_core.cli.bench import ttft_harness as h

    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if device.type == "cpu" and not tiny:
        typer.echo("[ttft] no CUDA device: the full model shape runs on the CPU, which takes minutes "
                   "and says nothing about GPU TTFT; --tiny checks the harness in seconds", err=True)
    shape = h.TINY if tiny else dataclasses.replace(h.LLAMA_8B, layers=layers)
    lengths = sorted(parse_sizes(tokens))
    run = TTFTRun(shape, device, chunk_tokens, reps, max(lengths + parse_sizes(overhead_tokens)))
    results: dict[str, Any] = {
        "path": run.path_name,
        "shape": shape.__dict__,
        "device": str(device),
        "lengths": {},
        "overhead": {},
    }
    try:
        for n in lengths:
            typer.echo(f"[ttft] {n} tokens", err=True)
            results["lengths"][n] = _guard(
                lambda n=n: run.measure_length(n, wanted, disk_path, drop_caches)
            )
        for n in sorted(parse_sizes(overhead_tokens)):
            typer.echo(f"[ttft] overhead at {n} tokens", err=True)
            results["overhead"][n] = _guard(lambda n=n: run.measure_overhead(n, overhead_requests))
    finally:
        run.close()
    path = write_results(out, "ttft", results)
    _report(results, out)
    typer.echo(f"results: {path}")


class TTFTRun:
    """One model, one paged cache and one cpu-tier engine shared by every measurement."""

    def __init__(
        self, shape: Any, device: Any, chunk_tokens: int, reps: int, max_tokens: int
    ) -> None:
        import torch

        from kvortex_core.cli.bench import ttft_harness as h

        self.h, self.torch = h, torch
        self.shape, self.device, self.reps, self.chunk_tokens = shape, device, reps, chunk_tokens
        self.dtype = torch.bfloat16
        self.gen = torch.Generator().manual_seed(0)
        self.model = h.build_model(shape, device, self.dtype)
        region = max_tokens // h.BLOCK_SIZE
        self.paged = h.PagedCache(shape, 2 * region, device, self.dtype)
        perm = torch.randperm(2 * region, generator=self.gen)  # shuffled, like a busy engine's
        self.src_region, self.dst_region = perm[:region].to(device), perm[region:].to(device)
        self.per_token = shape.kv_bytes_per_token(self.dtype)
        capacity = int(2.5 * max_tokens * self.per_token) + (64 << 20)
        self.tiers_cpu = {"cpu": {"type": "cpu", "capacity": capacity}}
        if h.engine_available():
            self.path: Any = h.EnginePath(self.paged.kv, self.tiers_cpu, chunk_tokens)
        else:
            self.path = h.TransferPath(self.paged.kv, capacity, chunk_tokens)
        self.path_name = self.path.name

    def _prompt(self, n: int) -> Any:
        return self.torch.randint(0, self.shape.vocab, (n,), generator=self.gen).to(self.device)

    def measure_length(
        self, n: int, tiers: set[str], disk_path: Path, drop: bool
    ) -> dict[str, Any]:
        h, dev = self.h, self.device
        ids = self._prompt(n)
        toks = ids.tolist()
        h.prefill(self.model, ids)  # warm-up: kernels, allocator
        prefill_s, cache = [], None
        for _ in range(self.reps):
            cache = None
            s, cache = h.timed(lambda: h.prefill(self.model, ids), dev)
            prefill_s.append(s)
        src, dst = self.src_region[: n // h.BLOCK_SIZE], self.dst_region[: n // h.BLOCK_SIZE]
        self.paged.write(cache, src)
        self.path.save(toks, src.tolist())
        out: dict[str, Any] = {
            "kv_bytes": n * self.per_token,
            "prefill_s": prefill_s,
            "prefill": spread(prefill_s),
        }
        if "cpu" in tiers:
            out["cpu"] = self._loads(self.path, toks, dst, cache, prefill_s)
        if "disk" in tiers:
            out["disk"] = self._disk_loads(toks, src, dst, cache, prefill_s, disk_path, drop)
        del cache
        return out

    def _loads(
        self,
        path: Any,
        toks: list[int],
        dst: Any,
        cache: Any,
        prefill_s: list[float],
        fresh: Any = None,
    ) -> dict[str, Any]:
        h, dev = self.h, self.device
        load_s, verified, loaded = [], True, 0
        dst_list = dst.tolist()  # the engine gets host lists, as vLLM passes them
        for _ in range(self.reps):
            p = fresh() if fresh is not None else path
            self.paged.poison(dst)
            s, loaded = h.timed(lambda p=p: p.load(toks, dst_list), dev)
            verified = verified and loaded == len(toks) and self.paged.equals(cache, dst)
            load_s.append(s)
            if fresh is not None:
                p.close()
        nbytes = len(toks) * self.per_token
        return {
            "load_s": load_s,
            "load": spread(load_s),
            "verified": verified,
            "loaded_tokens": loaded,
            "gbps": spread([nbytes / s / 1e9 for s in load_s]),
            "speedup": ratio_spread(load_s, prefill_s)
            | {"at_medians": _median(prefill_s) / _median(load_s)},
        }

    def _disk_loads(
        self,
        toks: list[int],
        src: Any,
        dst: Any,
        cache: Any,
        prefill_s: list[float],
        disk_path: Path,
        drop: bool,
    ) -> dict[str, Any]:
        """Each repetition opens a fresh engine on the same directory: the KV is only on disk."""
        h = self.h
        shutil.rmtree(disk_path, ignore_errors=True)
        tiers = {
            "cpu": {"type": "cpu", "capacity": int(1.25 * len(toks) * self.per_token) + (64 << 20)},
            "disk": {
                "type": "disk",
                "capacity": 32 << 30,
                "path": str(disk_path),
                "write_through": True,
            },
        }
        if not h.engine_available():
            return {"skipped": "KVortexEngine not available: the disk tier needs the tiering"}
        # Large payloads on a slow disk: give write-behind and its drain at close room to finish.
        slow = {"timeouts": {"close_s": 600, "backend_op_s": 120}}
        writer = h.EnginePath(self.paged.kv, tiers, self.chunk_tokens, **slow)
        writer.save(toks, src.tolist())
        writer.close()  # drains the write-behind to disk

        def fresh() -> Any:
            if drop:
                _drop_page_cache()
            return h.EnginePath(self.paged.kv, tiers, self.chunk_tokens, **slow)

        res = self._loads(None, toks, dst, cache, prefill_s, fresh=fresh)
        res["page_cache_dropped"] = drop and _can_drop()
        res["raw_read"] = _raw_read(disk_path, self.reps, drop)
        res["vs_raw_read"] = res["raw_read"]["median_s"] / res["load"]["median"]
        shutil.rmtree(disk_path, ignore_errors=True)
        return res

    def measure_overhead(self, n: int, k: int) -> dict[str, Any]:
        """``k`` back-to-back misses: bare prefills vs lookup + prefill + async save each.

        ``ttft``: from the first request's start to the last request's prefill done (each
        prefill ends in a sync, as sampling the first token does): what users wait for.
        ``total``: the same plus draining the last saves (throughput cost).
        """
        nb = n // self.h.BLOCK_SIZE
        regions = [self.src_region[:nb], self.dst_region[:nb]]
        lists = [r.tolist() for r in regions]
        runs: dict[str, list[dict[str, float]]] = {"base": [], "ours": []}
        self.h.prefill(self.model, self._prompt(n))
        for rep in range(self.reps):
            for mode in ("base", "ours") if rep % 2 == 0 else ("ours", "base"):
                prompts = [self._prompt(n) for _ in range(k)]
                runs[mode].append(self._misses(prompts, regions, lists, mode == "ours"))
        out: dict[str, Any] = {"requests": k, "runs": runs}
        for key in ("ttft", "total"):
            base, ours = [r[key] for r in runs["base"]], [r[key] for r in runs["ours"]]
            out[f"{key}_base"], out[f"{key}_ours"] = spread(base), spread(ours)
            out[f"{key}_overhead"] = _median(ours) / _median(base) - 1.0
            out[f"{key}_overhead_spread"] = spread(
                [o / b - 1.0 for o, b in zip(ours, base, strict=True)]
            )
        per_request = _median([r["ttft"] for r in runs["base"]]) / k
        for key in ("lookup", "submit", "reuse_wait"):
            out[f"{key}_fraction"] = _median([r[key] for r in runs["ours"]]) / k / per_request
        out["overhead_fraction"] = out["ttft_overhead"]
        return out

    def _misses(
        self, prompts: list[Any], regions: list[Any], lists: list[list[int]], ours: bool
    ) -> dict[str, float]:
        import time

        h, dev = self.h, self.device
        toks = [p.tolist() for p in prompts]  # token ids arrive as host lists
        parts = {"lookup": 0.0, "submit": 0.0, "reuse_wait": 0.0}
        pending: list[Any] = []
        h.sync(dev)
        t0 = time.perf_counter()
        for i, ids in enumerate(prompts):
            slot = i % len(regions)
            if ours:
                t = time.perf_counter()
                if i >= len(regions):  # the blocks are about to be reused: their save must be done
                    pending.pop(0).wait()
                parts["reuse_wait"] += time.perf_counter() - t
                t = time.perf_counter()
                hit = self.path.lookup(toks[i])
                parts["lookup"] += time.perf_counter() - t
                assert hit == 0, f"a fresh random prompt hit {hit} tokens"
            self.paged.write(h.prefill(self.model, ids), regions[slot])
            h.sync(dev)  # the first token is sampled here
            first = time.perf_counter()
            if ours:
                pending.append(self.path.save_async(toks[i], lists[slot]))
                parts["submit"] += time.perf_counter() - first
        ttft = first - t0
        for handle in pending:
            handle.wait()
        h.sync(dev)
        return {"ttft": ttft, "total": time.perf_counter() - t0, **parts}

    def close(self) -> None:
        self.path.close()


def _guard(fn: Any) -> dict[str, Any]:
    """One point's result, or its error: a failure at one length must not lose the others."""
    import traceback

    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - reported in the results and on stderr
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}


def _raw_read(root: Path, reps: int, drop: bool) -> dict[str, Any]:
    """Raw baseline for the disk tier: plain reads of the same files into one buffer."""
    import time

    files = [p for p in root.rglob("*") if p.is_file()]
    nbytes = sum(p.stat().st_size for p in files)
    buf = bytearray(max((p.stat().st_size for p in files), default=0))
    secs = []
    for _ in range(reps):
        if drop:
            _drop_page_cache()
        t0 = time.perf_counter()
        for p in files:
            with open(p, "rb", buffering=0) as f:
                f.readinto(buf)
        secs.append(time.perf_counter() - t0)
    return {
        "files": len(files),
        "bytes": nbytes,
        "seconds": secs,
        "median_s": _median(secs),
        "gbps": spread([nbytes / s / 1e9 for s in secs if s > 0]),
    }


def _median(xs: list[float]) -> float:
    return spread(xs)["median"]


def _can_drop() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def _drop_page_cache() -> None:
    """Make the next disk read come from the device, not from RAM (needs root)."""
    if _can_drop():
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _report(results: dict[str, Any], out: Path) -> None:
    lengths = sorted(n for n, r in results["lengths"].items() if "error" not in r)
    rows = []
    for n in lengths:
        r = results["lengths"][n]
        row: list[Any] = [n, r["prefill"]["median"] * 1e3]
        for tier in ("cpu", "disk"):
            t = r.get(tier, {})
            if "load" in t:
                row += [
                    t["load"]["median"] * 1e3,
                    t["speedup"]["median"],
                    "yes" if t["verified"] else "NO",
                ]
            else:
                row += ["-", "-", "-"]
        rows.append(row)
    print_table(
        f"TTFT: prefill vs KV load ({results['path']})",
        [
            "tokens",
            "prefill ms",
            "cpu load ms",
            "cpu speedup",
            "cpu equal",
            "disk load ms",
            "disk speedup",
            "disk equal",
        ],
        rows,
    )
    over = [
        [
            n,
            o["ttft_base"]["median"] * 1e3,
            o["ttft_ours"]["median"] * 1e3,
            f"{o['ttft_overhead']:+.2%}",
            f"{o['total_overhead']:+.2%}",
            f"{o['lookup_fraction']:.2%}",
            f"{o['submit_fraction']:.2%}",
            f"{o['reuse_wait_fraction']:.2%}",
        ]
        for n, o in sorted(results["overhead"].items())
        if "error" not in o
    ]
    if over:
        print_table(
            "miss overhead: lookup + save added to back-to-back prefills that miss",
            [
                "tokens",
                "bare ms",
                "KVortex ms",
                "TTFT overhead",
                "incl. drain",
                "lookup",
                "save submit",
                "block reuse wait",
            ],
            over,
        )
    _plots(results, lengths, out)


def _plots(results: dict[str, Any], lengths: list[int], out: Path) -> None:
    x = [float(n) for n in lengths]
    times = [
        Series(
            "prefill (raw baseline)",
            x,
            [results["lengths"][n]["prefill"]["median"] * 1e3 for n in lengths],
            [results["lengths"][n]["prefill"]["min"] * 1e3 for n in lengths],
            [results["lengths"][n]["prefill"]["max"] * 1e3 for n in lengths],
        )
    ]
    speed = []
    for tier in ("cpu", "disk"):
        have = [n for n in lengths if "load" in results["lengths"][n].get(tier, {})]
        if not have:
            continue
        t = [results["lengths"][n][tier] for n in have]
        xs = [float(n) for n in have]
        times.append(
            Series(
                f"load from {tier}",
                xs,
                [v["load"]["median"] * 1e3 for v in t],
                [v["load"]["min"] * 1e3 for v in t],
                [v["load"]["max"] * 1e3 for v in t],
            )
        )
        speed.append(
            Series(
                f"{tier} tier",
                xs,
                [v["speedup"]["median"] for v in t],
                [v["speedup"]["min"] for v in t],
                [v["speedup"]["max"] for v in t],
            )
        )
    plot_lines(
        out / "ttft_times.png",
        times,
        title="prefill vs KV load time",
        xlabel="prompt tokens",
        ylabel="ms",
        logx=True,
    )
    if speed:
        plot_lines(
            out / "ttft_speedup.png",
            speed,
            title="TTFT speedup: prefill time / load time",
            xlabel="prompt tokens",
            ylabel="speedup (x)",
            logx=True,
            hline=10.0,
        )
