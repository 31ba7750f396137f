"""``kvortex config show`` and ``kvortex config validate FILE``."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ByteSize
from rich.table import Table

from kvortex_core.cli.output import console, exits_on_error, human_bytes, parse_assignments
from kvortex_core.config.messages import masked

app = typer.Typer(
    help="Show where each setting comes from, or check a YAML file.", no_args_is_help=True
)

FileOption = Annotated[
    Path | None,
    typer.Option("--file", "-f", help="YAML config file (default: $KVORTEX_CONFIG_FILE)."),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a value like a keyword argument: PATH=VALUE."),
]


def _masked(path: str, value: Any) -> Any:
    """Credentials (redis password, S3 secret, a URL's password) are never printed."""
    return masked(path.rsplit(".", 1)[-1], value)


def _shown(value: Any) -> str:
    if isinstance(value, ByteSize):
        return human_bytes(int(value))
    if value is None:
        return "null"
    return json.dumps(value) if isinstance(value, str | bool | dict | list) else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, ByteSize):
        return {"bytes": int(value), "human": human_bytes(int(value))}
    return value


@app.command("show")
@exits_on_error
def show(
    file: FileOption = None,
    assignments: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Print the effective configuration and, for each value, where it came from."""
    from kvortex_core.config import KVortexConfig
    from kvortex_core.config.provenance import provenance

    config = KVortexConfig.load(file, **parse_assignments(assignments))
    rows = {path: (_masked(path, v), src) for path, (v, src) in provenance(config).items()}
    if as_json:
        data = {
            path: {"value": _jsonable(v), "source": str(src)} for path, (v, src) in rows.items()
        }
        console.print_json(json.dumps(data))
        return
    title = f"KVortex configuration (file: {config.source_file or 'none'})"
    table = Table(title=title, title_justify="left")
    table.add_column("setting", style="bold", overflow="fold")
    table.add_column("value", overflow="fold")
    table.add_column("source", style="cyan", overflow="fold")
    for path, (value, source) in rows.items():
        table.add_row(
            path, _shown(value), str(source), style="dim" if source.kind == "default" else None
        )
    console.print(table)


@app.command("validate")
@exits_on_error
def validate(
    file: Annotated[Path, typer.Argument(help="The YAML file to check.")],
    isolated: Annotated[
        bool, typer.Option("--isolated", help="Ignore KVORTEX_* environment variables.")
    ] = False,
) -> None:
    """Check a YAML file (with the environment on top, as at run time); exit 0 when valid."""
    from kvortex_core.config import KVortexConfig

    with _without_env() if isolated else contextlib.nullcontext():
        config = KVortexConfig.load(file)
    tiers = ", ".join(
        f"{name} ({tc.type}, {human_bytes(int(tc.capacity))})" for name, tc in config.tiers.items()
    )
    console.print(f"[green]valid[/green]: {file}")
    console.print(
        f"  chunk_tokens={config.chunk_tokens}, hash={config.hash_algorithm}, "
        f"eviction={config.eviction.policy}",
        markup=False,
    )
    console.print(f"  tiers: {tiers}", markup=False)
    from kvortex_core.config.backends import backend_options
    from kvortex_core.data.pool import physical_memory
    from kvortex_core.plugins.manager import PluginManager

    manager = PluginManager()
    for name in config.tiers:  # files and devices the tier needs that this machine lacks
        for note in backend_options(config, name, manager).machine_notes():
            console.print(f"  note: tiers.{name}: {note} (an engine here cannot open this tier)", markup=False)
    cpu = next(iter(config.tiers.values()))
    ram = physical_memory()
    if ram and int(cpu.capacity) > ram:  # valid as a file; an engine on this machine refuses it
        console.print(f"  note: the cpu tier asks for {human_bytes(int(cpu.capacity))} per node, more than this "
                      f"machine's {human_bytes(ram)} of memory: engines here cannot start with it (lower "
                      "tiers.cpu.capacity, or validate on the machine that will serve)", markup=False)


@contextlib.contextmanager
def _without_env() -> Iterator[None]:
    """Temporarily hide ``KVORTEX_*`` configuration variables (the switches stay)."""
    from kvortex_core.config.settings import ENV_PREFIX, RESERVED_ENV

    saved = {
        k: v
        for k, v in os.environ.items()
        if k.upper().startswith(ENV_PREFIX) and k.upper() not in RESERVED_ENV
    }
    for k in saved:
        del os.environ[k]
    try:
        yield
    finally:
        os.environ.update(saved)


def register(root: typer.Typer) -> None:
    """Add ``kvortex config ...`` to the root app."""
    root.add_typer(app, name="config")
