"""Shared benchmark plumbing: repetitions, min/median/max, ratios, JSON + PNG results, tables.

Every ``kvortex bench X`` module uses these helpers so all figures look alike: a ratio against a
raw baseline measured in the same run, min/median/max over repetitions, the hardware named, a
JSON file and a PNG plot in ``--out``, a rich summary table on the terminal. matplotlib and torch
are imported lazily so the CLI starts fast.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.progress import Progress

# Shared options: every subcommand spells these the same way.
def missing_packages(*packages: str) -> list[str]:
    """The ``packages`` (importable names) that are not installed: what a bench needs beyond
    the core is checked before anything is measured."""
    import importlib.util

    return [p for p in packages if importlib.util.find_spec(p) is None]


def out_dir_checked(path: Path) -> Path:
    """``--out`` (or another directory option): a directory that exists or can be made,
    checked before any measurement (and made only when results are written, so a run refused
    for another argument leaves nothing behind); else a usage error."""
    import os

    if path.exists() and not path.is_dir():
        raise typer.BadParameter(f"{str(path)!r} is a file, not a directory; give a directory")
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir():
        raise typer.BadParameter(f"{str(path)!r} cannot be created ({str(existing)!r} is a file); "
                                 "give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{str(path)!r} cannot be created or written ({str(existing)!r}: "
                                 "permission denied); give a directory")
    return path


OutOption = Annotated[Path, typer.Option("--out", help="directory for the JSON results (and PNG plots, where the bench draws them)",
                                         callback=out_dir_checked)]
RepsOption = Annotated[int, typer.Option("--reps", min=1, help="timed repetitions per point")]
SizesOption = Annotated[
    str, typer.Option("--sizes", help="comma-separated sizes; K/M suffixes allowed, e.g. 1K,8K,32K")
]
QuietOption = Annotated[bool, typer.Option("--quiet", help="no progress bars")]


@dataclass
class Measurement:
    """One benchmarked quantity over repetitions (seconds per repetition)."""

    name: str
    seconds: list[float] = field(default_factory=list)
    nbytes: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    def gbps(self) -> dict[str, float]:
        """min/median/max throughput in GB/s (1e9 bytes)."""
        rates = sorted(self.nbytes / s / 1e9 for s in self.seconds if s > 0)
        if not rates:
            return {"min": 0.0, "median": 0.0, "max": 0.0}
        return {"min": rates[0], "median": statistics.median(rates), "max": rates[-1]}

    def summary(self) -> dict[str, float]:
        """min/median/max seconds."""
        return spread(self.seconds)


def spread(values: Sequence[float]) -> dict[str, float]:
    """min/median/max of ``values`` (all 0.0 when empty)."""
    if not values:
        return {"min": 0.0, "median": 0.0, "max": 0.0}
    ordered = sorted(values)
    return {"min": ordered[0], "median": statistics.median(ordered), "max": ordered[-1]}


def repeat(fn: Callable[[], Any], reps: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def ratio(ours: Measurement, raw: Measurement) -> float:
    """Throughput ratio ours/raw at the median (same bytes): 1.0 = as fast as the baseline."""
    return raw.median_s / ours.median_s if ours.median_s > 0 else 0.0


def ratio_spread(ours: Sequence[float], raw: Sequence[float]) -> dict[str, float]:
    """min/median/max of raw[i]/ours[i] over paired repetitions (speedup of ours over raw)."""
    pairs = [r / o for o, r in zip(ours, raw, strict=False) if o > 0]
    return spread(pairs)


def parse_sizes(text: str) -> list[int]:
    """``"1K,8K,32K"`` -> ``[1024, 8192, 32768]``; plain integers pass through."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        mult = units.get(part[-1].upper(), 1)
        digits = part[:-1] if mult != 1 else part
        try:
            value = int(float(digits) * mult)
        except ValueError:
            raise typer.BadParameter(f"size {part!r} is not a number; use e.g. 1K,8K,32K") from None
        if value <= 0:
            raise typer.BadParameter(f"size {part!r} must be positive")
        out.append(value)
    return out


def parse_numbers(text: str, option: str, *, lo: float = 1, hi: float | None = None,
                  integer: bool = True) -> list[Any]:
    """``"1,4,16"`` -> ``[1, 4, 16]``; a usage error (exit 2) naming ``option`` for anything else."""
    out: list[Any] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = int(part) if integer else float(part)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise typer.BadParameter(f"{part!r} is not {kind}", param_hint=option) from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo:g} and {hi:g}" if hi is not None else f">= {lo:g}"
            raise typer.BadParameter(f"{part!r} must be {bound}", param_hint=option)
        out.append(value)
    if not out:
        raise typer.BadParameter("give at least one value", param_hint=option)
    return out


def parse_choices(text: str, option: str, allowed: Sequence[str]) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each one of ``allowed``; a usage error (exit 2) otherwise."""
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in allowed]
    if bad or not out:
        raise typer.BadParameter(
            f"{', '.join(map(repr, bad)) or 'nothing'} given; choose from {','.join(allowed)}",
            param_hint=option,
        )
    return out


def hardware() -> dict[str, Any]:
    """Name the hardware the numbers came from."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "python": platform.python_version(),
    }
    try:
        import os

        info["cpu_count"] = os.cpu_count()
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001, S110 - hardware info is best effort
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_label() -> str:
    """One line naming the hardware, for plot titles and table captions."""
    hw = hardware()
    cpu = f"{hw['cpu']} x{hw.get('cpu_count', '?')}"
    return f"{hw['gpu']}, {cpu}" if hw.get("gpu") else cpu


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


def write_results(out_dir: Path, name: str, payload: dict[str, Any]) -> Path:
    """Write ``<out_dir>/<name>.json`` with the hardware attached; returns the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"benchmark": name, "hardware": hardware(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=_json_default))
    return path


@dataclass
class Series:
    """One line of a plot: x values, y values (median) and optional min/max error band."""

    label: str
    x: list[float]
    y: list[float]
    y_min: list[float] | None = None
    y_max: list[float] | None = None
    color: str | None = None
    linestyle: str = "-"


def plot_lines(
    path: Path,
    series: Sequence[Series],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    hline: float | None = None,
) -> Path | None:
    """Draw ``series`` as lines (min/max as a band) into ``path`` (PNG).

    Returns None, with no error, when matplotlib is not installed: plots are optional output.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # headless: never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for s in series:
        (line,) = ax.plot(
            s.x, s.y, marker="o", markersize=3, label=s.label, color=s.color, linestyle=s.linestyle
        )
        if s.y_min is not None and s.y_max is not None:
            ax.fill_between(s.x, s.y_min, s.y_max, alpha=0.2, color=line.get_color())
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(f"{title}\n{hardware_label()}", fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a summary table on the terminal (floats to 3 significant digits)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=hardware_label())
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    Console().print(table)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as GitHub markdown, for docs/benchmarks/*.md."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


@contextmanager
def progress(quiet: bool = False) -> Iterator[Progress]:
    """A rich progress bar for long runs (disabled with ``quiet`` or when not a terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=quiet,
        transient=True,
    )
    with bar:
        yield bar


def to_mapping(obj: Any) -> Mapping[str, Any]:
    """A dataclass or mapping as a plain dict (for JSON results)."""
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return dict(obj)
