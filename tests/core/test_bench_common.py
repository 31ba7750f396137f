"""Shared bench plumbing: spreads, ratios, sizes, JSON, PNG and tables; the TTFT harness on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from kvortex_core.cli.bench.common import (
    Measurement,
    Series,
    hardware,
    markdown_table,
    parse_sizes,
    plot_lines,
    print_table,
    ratio,
    ratio_spread,
    repeat,
    spread,
    write_results,
)


def test_spread_and_ratios() -> None:
    assert spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert spread([]) == {"min": 0.0, "median": 0.0, "max": 0.0}
    ours, raw = (
        Measurement("ours", [2.0, 4.0, 3.0], nbytes=6_000_000_000),
        Measurement("raw", [1.0, 2.0, 1.5]),
    )
    assert ratio(ours, raw) == pytest.approx(0.5)
    assert ours.gbps() == {"min": 1.5, "median": 2.0, "max": 3.0}
    assert ours.summary()["median"] == 3.0
    # Paired speedups raw/ours per repetition.
    assert ratio_spread([1.0, 2.0], [10.0, 10.0]) == {"min": 5.0, "median": 7.5, "max": 10.0}


def test_repeat_runs_warmup_then_reps() -> None:
    calls: list[int] = []
    times = repeat(lambda: calls.append(1), reps=3, warmup=2)
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)


def test_parse_sizes() -> None:
    assert parse_sizes("1K, 8K,32K") == [1024, 8192, 32768]
    assert parse_sizes("100,1M") == [100, 1024**2]
    with pytest.raises(typer.BadParameter, match="'abc' is not a number"):
        parse_sizes("abc")
    with pytest.raises(typer.BadParameter, match="must be positive"):
        parse_sizes("0")


def test_write_results_names_the_hardware(tmp_path: Path) -> None:
    path = write_results(tmp_path / "new", "demo", {"m": Measurement("x", [1.0], 5)})
    data = json.loads(path.read_text())
    assert data["benchmark"] == "demo"
    assert data["hardware"] == json.loads(json.dumps(hardware()))
    assert data["hardware"]["cpu"] and data["hardware"]["torch"]
    assert data["m"] == {"name": "x", "seconds": [1.0], "nbytes": 5}


def test_plot_writes_a_png(tmp_path: Path) -> None:
    s = Series("a", [1, 2, 4], [1.0, 2.0, 3.0], [0.5, 1.5, 2.5], [1.5, 2.5, 3.5], linestyle="--")
    path = plot_lines(
        tmp_path / "p.png", [s], title="t", xlabel="x", ylabel="y", logx=True, hline=2.0
    )
    assert path is not None and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables(capsys: pytest.CaptureFixture[str]) -> None:
    print_table("T", ["name", "value"], [["a", 0.123456], ["b", 12345.6]])
    out = capsys.readouterr().out
    assert "0.123" in out and "12,346" in out
    assert markdown_table(["a", "b"], [[1, 2.5]]) == "| a | b |\n|---|---|\n| 1 | 2.5 |"


def test_ttft_tiny_runs_and_verifies_on_cpu(tmp_path: Path) -> None:
    """The TTFT harness end to end with a toy Llama on CPU: the loaded KV must equal the computed."""
    pytest.importorskip("transformers")
    from kvortex_core.cli.bench.ttft import register

    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """bench"""

    register(app)
    result = CliRunner().invoke(
        app,
        [
            "ttft",
            "--tiny",
            "--tokens",
            "256,512",
            "--overhead-tokens",
            "256",
            "--reps",
            "1",
            "--out",
            str(tmp_path),
            "--disk-path",
            str(tmp_path / "disk"),
            "--no-drop-caches",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "ttft.json").read_text())
    for n in ("256", "512"):
        assert data["lengths"][n]["cpu"]["verified"] is True
        assert data["lengths"][n]["cpu"]["loaded_tokens"] == int(n)
        disk = data["lengths"][n]["disk"]
        assert disk.get("verified", True) is True  # skipped (no engine yet) or verified
    over = data["overhead"]["256"]
    assert over["requests"] == 4 and {"ttft_overhead", "total_overhead", "lookup_fraction"} <= set(
        over
    )
    assert (tmp_path / "ttft_speedup.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["core", "--tokens", "abc"], "size 'abc' is not a number"),
        (["core", "--entries", "0"], "'0' must be >= 1"),
        (["disk", "--sizes", "x"], "'x' is not a number"),
        (["disk", "--sizes", "0"], "'0' must be >= 0.001"),
        (["disk", "--concurrency", "0"], "'0' must be >= 1"),
        (["backends", "--concurrency", "0"], "'0' must be >= 1"),
        (["backends", "--targets", "foo"], "'foo' given; choose from redis,s3,disk"),
        (["simulate", "--fractions", "2"], "'2' must be between 0.0001 and 1"),
        (["simulate", "--block-tokens", "0"], "--block-tokens"),
        (["transfer", "--staging", "xx"], "'xx' is not a size"),
        (["transfer", "--parts", "nope"], "'nope' given; choose from"),
        (["transfer", "--device", "tpu"], "'tpu' is not cuda, cpu or auto"),
        (["ttft", "--tiers", "foo"], "'foo' given; choose from cpu,disk"),
    ],
)
def test_bench_bad_arguments_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    """Exit 2 with the option named on stderr (docs/cli.md), never a traceback and never a run
    that measures nothing (a ZeroDivisionError, or exit 0 with an empty table, before)."""
    from kvortex_core.cli.app import app

    result = CliRunner().invoke(app, ["bench", *args, "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()), result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not any(tmp_path.iterdir()), "nothing was run"


def test_bench_transfer_on_cuda_without_a_gpu_says_so(tmp_path: Path) -> None:
    import torch

    from kvortex_core.cli.app import app

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    result = CliRunner().invoke(app, ["bench", "transfer", "--device", "cuda", "--out", str(tmp_path)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "no CUDA device here" in " ".join(result.stderr.split())
