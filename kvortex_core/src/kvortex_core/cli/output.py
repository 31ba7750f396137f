"""Shared CLI plumbing: rich consoles, human sizes, and turning KVortex errors into exit codes."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from kvortex_core.errors import ConfigError, KVortexError

P = ParamSpec("P")
R = TypeVar("R")

#: Exit status of a command that failed because of the configuration or a plugin.
EXIT_CONFIG = 2
#: Exit status of a command whose work failed (e.g. the demo's bytes differ).
EXIT_FAILED = 1

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def human_bytes(n: float) -> str:
    """``4294967296`` -> ``4 GiB``; ``1536`` -> ``1.5 KiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fail(message: str, code: int = EXIT_CONFIG) -> typer.Exit:
    """Print ``message`` on stderr and return the ``typer.Exit`` to raise."""
    err_console.print(message, markup=False, soft_wrap=True)
    return typer.Exit(code)


def exits_on_error(fn: Callable[P, R]) -> Callable[P, R]:
    """Make a command print a KVortexError's message and exit non-zero, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            raise fail(str(exc), EXIT_CONFIG) from None
        except KVortexError as exc:
            raise fail(f"error: {exc}", EXIT_CONFIG) from None

    return wrapper


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``["tiers.hot.capacity=1GiB", "chunk_tokens=512"]`` -> nested keyword arguments.

    Values are parsed as YAML scalars (``512`` is an int, ``true`` a bool), like the file.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        path, sep, raw = item.partition("=")
        if not sep or not path.strip():
            raise ConfigError(f"--set {item!r}: expected PATH=VALUE, e.g. --set chunk_tokens=512")
        node = out
        keys = path.strip().split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {key!r} was already given a value")
        try:
            node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            node[keys[-1]] = raw
    return out
