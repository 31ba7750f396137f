"""``kvortex bench backends``: put/get throughput of the redis and s3 tiers vs their raw clients.

Every figure is the median over ``--reps`` of our backend divided by the raw client measured
on the same server in the same run (goals: redis >= 0.80, s3 >= 0.90). The disk tier's own
bench (``bench_disk`` in cli/bench/disk.py) runs too when it exists. Results:
``<out>/backends.json``, ``<out>/backends.md`` (markdown tables) and one PNG per target.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from kvortex_core.cli.bench.common import (
    OutOption,
    QuietOption,
    RepsOption,
    Series,
    SizesOption,
    markdown_table,
    missing_packages,
    parse_choices,
    parse_numbers,
    parse_sizes,
    plot_lines,
    print_table,
    write_results,
)
from kvortex_core.cli.output import exits_on_error
from kvortex_core.errors import KVortexError

if TYPE_CHECKING:
    from kvortex_core.cli.bench.backends_run import Point

GOALS = {"redis": 0.80, "s3": 0.90}
COLUMNS = ("target", "op", "MiB", "conc", "ours GB/s", "raw GB/s", "ratio", "goal",
           "vs raw+copy")


def register(app: typer.Typer) -> None:
    """Add ``kvortex bench backends`` to the bench app."""
    app.command("backends")(backends_cmd)


@exits_on_error
def backends_cmd(
    sizes: SizesOption = "1M,8M,32M",
    reps: RepsOption = 3,
    concurrency: Annotated[str, typer.Option(help="comma-separated concurrent operations")] = "1,4,16",
    out: OutOption = Path("bench-results"),
    redis_url: Annotated[str | None, typer.Option(help="redis server to use; default: start one")] = None,
    s3_endpoint: Annotated[str | None, typer.Option(help="S3 endpoint to use; default: start moto")] = None,
    targets: Annotated[str, typer.Option(help="comma-separated: redis,s3,disk")] = "redis,s3,disk",
    part_bytes: Annotated[str, typer.Option(help="also measure redis MULTI parts of this size, e.g. 4M; 0 = skip")] = "0",
    quiet: QuietOption = False,
) -> None:
    """Measure put/get GB/s of the shared tiers against raw redis-py / boto3 on the same server."""
    size_list = parse_sizes(sizes)
    concs = parse_numbers(concurrency, "--concurrency")
    wanted = set(parse_choices(targets, "--targets", ("redis", "s3", "disk")))
    _check_packages(wanted, s3_endpoint)
    _check_urls(wanted, redis_url, s3_endpoint)
    parts = parse_sizes(part_bytes)[0] if part_bytes.strip() not in ("", "0") else None
    t0 = time.perf_counter()
    points: list[Point] = []
    if "redis" in wanted:
        points += _run_redis(redis_url, size_list, concs, reps, parts, quiet)
    if "s3" in wanted:
        points += _run_s3(s3_endpoint, size_list, concs, reps, quiet)
    disk = _run_disk(size_list, concs, reps, out) if "disk" in wanted else None
    params = {"sizes": size_list, "concurrency": concs, "reps": reps, "part_bytes": parts,
              "redis_url": _redacted(redis_url), "s3_endpoint": s3_endpoint,
              "seconds": time.perf_counter() - t0}
    rows = [_row(p) for p in points] + _disk_rows(disk)
    path = write_results(out, "backends", {"params": params, "rows": [_json_row(p) for p in points],
                                           "disk": disk})
    (out / "backends.md").write_text(markdown_table(COLUMNS, rows) + "\n")
    _plots(points, out)
    print_table("kvortex bench backends (median over reps; ratio = ours / raw)", COLUMNS, rows)
    typer.echo(f"results: {path} ({params['seconds']:.0f} s)")


def _check_packages(wanted: set[str], s3_endpoint: str | None) -> None:
    """A usage error before any measurement when a target's client (or moto) is missing."""
    needs = {"redis": [("redis", "pip install 'kvortex[redis]'")],
             "s3": [("boto3", "pip install 'kvortex[s3]'")]
             + ([] if s3_endpoint else [("moto", "pip install 'moto[server]', or pass --s3-endpoint")])}
    missing = [f"{target} needs the {pkg} package ({hint})" for target in sorted(wanted)
               for pkg, hint in needs.get(target, []) if missing_packages(pkg)]
    if missing:
        raise typer.BadParameter("; ".join(missing) + "; or leave the target out of --targets",
                                 param_hint="--targets")


def _check_urls(wanted: set[str], redis_url: str | None, s3_endpoint: str | None) -> None:
    """A usage error before any measurement for a URL the tier itself would refuse."""
    if "redis" in wanted and redis_url:
        from pydantic import ValidationError

        from kvortex_backends.redis import RedisOptions

        try:
            RedisOptions(url=redis_url)
        except ValidationError as exc:
            reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise typer.BadParameter(f"{_redacted(redis_url)!r}: {reason}", param_hint="--redis-url") from None
    if "s3" in wanted and s3_endpoint and not s3_endpoint.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{s3_endpoint!r} is not an http(s) URL; pass e.g. http://127.0.0.1:5000",
                                 param_hint="--s3-endpoint")
    if "s3" in wanted and s3_endpoint and not missing_packages("boto3"):
        import boto3

        if boto3.Session().get_credentials() is None:  # found out only after redis had run
            raise typer.BadParameter(
                "no AWS credentials for the endpoint; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(any values for moto) or AWS_PROFILE", param_hint="--s3-endpoint")


def _redacted(url: str | None) -> str | None:
    return url.split("@")[-1] if url else url


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        typer.echo(text, err=True)


def _run_redis(url: str | None, sizes: list[int], concs: list[int], reps: int,
               parts: int | None, quiet: bool) -> list[Point]:
    from kvortex_core.cli.bench.backends_run import bench_redis, local_redis

    with contextlib.ExitStack() as stack:
        url = url or stack.enter_context(local_redis())
        _say(quiet, f"redis: {_redacted(url)}")
        return bench_redis(url, sizes, concs, reps, parts)


def _run_s3(endpoint: str | None, sizes: list[int], concs: list[int], reps: int,
            quiet: bool) -> list[Point]:
    from kvortex_core.cli.bench.backends_run import bench_s3, local_moto

    with contextlib.ExitStack() as stack:
        if endpoint is None:
            endpoint = stack.enter_context(local_moto())
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")  # moto accepts any credentials
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
        _say(quiet, f"s3: {endpoint}")
        try:
            return bench_s3(endpoint, sizes, concs, reps)
        except Exception as exc:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, BotoCoreError | ClientError):  # credentials, endpoint, bucket rights
                raise KVortexError(f"s3 bench against {endpoint} failed: {exc}; check the endpoint "
                                   "and the AWS credentials (AWS_ACCESS_KEY_ID, ...)") from None
            raise


def _run_disk(sizes: list[int], concs: list[int], reps: int, out: Path) -> Any:
    """The disk tier's numbers from its own bench (no variants: ``kvortex bench disk`` has them)."""
    try:
        from kvortex_core.cli.bench.disk import bench_disk
    except ImportError:  # the disk bench is not installed in this build
        return None
    return bench_disk(sizes=sizes, concurrency=concs, reps=reps, out=out, variants=False, quiet=True)


def _disk_rows(disk: Any) -> list[list[Any]]:
    rows = []
    for r in (disk or {}).get("rows", []):
        goal = 0.80
        rows.append([f"disk {r['variant']}", r["op"], r["size"] / 2**20, r["concurrency"],
                     r["ours_gbps"], r["raw_gbps"], r["ratio"],
                     "ok" if r["ratio"] >= goal else f"< {goal:.2f}", ""])
    return rows


def _goal(p: Point) -> float:
    return GOALS["redis" if p.target.startswith("redis") else p.target]


def _row(p: Point) -> list[Any]:
    vs_copy = p.ratio_vs_copy
    return [p.target, p.op, p.size / 2**20, p.concurrency, p.gbps("ours"), p.gbps("raw"),
            p.ratio, "ok" if p.ratio >= _goal(p) else f"< {_goal(p):.2f}",
            "" if vs_copy is None else vs_copy]


def _json_row(p: Point) -> dict[str, Any]:
    return {"target": p.target, "op": p.op, "size": p.size, "concurrency": p.concurrency,
            "ours_s": p.ours, "raw_s": p.raw, "raw_copy_s": p.raw_copy, "ours_gbps": p.gbps("ours"),
            "raw_gbps": p.gbps("raw"), "ratio": p.ratio, "ratio_vs_raw_copy": p.ratio_vs_copy,
            "raw_shape": p.raw_shape, "goal": _goal(p)}


def _plots(points: list[Point], out: Path) -> None:
    for target in sorted({p.target for p in points}):
        series = []
        for op in ("put", "get"):
            for conc in sorted({p.concurrency for p in points}):
                sel = sorted((p for p in points if (p.target, p.op, p.concurrency) == (target, op, conc)),
                             key=lambda p: p.size)
                if sel:
                    series.append(Series(f"{op} x{conc}", [p.size / 2**20 for p in sel],
                                         [p.ratio for p in sel], linestyle="-" if op == "put" else "--"))
        name = target.replace(" ", "-")
        plot_lines(out / f"backends-{name}.png", series, title=f"{target}: ours / raw throughput",
                   xlabel="payload MiB", ylabel="ratio", logx=True,
                   hline=GOALS["redis" if target.startswith("redis") else target])
