"""``kvortex backends list``: every registered backend, its package, and its dependencies."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from kvortex_core.cli.output import console, exits_on_error

app = typer.Typer(
    help="Storage backends registered through the `kvortex` entry points.", no_args_is_help=True
)


def backend_rows() -> list[dict[str, Any]]:
    """One row per registered backend: name, class, plugin, distribution, version, deps."""
    from kvortex_core.plugins import PluginManager

    rows = []
    for name, info in sorted(PluginManager().backends().items()):
        missing = info.missing_dependencies()
        rows.append(
            {
                "name": name,
                "class": info.qualname,
                "plugin": info.plugin,
                "distribution": info.distribution,
                "version": info.version,
                "requires": list(getattr(info.cls, "requires", ())),
                "missing": missing,
                "dependencies_installed": not missing,
                "install_hint": getattr(info.cls, "install_hint", None) if missing else None,
                "shared": bool(getattr(info.cls, "shared", False)),
            }
        )
    return rows


@app.command("list")
@exits_on_error
def list_backends(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List every registered backend with its distribution, version and dependency status."""
    rows = backend_rows()
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="KVortex storage backends", title_justify="left")
    for column in ("backend", "distribution", "version", "class", "dependencies"):
        table.add_column(column, overflow="fold")
    for row in rows:
        deps = _deps_cell(row)
        table.add_row(
            escape(row["name"]),
            escape(row["distribution"] or "(registered in code)"),
            escape(row["version"] or "-"),
            escape(row["class"]),
            deps,
        )
    console.print(table)
    if not rows:
        console.print(
            "no backends registered: install kvortex-backends (pip install kvortex-backends)"
        )


def _deps_cell(row: dict[str, Any]) -> str:
    if not row["requires"]:
        return "[green]none needed[/green]"
    if row["dependencies_installed"]:
        return "[green]installed[/green]"
    missing = escape(", ".join(row["missing"]))
    return f"[red]missing {missing}[/red]: {escape(row['install_hint'] or '')}"


def register(root: typer.Typer) -> None:
    """Add ``kvortex backends ...`` to the root app."""
    root.add_typer(app, name="backends")
