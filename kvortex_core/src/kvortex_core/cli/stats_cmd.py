"""``kvortex stats``: a live table of a running instance's Prometheus metrics.

Reads ``--url`` (else ``http://metrics.host:metrics.port/metrics`` from the configuration),
parses the text exposition format with prometheus_client's parser and shows the hit rate and,
per tier, usage against capacity, bytes saved and loaded (with rates between refreshes),
evictions, errors and the circuit breaker's state. ``--once`` prints one table and exits.
Pinned-pool allocation failures are pool pressure, not errors: they are counted apart.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer

PREFIX = "kvortex_"
#: ``breaker_state`` gauge values, as the tiering records them.
BREAKER_STATES = {0: "closed", 1: "open", 2: "half-open"}
#: Several processes' breakers of one tier (a multiprocess scrape: one sample per pid) show as
#: the least available: open before half-open before closed.
_BREAKER_RANK = {"open": 2, "half-open": 1, "closed": 0}
_ERROR_WORDS = ("error", "failure", "timeout")
#: Counted apart from errors: the pinned pool was full for a moment (pressure, not a fault).
_PRESSURE = "alloc_failures"
#: Table columns: header (two short lines at most, so an 80-column terminal shows them whole).
_COLUMNS = (
    "tier",
    "used",
    "capacity",
    "use %",
    "chunks",
    "saved",
    "loaded",
    "save\nMB/s",
    "load\nMB/s",
    "evicted",
    "errors",
    "breaker",
)
_SUMMED = {
    "bytes_saved": "bytes_saved",
    "tier_bytes_written": "bytes_saved",
    "bytes_loaded": "bytes_loaded",
    "tier_bytes_read": "bytes_loaded",
}


@dataclass
class TierView:
    """What one tier reports."""

    used_bytes: float = 0.0
    capacity_bytes: float = 0.0
    entries: float = 0.0
    bytes_saved: float = 0.0
    bytes_loaded: float = 0.0
    evictions: float = 0.0
    errors: float = 0.0
    alloc_failures: float = 0.0
    hit_chunks: float = 0.0
    breaker: str = "-"


@dataclass
class MetricsView:
    """One scrape, reduced to what the table shows."""

    hit_rate: float = 0.0
    lookups: float = 0.0
    lookup_tokens: float = 0.0
    hit_tokens: float = 0.0
    errors: float = 0.0
    alloc_failures: float = 0.0
    tiers: dict[str, TierView] = field(default_factory=dict)
    families: int = 0  # kvortex_* metric families seen


def parse_metrics(text: str) -> MetricsView:
    """Reduce a Prometheus text scrape to a :class:`MetricsView` (unknown names are ignored).

    Raises ValueError when ``text`` is not in the Prometheus text format.
    """
    from prometheus_client.parser import text_string_to_metric_families

    view = MetricsView()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(PREFIX):
            continue
        view.families += 1
        name = family.name[len(PREFIX) :]
        for sample in family.samples:
            if family.type == "counter" and not sample.name.endswith("_total"):
                continue  # skip the _created samples
            _apply(view, name, sample.labels.get("tier", ""), float(sample.value))
    if view.lookup_tokens > 0:  # from the counters: right for one process and for several
        view.hit_rate = view.hit_tokens / view.lookup_tokens
    return view


def _apply(view: MetricsView, name: str, tier: str, value: float) -> None:
    engine_wide = {
        "hit_rate": "hit_rate",
        "lookups": "lookups",
        "lookup_tokens": "lookup_tokens",
        "hit_tokens": "hit_tokens",
    }
    if name == _PRESSURE:
        view.alloc_failures += value
        if tier:
            view.tiers.setdefault(tier, TierView()).alloc_failures += value
        return
    if not tier:
        if name in engine_wide:
            setattr(view, engine_wide[name], value)
        elif any(w in name for w in _ERROR_WORDS):
            view.errors += value
        return
    t = view.tiers.setdefault(tier, TierView())
    if name in _SUMMED:  # the cpu tier counts bytes_*, lower tiers tier_bytes_*
        setattr(t, _SUMMED[name], getattr(t, _SUMMED[name]) + value)
    elif name in ("used_bytes", "capacity_bytes", "entries", "evictions", "hit_chunks"):
        setattr(t, name, value)
    elif name == "breaker_state":
        state = BREAKER_STATES.get(int(value), str(value))
        if _BREAKER_RANK.get(state, 3) >= _BREAKER_RANK.get(t.breaker, -1):
            t.breaker = state
    elif any(w in name for w in _ERROR_WORDS):
        t.errors += value
        view.errors += value


def check_url(url: str) -> str:
    """``url`` when it is an http(s) URL with a host, else a usage error (exit status 2)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise typer.BadParameter(f"{url!r} is not a valid URL ({exc}); use e.g. "
                                 "http://127.0.0.1:9400/metrics", param_hint="--url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise typer.BadParameter(
            f"{url!r} is not an http:// or https:// URL with a host; use e.g. "
            "http://127.0.0.1:9400/metrics",
            param_hint="--url",
        )
    return url


def fetch(url: str, timeout: float = 5.0) -> str:
    """GET ``url``; a clear :class:`KVortexError` when nothing answers there."""
    from kvortex_core.errors import KVortexError

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise KVortexError(
            f"cannot read metrics from {url}: {exc}; is KVortex running with metrics enabled "
            "(KVORTEX_METRICS__ENABLED=true, KVORTEX_METRICS__PORT)? pass --url to point elsewhere"
        ) from None


def scrape(url: str) -> MetricsView:
    """Fetch and parse ``url``; a :class:`KVortexError` when it is not a KVortex metrics page."""
    from kvortex_core.errors import KVortexError

    text = fetch(url)
    try:
        view = parse_metrics(text)
    except ValueError as exc:
        raise KVortexError(
            f"{url} answered, but not in the Prometheus text format ({exc}); point --url at "
            "the metrics endpoint, e.g. http://HOST:PORT/metrics"
        ) from None
    if view.families == 0:
        raise KVortexError(
            f"{url} answered, but with no kvortex_* metrics; point --url at the metrics "
            "endpoint of a KVortex instance (KVORTEX_METRICS__ENABLED=true) or of vLLM"
        )
    return view


def render(view: MetricsView, previous: MetricsView | None = None, elapsed_s: float = 0.0) -> Any:
    """The rich view of one scrape; with ``previous``, load/save rates in MB/s.

    One table when the terminal is wide enough, else two narrower ones (tiers and traffic),
    so that no header is cut to "sa…" on an 80-column terminal.
    """
    title = (
        f"KVortex  hit rate {view.hit_rate:.1%}  lookups {view.lookups:,.0f}  "
        f"hit tokens {view.hit_tokens:,.0f}/{view.lookup_tokens:,.0f}  errors {view.errors:,.0f}"
    )
    if view.alloc_failures:
        title += f"  pinned-pool alloc failures {view.alloc_failures:,.0f} (pressure)"
    cells: dict[str, dict[str, str]] = {}
    for name, t in view.tiers.items():
        before = previous.tiers.get(name) if previous else None
        cells[name] = {
            "tier": name,
            "used": _bytes(t.used_bytes),
            "capacity": _bytes(t.capacity_bytes),
            "use %": f"{t.used_bytes / t.capacity_bytes:.1%}" if t.capacity_bytes else "-",
            "chunks": f"{t.entries:,.0f}",
            "saved": _bytes(t.bytes_saved),
            "loaded": _bytes(t.bytes_loaded),
            "save\nMB/s": _rate(t.bytes_saved, before.bytes_saved if before else None, elapsed_s),
            "load\nMB/s": _rate(t.bytes_loaded, before.bytes_loaded if before else None, elapsed_s),
            "evicted": f"{t.evictions:,.0f}",
            "errors": f"{t.errors:,.0f}",
            "breaker": t.breaker,
        }
    return _StatsView(title, cells)


#: The two narrower tables used when the full one does not fit the terminal.
_NARROW = (
    ("tier", "used", "capacity", "use %", "evicted", "errors", "breaker"),
    ("tier", "chunks", "saved", "loaded", "save\nMB/s", "load\nMB/s"),
)
#: Four tables for a terminal too narrow for those two (e.g. 60 columns).
_NARROWEST = (
    ("tier", "used", "capacity", "use %"),
    ("tier", "evicted", "errors", "breaker"),
    ("tier", "chunks", "saved", "loaded"),
    ("tier", "save\nMB/s", "load\nMB/s"),
)


@dataclass
class _StatsView:
    """Picks the layout from the width rich offers when it is printed."""

    title: str
    cells: dict[str, dict[str, str]]

    def table(self, columns: tuple[str, ...], title: str | None) -> Any:
        from rich.table import Table

        table = Table(title=title, padding=(0, 1))
        for col in columns:
            table.add_column(
                col,
                justify="left" if col in ("tier", "breaker") else "right",
                min_width=max(len(word) for word in col.split()),
                overflow="fold",
            )
        for row in self.cells.values():
            table.add_row(*(row[col] for col in columns))
        return table

    def __rich_console__(self, console: Any, options: Any) -> Any:
        """The first layout whose every table fits the width as it is (no header cut short)."""
        layouts = [(_COLUMNS,), _NARROW, _NARROWEST]
        for layout in layouts:
            tables = [self.table(cols, self.title if i == 0 else None) for i, cols in enumerate(layout)]
            widths = [console.measure(t, options=options.update_width(10_000)).maximum for t in tables]
            if max(widths) <= options.max_width or layout is layouts[-1]:
                yield from tables
                return


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _rate(now: float, before: float | None, elapsed_s: float) -> str:
    if before is None or elapsed_s <= 0:
        return "-"
    return f"{max(now - before, 0) / elapsed_s / 1e6:.1f}"


def default_url() -> str:
    """The metrics URL the configuration (env, YAML) points at."""
    from kvortex_core.config import KVortexConfig

    metrics = KVortexConfig().metrics
    if metrics.port is None:
        raise typer.BadParameter(
            "no --url given and metrics.port is not configured; pass --url "
            "http://HOST:PORT/metrics or set KVORTEX_METRICS__PORT",
            param_hint="--url",
        )
    if metrics.port == 0:  # each process picked a free port: only it knows which
        raise typer.BadParameter(
            "no --url given and metrics.port is 0 (each engine picks a free port at start); pass "
            "--url http://HOST:PORT/metrics with the port it picked (KVortexEngine.metrics_url), "
            "or set a fixed KVORTEX_METRICS__PORT",
            param_hint="--url",
        )
    from kvortex_core.metrics import metrics_url

    return metrics_url(metrics.host, metrics.port)


def stats_cmd(
    url: Annotated[
        str | None, typer.Option(help="metrics URL, e.g. http://127.0.0.1:9400/metrics")
    ] = None,
    once: Annotated[bool, typer.Option("--once", help="print one table and exit")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between refreshes")] = 2.0,
) -> None:
    """Show a running instance's hit rate, tiers, usage, errors and breaker state."""
    from rich.console import Console
    from rich.live import Live

    from kvortex_core.cli.output import fail
    from kvortex_core.errors import KVortexError

    url = check_url(url) if url else default_url()
    console = Console()
    try:
        view, t_prev = scrape(url), time.monotonic()
        if once:
            console.print(render(view))
            return
        with Live(render(view), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(interval)
                new, now = scrape(url), time.monotonic()
                live.update(render(new, view, now - t_prev))
                view, t_prev = new, now
    except KVortexError as exc:
        raise fail(f"error: {exc}", 1) from None
    except KeyboardInterrupt:
        return


def register(app: typer.Typer) -> None:
    """Add ``kvortex stats`` to the ``kvortex`` app."""
    app.command("stats")(stats_cmd)
