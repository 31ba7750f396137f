"""``kvortex bench``: one entry point, one module per subcommand (imported lazily)."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks: every figure is a ratio against a raw baseline of the same run.",
                  no_args_is_help=True)


def _register() -> None:
    import importlib

    for name in ("core", "transfer", "backends", "disk", "simulate", "ttft"):
        try:
            module = importlib.import_module(f"kvortex_core.cli.bench.{name}")
        except ModuleNotFoundError as exc:  # subcommand not built yet
            if exc.name != f"kvortex_core.cli.bench.{name}":
                raise
            continue
        module.register(app)


_register()
