"""``kvortex demo``: a real save / lookup / load round trip through ``KVortexEngine``.

A synthetic model shape (small by default, so it runs in seconds on a CPU) gets paged KV
caches in vLLM's layout ``[2, num_blocks, block_size, kv_heads, head_size]`` per layer. Each
prompt's KV is saved, looked up (plus prompts never seen, which must miss), then loaded into
*other* blocks and compared byte for byte with what was saved. Bandwidth is reported next to a
raw ``copy_`` of the same bytes on the same device, measured in the same run.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from kvortex_core.cli.output import EXIT_FAILED, console, exits_on_error, fail, human_bytes
from kvortex_core.logs import configure

if TYPE_CHECKING:
    import torch

    from kvortex_core.config import KVortexConfig


@dataclass(frozen=True)
class DemoShape:
    """The synthetic model and workload."""

    layers: int = 4
    kv_heads: int = 8
    head_size: int = 128
    block_size: int = 16
    prompts: int = 4
    prompt_tokens: int = 2048

    @property
    def blocks_per_prompt(self) -> int:
        return -(-self.prompt_tokens // self.block_size)

    def bytes_per_token(self, itemsize: int) -> int:
        return self.layers * 2 * self.kv_heads * self.head_size * itemsize


@dataclass
class DemoResult:
    """What the demo measured; ``ok`` is False when any loaded byte differs."""

    device: str
    saved_tokens: int = 0
    asked_tokens: int = 0
    hit_tokens: int = 0
    loaded_tokens: int = 0
    save_s: float = 0.0
    load_s: float = 0.0
    raw_copy_s: float = 0.0
    moved_bytes: int = 0
    mismatches: int = 0
    stats: Any = None

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.loaded_tokens > 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.asked_tokens if self.asked_tokens else 0.0


def pick_device(requested: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N``.

    Anything else is a usage error (exit status 2), checked before torch sees it.
    """
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cpu":
        return requested
    cuda = re.fullmatch(r"cuda(?::(\d+))?", requested)
    if cuda is None:
        raise typer.BadParameter(
            f"--device {requested}: not a device the demo runs on; use auto, cpu, cuda or cuda:N"
        )
    if not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {requested}: no CUDA device here; use cpu or auto")
    count = torch.cuda.device_count()
    if cuda[1] is not None and int(cuda[1]) >= count:
        raise typer.BadParameter(
            f"--device {requested}: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return requested


def check_tokens(config: KVortexConfig, shape: DemoShape) -> None:
    """Fewer tokens than one chunk store nothing: say so up front (exit status 2)."""
    if shape.prompt_tokens >= config.chunk_tokens or config.store_partial_chunks:
        return
    from kvortex_core.config.provenance import provenance

    source = provenance(config)["chunk_tokens"][1]
    raise fail(
        f"--tokens {shape.prompt_tokens} is fewer than one chunk (chunk_tokens = "
        f"{config.chunk_tokens}, from {source}): nothing would be stored, so nothing could be "
        f"loaded; use --tokens >= {config.chunk_tokens}, or a smaller chunk_tokens (YAML "
        "'chunk_tokens', env KVORTEX_CHUNK_TOKENS)"
    )


def demo_config(config_file: Path | None, shape: DemoShape, itemsize: int) -> KVortexConfig:
    """The user's configuration, or (with none given) a cpu tier sized for the demo."""
    import os

    from kvortex_core.config import KVortexConfig
    from kvortex_core.config.settings import CONFIG_FILE_ENV

    overrides: dict[str, Any] = {}
    has_tiers = any(k.upper().startswith("KVORTEX_TIERS") for k in os.environ)
    if config_file is None and not os.environ.get(CONFIG_FILE_ENV) and not has_tiers:
        need = shape.prompts * shape.prompt_tokens * shape.bytes_per_token(itemsize)
        overrides["tiers"] = {"cpu": {"type": "cpu", "capacity": max(2 * need, 64 * 1024**2)}}
    if not os.environ.get("KVORTEX_MODEL_ID"):
        overrides["model_id"] = "kvortex-demo"
    return KVortexConfig.load(config_file, **overrides)


def _kv_caches(shape: DemoShape, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    import torch

    # Twice the blocks a workload needs: the first half is saved, the second half loaded into.
    num_blocks = 2 * shape.prompts * shape.blocks_per_prompt
    dims = (2, num_blocks, shape.block_size, shape.kv_heads, shape.head_size)
    gen = torch.Generator(device="cpu").manual_seed(0)
    return [
        torch.randn(dims, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        for _ in range(shape.layers)
    ]


def _raw_copy_seconds(kv: list[torch.Tensor], nbytes: int) -> float:
    """Time one plain device -> host ``copy_`` of ``nbytes`` (the baseline bandwidth)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device=kv[0].device)
    dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=src.is_cuda)
    for _ in range(2):  # the first copy pays for page faults
        t0 = time.perf_counter()
        dst.copy_(src)
        if src.is_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    return elapsed


def run_demo(
    config: KVortexConfig,
    shape: DemoShape,
    device: str,
    dtype_name: str,
    progress: Progress | None = None,
    warmup: bool = True,
) -> DemoResult:
    """Save, look up and load every prompt; compare loaded bytes with the saved ones."""
    import torch

    from kvortex_core import KVortexEngine

    kv = _kv_caches(shape, device, getattr(torch, dtype_name))
    gen = torch.Generator().manual_seed(1)
    prompts = [_random_tokens(shape, gen) for _ in range(shape.prompts + 1)]
    unseen = prompts.pop()  # never saved: its lookup must miss
    step = _stepper(progress, 3 * shape.prompts)
    result = DemoResult(device=device, saved_tokens=shape.prompts * shape.prompt_tokens)
    with KVortexEngine.create(config) as engine:
        # the demo's caches are FlashAttention's (2, blocks, ...): named, as with 2 blocks the
        # shape alone cannot tell it from FlashInfer's (blocks, 2, ...)
        engine.register_kv_caches(kv, {"kind": "flash_attn"})
        if warmup:  # first use pays for CUDA kernels, streams and page faults: keep it out
            warm = _random_tokens(shape, gen)
            engine.save(warm, _blocks(shape, 0))
            engine.load(warm, _blocks(shape, shape.prompts))
        before = engine.stats()
        loaded: list[int] = []

        def save_all() -> None:
            for i, tokens in enumerate(prompts):
                engine.save(tokens, _blocks(shape, i))
                step()

        def load_all() -> None:
            for i, tokens in enumerate(prompts):
                loaded.append(engine.load(tokens, _blocks(shape, shape.prompts + i)))
                step()

        result.save_s = _timed(device, save_all)
        for tokens in prompts:
            result.hit_tokens += engine.lookup(tokens)
            step()
        result.hit_tokens += engine.lookup(unseen)
        result.asked_tokens = (shape.prompts + 1) * shape.prompt_tokens
        result.load_s = _timed(device, load_all)
        result.loaded_tokens = sum(loaded)
        result.mismatches = _compare(kv, shape, loaded)
        result.stats = _since(before, engine.stats())
    result.moved_bytes = result.loaded_tokens * shape.bytes_per_token(kv[0].element_size())
    result.raw_copy_s = _raw_copy_seconds(kv, max(result.moved_bytes, 1))
    return result


def _random_tokens(shape: DemoShape, gen: torch.Generator) -> list[int]:
    import torch

    return torch.randint(0, 32000, (shape.prompt_tokens,), generator=gen).tolist()


def _blocks(shape: DemoShape, slot: int) -> list[int]:
    """Block ids of prompt slot ``slot``: slots [0, prompts) are saved, the rest loaded into."""
    n = shape.blocks_per_prompt
    return list(range(slot * n, (slot + 1) * n))


def _stepper(progress: Progress | None, total: int) -> Callable[[], None]:
    if progress is None:
        return lambda: None
    task = progress.add_task("save / lookup / load", total=total)
    return lambda: progress.advance(task)


def _timed(device: str, work: Callable[[], object]) -> float:
    """Wall seconds of ``work``, with the device drained before and after."""
    _sync(device)
    t0 = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - t0


def _since(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after`` with the engine's hit rate recomputed over the measured work only."""

    def total(stats: dict[str, Any], name: str) -> float:
        return float(sum(stats.get("counters", {}).get(name, {}).values()))

    asked = total(after, "lookup_tokens") - total(before, "lookup_tokens")
    hits = total(after, "hit_tokens") - total(before, "hit_tokens")
    return {**after, "hit_rate": hits / asked if asked else None}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _compare(kv: list[torch.Tensor], shape: DemoShape, loaded: list[int]) -> int:
    """Count (layer, prompt) pairs whose loaded tokens differ from the saved ones."""
    bad = 0
    for layer in kv:
        for i, n_tokens in enumerate(loaded):
            saved = layer[:, _blocks(shape, i)].flatten(1, 2)[:, :n_tokens]
            back = layer[:, _blocks(shape, shape.prompts + i)].flatten(1, 2)[:, :n_tokens]
            # Compare bytes, not values: -0.0 == 0.0 would hide a wrong sign bit.
            if not _as_bytes(saved).equal(_as_bytes(back)):
                bad += 1
    return bad


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.contiguous().view(torch.uint8)


def _report(result: DemoResult, shape: DemoShape, warmup: bool) -> None:
    when = "after one untimed warm-up round trip" if warmup else "cold, first use"
    table = Table(title=f"KVortex demo on {result.device} ({when})", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    gbps = lambda s: result.moved_bytes / s / 1e9 if s > 0 else 0.0
    rows = [
        ("model shape", f"{shape.layers} layers x {shape.kv_heads} kv heads x {shape.head_size}"),
        ("prompts x tokens", f"{shape.prompts} x {shape.prompt_tokens}"),
        ("hit rate (tokens found / asked, 1 unseen prompt)", f"{result.hit_rate:.1%}"),
        ("tokens loaded", str(result.loaded_tokens)),
        ("bytes loaded", human_bytes(result.moved_bytes)),
        ("save bandwidth", f"{gbps(result.save_s):.2f} GB/s"),
        ("load bandwidth", f"{gbps(result.load_s):.2f} GB/s"),
        ("raw copy_ bandwidth (same bytes)", f"{gbps(result.raw_copy_s):.2f} GB/s"),
        ("load / raw ratio", f"{result.raw_copy_s / result.load_s:.2f}" if result.load_s else "-"),
        ("loaded bytes equal saved bytes", _equal_cell(result)),
    ]
    rows[3:3] = _stats_rows(result.stats)
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


def _equal_cell(result: DemoResult) -> str:
    if result.mismatches:
        return "[red]NO[/red]"
    return "[green]yes[/green]" if result.loaded_tokens else "[red]- (nothing loaded)[/red]"


def _stats_rows(stats: Any) -> list[tuple[str, str]]:
    """What the engine itself counted: its hit rate and each tier's usage."""
    if not isinstance(stats, dict):
        return []
    rows = []
    if isinstance(stats.get("hit_rate"), int | float):
        rows.append(("engine-reported hit rate", f"{stats['hit_rate']:.1%}"))
    gauges = stats.get("gauges", {})
    used, capacity = gauges.get("used_bytes", {}), gauges.get("capacity_bytes", {})
    for tier, nbytes in used.items():
        if capacity.get(tier):
            rows.append(
                (f"tier {tier} usage", f"{human_bytes(nbytes)} of {human_bytes(capacity[tier])}")
            )
    # a lower tier out of service says so, and why (one that never opened showed "0 B of 1 GiB"
    # like an idle one: a red-team finding)
    for tier, state in (stats.get("tiers") or {}).items():
        if state.get("state") == "closed":
            rows.append((f"tier {tier} state", "[green]in service[/green]"))
        else:
            why = escape(str(state.get("last_error") or "-"))
            rows.append((f"tier {tier} state", f"[red]out of service ({state.get('state')}): {why}[/red]"))
    return rows


@exits_on_error
def demo(
    device: Annotated[
        str, typer.Option(help="auto (cuda when present), cpu, cuda, cuda:N.")
    ] = "auto",
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML config (default: a cpu tier sized for the demo)."
        ),
    ] = None,
    layers: Annotated[int, typer.Option(min=1, help="Synthetic model layers.")] = DemoShape.layers,
    kv_heads: Annotated[int, typer.Option(min=1)] = DemoShape.kv_heads,
    head_size: Annotated[int, typer.Option(min=1)] = DemoShape.head_size,
    block_size: Annotated[
        int, typer.Option(min=1, help="Tokens per paged KV block.")
    ] = DemoShape.block_size,
    prompts: Annotated[
        int, typer.Option(min=1, help="Distinct prompts saved and loaded.")
    ] = DemoShape.prompts,
    tokens: Annotated[
        int, typer.Option(min=1, help="Tokens per prompt.")
    ] = DemoShape.prompt_tokens,
    dtype: Annotated[str, typer.Option(help="KV dtype: bfloat16, float16, float32.")] = "bfloat16",
    warmup: Annotated[
        bool, typer.Option(help="One untimed round trip first (CUDA kernels, page faults).")
    ] = True,
) -> None:
    """Save, look up and load a synthetic model's KV; print hit rate and bandwidth."""
    if dtype not in ("bfloat16", "float16", "float32"):
        raise typer.BadParameter(f"--dtype {dtype}: use bfloat16, float16 or float32")
    shape = DemoShape(layers, kv_heads, head_size, block_size, prompts, tokens)
    chosen = pick_device(device)
    config = demo_config(config_file, shape, 4 if dtype == "float32" else 2)
    check_tokens(config, shape)
    configure(config.log_level)  # a tier going down is a WARNING line on stderr
    console.print(
        f"KVortex demo: device [bold]{chosen}[/bold], tiers "
        + ", ".join(
            f"{n} ({t.type}, {human_bytes(int(t.capacity))})" for n, t in config.tiers.items()
        )
    )
    with Progress(console=console, transient=True) as progress, warnings.catch_warnings():
        # Without CUDA the host pool cannot be pinned; the demo already says it runs on cpu.
        warnings.filterwarnings("ignore", message="CUDA is not available")
        result = run_demo(config, shape, chosen, dtype, progress, warmup)
    _report(result, shape, warmup)
    if result.mismatches:
        raise fail("demo FAILED: loaded KV differs from the saved KV", EXIT_FAILED)
    if not result.ok:
        raise fail(
            "demo FAILED: nothing was loaded back (no whole chunk of any prompt was found)",
            EXIT_FAILED,
        )


def register(root: typer.Typer) -> None:
    """Add ``kvortex demo`` to the root app."""
    root.command("demo")(demo)
