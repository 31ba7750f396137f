"""``kvortex bench transfer``: KV save/load bandwidth as a ratio of raw pinned copies.

Runs on CUDA when present (the real measurement) and on CPU with small sizes (a smoke
test of the same code). Results go to ``<out>/transfer.json`` plus a summary table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from kvortex_core.cli.bench.common import OutOption


def register(app: typer.Typer) -> None:
    app.command("transfer")(transfer)


def transfer(
    tokens: Annotated[str, typer.Option(help="comma-separated token counts")] = "1024,2048,4096,8192,16384,32768",
    reps: Annotated[int, typer.Option(min=1, help="timed repetitions per case")] = 5,
    out: OutOption = Path("bench-results"),
    mla_layers: Annotated[int, typer.Option(min=1, help="layers of the MLA shape")] = 61,
    staging: Annotated[str, typer.Option(help="staging bytes per direction")] = "64MiB",
    parts: Annotated[str, typer.Option(help="comma list: verify,te,engine,stream,bidir,matmul,layerwise,sweep")] =
        "verify,te,engine,stream,bidir,matmul,layerwise,sweep",
    device: Annotated[str, typer.Option(help="cuda, cpu or auto")] = "auto",
    extra_tokens: Annotated[int | None, typer.Option(
        min=256, help="tokens of the bidir, matmul, layerwise and sweep cases (a multiple of 256; default 8192 on "
                      "CUDA), at most the largest --tokens")] = None,
) -> None:
    """Measure save/load GB/s through the transfer engine and KVortexEngine vs raw pinned copies."""
    import torch
    from pydantic import ByteSize, TypeAdapter

    from kvortex_core.cli.bench.common import parse_choices, parse_numbers, write_results
    from kvortex_core.cli.bench.transfer_run import run_all

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"{device!r} is not cuda, cpu or auto", param_hint="--device")
    if device == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter("no CUDA device here (this torch sees none); use --device cpu or auto",
                                 param_hint="--device")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    sizes = parse_numbers(tokens, "--tokens")
    try:
        staging_bytes = int(TypeAdapter(ByteSize).validate_python(staging))
    except ValueError:
        raise typer.BadParameter(f"{staging!r} is not a size; use e.g. 64MiB", param_hint="--staging") from None
    if staging_bytes <= 0:
        raise typer.BadParameter(f"{staging!r} must be positive, e.g. 64MiB", param_hint="--staging")
    chosen = parse_choices(parts, "--parts", ("verify", "te", "engine", "stream", "bidir", "matmul", "layerwise",
                                                     "sweep"))
    if extra_tokens is not None and (extra_tokens % 256 or extra_tokens > max(sizes)):
        raise typer.BadParameter(f"{extra_tokens} must be a multiple of 256 and at most the largest --tokens "
                                 f"({max(sizes)}), e.g. 8192", param_hint="--extra-tokens")
    results: dict[str, Any] = run_all(
        dev, sizes, reps=reps, mla_layers=mla_layers, staging=staging_bytes, parts=set(chosen),
        extra_tokens=extra_tokens)
    path = write_results(out, "transfer", results)
    _print_table(results)
    typer.echo(f"results: {path}")


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kvortex bench transfer ({results.get('device_name', '?')})")
    for col in ("case", "MiB", "ours GB/s", "raw GB/s", "ratio"):
        table.add_column(col, justify="right" if col != "case" else "left")
    for row in results.get("rows", []):
        table.add_row(row["case"], f"{row['bytes'] / 2**20:.0f}", f"{row['ours_gbps']:.1f}",
                      f"{row['raw_gbps']:.1f}", f"{row['ratio']:.3f}")
    console = Console(width=120)
    console.print(table)
    for key in ("bidir", "matmul", "layerwise", "sweep", "verify"):
        if key in results:
            console.print(f"{key}: {results[key]}", markup=False)
