"""``kvortex demo``: a real save / lookup / load round trip through ``KVortexEngine``.

A synthetic model shape (small by default, so it runs in seconds on a CPU) gets paged KV
caches in vLLM's layout ``[2, num_blocks, block_size, kv_heads, head_size]`` per layer. Each
prompt's KV is saved, looked up (plus prompts never seen, which must miss), then loaded into
*other* blocks and compared byte for byte with what was saved. Bandwidth is reported next to a
raw ``copy_`` of the same bytes on the same device, measured in the same run.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.progress import Progress
from rich.table import Table

from kvortex_core.cli.output import EXIT_FAILED, console, exits_on_error, fail, human_bytes

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
    """``auto`` -> ``cuda`` when a GPU is present, else ``cpu``."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {requested}: no CUDA device here; use cpu or auto")
    return requested


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
) -> DemoResult:
    """Save, look up and load every prompt; compare loaded bytes with the saved ones."""
    import torch

    from kvortex_core import KVortexEngine

    dtype = getattr(torch, dtype_name)
    kv = _kv_caches(shape, device, dtype)
    result = DemoResult(device=device)
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, 32000, (shape.prompt_tokens,), generator=gen).tolist()
        for _ in range(shape.prompts)
    ]
    n = shape.blocks_per_prompt
    task = progress.add_task("save / lookup / load", total=3 * shape.prompts) if progress else None

    def advance() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    with KVortexEngine.create(config) as engine:
        engine.register_kv_caches(kv)
        _sync(device)
        t0 = time.perf_counter()
        for i, tokens in enumerate(prompts):
            engine.save(tokens, list(range(i * n, (i + 1) * n)))
            advance()
        _sync(device)
        result.save_s = time.perf_counter() - t0
        result.saved_tokens = shape.prompts * shape.prompt_tokens
        unseen = torch.randint(0, 32000, (shape.prompt_tokens,), generator=gen).tolist()
        for tokens in prompts:
            result.asked_tokens += len(tokens)
            result.hit_tokens += engine.lookup(tokens)
            advance()
        result.asked_tokens += len(unseen)
        result.hit_tokens += engine.lookup(unseen)  # never saved: must miss
        load_base = shape.prompts * n
        t0 = time.perf_counter()
        for i, tokens in enumerate(prompts):
            result.loaded_tokens += engine.load(
                tokens, list(range(load_base + i * n, load_base + (i + 1) * n))
            )
            advance()
        _sync(device)
        result.load_s = time.perf_counter() - t0
        result.mismatches = _compare(kv, shape, result.loaded_tokens // max(shape.prompts, 1))
        result.stats = engine.stats()
    result.moved_bytes = result.loaded_tokens * shape.bytes_per_token(kv[0].element_size())
    result.raw_copy_s = _raw_copy_seconds(kv, max(result.moved_bytes, 1))
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _compare(kv: list[torch.Tensor], shape: DemoShape, tokens_per_prompt: int) -> int:
    """Count (layer, prompt) pairs whose loaded tokens differ from the saved ones."""
    n = shape.blocks_per_prompt
    base = shape.prompts * n
    bad = 0
    for layer in kv:
        for i in range(shape.prompts):
            saved = layer[:, i * n : (i + 1) * n].flatten(1, 2)[:, :tokens_per_prompt]
            loaded = layer[:, base + i * n : base + (i + 1) * n].flatten(1, 2)[
                :, :tokens_per_prompt
            ]
            # Compare bytes, not values: -0.0 == 0.0 would hide a wrong sign bit.
            if not _as_bytes(saved).equal(_as_bytes(loaded)):
                bad += 1
    return bad


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.contiguous().view(torch.uint8)


def _report(result: DemoResult, shape: DemoShape) -> None:
    table = Table(title=f"KVortex demo on {result.device}", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    gbps = lambda s: result.moved_bytes / s / 1e9 if s > 0 else 0.0  # noqa: E731
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
        ("loaded bytes equal saved bytes", "[green]yes[/green]" if result.ok else "[red]NO[/red]"),
    ]
    rows[3:3] = _stats_rows(result.stats)
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)


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
) -> None:
    """Save, look up and load a synthetic model's KV; print hit rate and bandwidth."""
    if dtype not in ("bfloat16", "float16", "float32"):
        raise typer.BadParameter(f"--dtype {dtype}: use bfloat16, float16 or float32")
    shape = DemoShape(layers, kv_heads, head_size, block_size, prompts, tokens)
    chosen = pick_device(device)
    config = demo_config(config_file, shape, 4 if dtype == "float32" else 2)
    console.print(
        f"KVortex demo: device [bold]{chosen}[/bold], tiers "
        + ", ".join(
            f"{n} ({t.type}, {human_bytes(int(t.capacity))})" for n, t in config.tiers.items()
        )
    )
    with Progress(console=console, transient=True) as progress, warnings.catch_warnings():
        # Without CUDA the host pool cannot be pinned; the demo already says it runs on cpu.
        warnings.filterwarnings("ignore", message="CUDA is not available")
        result = run_demo(config, shape, chosen, dtype, progress)
    _report(result, shape)
    if not result.ok:
        raise fail(
            "demo FAILED: loaded KV differs from the saved KV (or nothing was loaded)", EXIT_FAILED
        )


def register(root: typer.Typer) -> None:
    """Add ``kvortex demo`` to the root app."""
    root.command("demo")(demo)
