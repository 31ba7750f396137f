"""The ``kvortex`` command: config, backends, demo, bench and stats subcommands.

Subcommand modules are small and import torch (and other heavy parts) inside their functions,
so ``kvortex --help`` stays fast. Optional command groups (bench, stats) are wired in with
guarded imports: a part that is not built yet leaves the rest of the CLI working.
"""

from __future__ import annotations

import importlib
import sys
from typing import Annotated

import typer

from kvortex_core.cli import backends_cmd, config_cmd, demo
from kvortex_core.cli.output import err_console, fail
from kvortex_core.errors import KVortexError

app = typer.Typer(
    name="kvortex",
    help="KVortex: a tiered KV-cache layer for LLM serving.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def _version(value: bool) -> None:
    if value:
        from kvortex_core import __version__

        typer.echo(f"kvortex-core {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """KVortex: a tiered KV-cache layer for LLM serving."""


def _optional(module_name: str) -> object | None:
    """Import an optional command module; absent (not built yet) -> None, broken -> warning."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        err_console.print(f"warning: {module_name} unavailable: {exc}", markup=False)
    except Exception as exc:  # noqa: BLE001 - a broken optional command must not break the CLI
        err_console.print(
            f"warning: {module_name} unavailable: {type(exc).__name__}: {exc}", markup=False
        )
    return None


def _build() -> None:
    config_cmd.register(app)
    backends_cmd.register(app)
    demo.register(app)
    bench = _optional("kvortex_core.cli.bench")
    if bench is not None:
        app.add_typer(bench.app, name="bench")  # type: ignore[attr-defined]
    stats = _optional("kvortex_core.cli.stats_cmd")
    if stats is not None:
        stats.register(app)  # type: ignore[attr-defined]


_build()


def main() -> None:
    """Console-script entry point: a KVortexError becomes a message and a non-zero exit."""
    try:
        app()
    except KVortexError as exc:  # raised outside a command body (e.g. while loading plugins)
        raise SystemExit(fail(str(exc)).exit_code) from None


if __name__ == "__main__":
    sys.exit(main())
