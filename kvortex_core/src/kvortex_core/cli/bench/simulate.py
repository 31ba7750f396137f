"""``kvortex bench simulate``: token hit rate per eviction policy vs capacity (CPU only).

Each workload is generated with ``--reps`` seeds (or loaded once from ``--trace``), hashed by
the real ChunkHasher and replayed through the real ChunkIndex of every tier. Every figure is a
min/median/max over the seeds; the raw baseline is an unbounded cache on the same trace
(``ideal``), so ``hit rate / ideal`` says how much of the reachable reuse a policy keeps.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from kvortex_core.cli.bench.common import (
    OutOption,
    QuietOption,
    RepsOption,
    Series,
    markdown_table,
    parse_numbers,
    plot_lines,
    print_table,
    progress,
    spread,
    write_results,
)

DEFAULT_FRACTIONS = "0.05,0.1,0.2,0.3,0.4,0.5,0.6,0.8,1.0"
DEFAULT_POLICIES = "lru,prefix-lru,s3fifo"


def register(app: typer.Typer) -> None:
    """Add ``kvortex bench simulate`` to the bench app."""
    app.command("simulate")(simulate_cmd)


def simulate_cmd(
    out: OutOption = Path("bench-results"),
    reps: RepsOption = 3,
    quiet: QuietOption = False,
    workloads: Annotated[
        str, typer.Option(help="comma-separated: chat,docqa,zipf")
    ] = "chat,docqa,zipf",
    trace: Annotated[
        Path | None,
        typer.Option(help="JSONL trace (token ids or hash_ids) instead of synthetic workloads"),
    ] = None,
    block_tokens: Annotated[
        int, typer.Option(min=1, help="tokens per hash id in a block-hash trace")
    ] = 512,
    policies: Annotated[str, typer.Option(help="eviction policies to compare")] = DEFAULT_POLICIES,
    fractions: Annotated[
        str, typer.Option(help="first-tier capacities as fractions of the working set")
    ] = DEFAULT_FRACTIONS,
    chunk_tokens: Annotated[int, typer.Option(min=1)] = 256,
    disk_factor: Annotated[
        float, typer.Option(min=0.0, help="disk tier size as a multiple of the cpu tier; 0 = cpu only")
    ] = 4.0,
    seed: int = 0,
    high_watermark: Annotated[float, typer.Option(min=0.01, max=1.0)] = 1.0,
    evict_ratio: Annotated[float, typer.Option(min=0.001, max=1.0)] = 0.05,
    write_through: Annotated[
        bool, typer.Option(help="write every chunk to lower tiers at once instead of on eviction")
    ] = False,
) -> None:
    """Replay chat, document-QA and Zipf workloads through every eviction policy."""
    pols = [p.strip() for p in policies.split(",") if p.strip()]
    fracs = sorted(parse_numbers(fractions, "--fractions", lo=0.0001, hi=1.0, integer=False))
    lower = [("disk", disk_factor)] if disk_factor > 0 else []
    sources = _sources(workloads, trace, block_tokens, reps, seed)
    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    with progress(quiet) as bar:
        task = bar.add_task("simulating", total=sum(len(s) for s in sources.values()))
        for name, loaders in sources.items():
            runs = []
            for load in loaders:
                runs.append(
                    _one_trace(
                        load(),
                        pols,
                        fracs,
                        lower,
                        chunk_tokens,
                        high_watermark,
                        evict_ratio,
                        write_through,
                    )
                )
                bar.advance(task)
            results[name] = _aggregate(runs, pols, fracs)
    elapsed = time.perf_counter() - t0
    params = {
        "policies": pols,
        "fractions": fracs,
        "chunk_tokens": chunk_tokens,
        "disk_factor": disk_factor,
        "reps": reps,
        "seed": seed,
        "high_watermark": high_watermark,
        "evict_ratio": evict_ratio,
        "write_through": write_through,
        "trace": str(trace) if trace else None,
        "seconds": elapsed,
    }
    path = write_results(out, "simulate", {"params": params, "workloads": results})
    _report(results, pols, out)
    typer.echo(f"results: {path} ({elapsed:.1f} s)")


def _sources(
    workloads: str, trace: Path | None, block_tokens: int, reps: int, seed: int
) -> dict[str, list[Any]]:
    from kvortex_core.sim.loader import load_jsonl
    from kvortex_core.sim.trace import WORKLOADS

    if trace is not None:
        return {trace.stem: [lambda: load_jsonl(trace, block_tokens=block_tokens)]}
    out: dict[str, list[Any]] = {}
    for name in (w.strip() for w in workloads.split(",") if w.strip()):
        if name not in WORKLOADS:
            raise typer.BadParameter(
                f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}"
            )
        gen = WORKLOADS[name]
        out[name] = [lambda s=seed + r, g=gen: g(s) for r in range(reps)]
    return out


def _one_trace(
    requests: list[Any],
    pols: list[str],
    fracs: list[float],
    lower: list[tuple[str, float]],
    chunk_tokens: int,
    hw: float,
    ratio: float,
    write_through: bool,
) -> dict[str, Any]:
    from kvortex_core.sim.simulator import ideal_hit_rate, prepare, sweep

    trace = prepare(requests, chunk_tokens=chunk_tokens)
    runs = sweep(
        trace,
        policies=pols,
        fractions=fracs,
        lower_tiers=lower,
        high_watermark=hw,
        evict_ratio=ratio,
        write_through=write_through,
    )
    return {
        "ideal": ideal_hit_rate(trace),
        "requests": len(requests),
        "tokens": trace.total_tokens,
        "unique_chunks": trace.unique_chunks,
        "working_set_bytes": trace.working_set_bytes,
        "runs": [r.to_dict() | {"cpu_hit_rate": r.tier_hit_rate("cpu")} for r in runs],
    }


def _aggregate(traces: list[dict[str, Any]], pols: list[str], fracs: list[float]) -> dict[str, Any]:
    """min/median/max over seeds of every per-(policy, fraction) figure."""
    curves: dict[str, list[dict[str, Any]]] = {p: [] for p in pols}
    for frac in fracs:
        for pol in pols:
            rows = [
                r
                for t in traces
                for r in t["runs"]
                if r["policy"] == pol and r["capacity_fraction"] == frac
            ]
            point: dict[str, Any] = {"capacity_fraction": frac}
            point["hit_rate"] = spread([r["token_hit_rate"] for r in rows])
            point["cpu_hit_rate"] = spread([r["cpu_hit_rate"] for r in rows])
            point["vs_ideal"] = spread(
                [
                    r["token_hit_rate"] / t["ideal"] if t["ideal"] else 0.0
                    for t in traces
                    for r in t["runs"]
                    if r["policy"] == pol and r["capacity_fraction"] == frac
                ]
            )
            for key in ("bytes_read", "bytes_written", "evictions"):
                point[key] = {
                    tier["name"]: statistics.median(
                        [
                            next(x[key] for x in r["tiers"] if x["name"] == tier["name"])
                            for r in rows
                        ]
                    )
                    for tier in rows[0]["tiers"]
                }
            curves[pol].append(point)
    return {
        "ideal": spread([t["ideal"] for t in traces]),
        "requests": statistics.median(t["requests"] for t in traces),
        "tokens": statistics.median(t["tokens"] for t in traces),
        "working_set_bytes": statistics.median(t["working_set_bytes"] for t in traces),
        "curves": curves,
        "prefix_lru_vs_lru": _gain(curves),
    }


def _gain(curves: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """prefix-lru minus lru (hit-rate points), cpu tier and all tiers, per capacity."""
    if "lru" not in curves or "prefix-lru" not in curves:
        return None
    out: dict[str, Any] = {"cpu": [], "total": []}
    for a, b in zip(curves["prefix-lru"], curves["lru"], strict=True):
        out["cpu"].append(a["cpu_hit_rate"]["median"] - b["cpu_hit_rate"]["median"])
        out["total"].append(a["hit_rate"]["median"] - b["hit_rate"]["median"])
    out["min_cpu"], out["max_cpu"] = min(out["cpu"]), max(out["cpu"])
    out["min_total"], out["max_total"] = min(out["total"]), max(out["total"])
    return out


def _report(results: dict[str, Any], pols: list[str], out: Path) -> None:
    columns = ["cap %"] + [f"{p} cpu/all" for p in pols] + ["prefix-lru - lru"]
    md = []
    for name, res in results.items():
        _plot(name, res, pols, out)
        rows = []
        for i, point in enumerate(res["curves"][pols[0]]):
            row: list[Any] = [round(point["capacity_fraction"] * 100)]
            for p in pols:
                q = res["curves"][p][i]
                row.append(f"{q['cpu_hit_rate']['median']:.3f}/{q['hit_rate']['median']:.3f}")
            gain = res["prefix_lru_vs_lru"]
            row.append(f"{gain['cpu'][i]:+.3f}/{gain['total'][i]:+.3f}" if gain else "-")
            rows.append(row)
        title = f"{name}: token hit rate, cpu tier / all tiers (ideal {res['ideal']['median']:.3f})"
        print_table(title, columns, rows)
        md.append(f"### {title}\n\n" + markdown_table(columns, rows) + "\n")
    (out / "simulate.md").write_text("\n".join(md))
    for name, res in results.items():
        gain = res["prefix_lru_vs_lru"]
        if gain:
            typer.echo(
                f"{name}: prefix-lru - lru, cpu tier: {gain['min_cpu']:+.3f} .. {gain['max_cpu']:+.3f};"
                f" all tiers: {gain['min_total']:+.3f} .. {gain['max_total']:+.3f}"
            )


def _plot(name: str, res: dict[str, Any], pols: list[str], out: Path) -> None:
    series = []
    for n, pol in enumerate(pols):
        pts = res["curves"][pol]
        x = [p["capacity_fraction"] * 100 for p in pts]
        for key, tag, style in (("cpu_hit_rate", "cpu tier", "-"), ("hit_rate", "all tiers", "--")):
            series.append(
                Series(
                    f"{pol} ({tag})",
                    x,
                    [p[key]["median"] for p in pts],
                    [p[key]["min"] for p in pts],
                    [p[key]["max"] for p in pts],
                    color=f"C{n}",
                    linestyle=style,
                )
            )
    plot_lines(
        out / f"simulate_{name}.png",
        series,
        title=f"token hit rate: {name}",
        xlabel="cpu tier capacity, % of working set",
        ylabel="token hit rate",
        hline=res["ideal"]["median"],
    )
    _plot_bytes(name, res, pols, out)


def _plot_bytes(name: str, res: dict[str, Any], pols: list[str], out: Path) -> None:
    """Bytes moved per tier (medians over seeds) against capacity, one colour per policy."""
    series = []
    kinds = (
        ("bytes_read", "cpu", "read from cpu", "-"),
        ("bytes_read", "disk", "read from disk", "--"),
        ("bytes_written", "disk", "written to disk", ":"),
    )
    for n, pol in enumerate(pols):
        pts = res["curves"][pol]
        x = [p["capacity_fraction"] * 100 for p in pts]
        for key, tier, tag, style in kinds:
            if tier not in pts[0][key]:
                continue
            y = [p[key][tier] / 2**30 for p in pts]
            series.append(Series(f"{pol}: {tag}", x, y, color=f"C{n}", linestyle=style))
    plot_lines(
        out / f"simulate_{name}_bytes.png",
        series,
        title=f"bytes moved per tier: {name}",
        xlabel="cpu tier capacity, % of working set",
        ylabel="GiB over the trace",
    )
