"""``kvortex bench transfer`` on CPU: every case runs (a smoke test of the code, not a measurement),
and the engine cases refuse to report a ratio for bytes that did not move."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from kvortex_core.cli.app import app
from kvortex_core.cli.bench import transfer_parts as tp
from kvortex_core.cli.bench.transfer_engine import (
    STREAM_CALLS,
    engine_case,
    engine_stream,
    make_engine,
)
from kvortex_core.data.layouts import detect_layout


def test_bench_transfer_runs_every_layout_on_cpu(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "transfer", "--tokens", "256", "--reps", "1",
                                      "--parts", "verify,te,engine", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "transfer.json").read_text())
    assert all(data["verify"].values()) and len(data["verify"]) == 25
    cases = {r["case"].rsplit(" 256 ", 1)[0] for r in data["rows"]}
    # Llama and MLA, each in one buffer (vLLM 0.30+) and per layer; a per-layer layout that "auto"
    # gathered with a strided plan again through the row plan
    gather = data["gather"]
    assert {k: v["mode"] for k, v in gather.items() if k.endswith("-rows")} == {
        f"{k}-rows": "rows" for k, v in gather.items() if k.endswith("per-layer") and v["mode"] != "rows"}
    assert cases == {"llama-3.1-8b(cpu-scaled) unified-LBNHC", "llama-3.1-8b(cpu-scaled) per-layer",
                     "mla(cpu-scaled) unified-LBNHC", "mla(cpu-scaled) per-layer"} | {
                     k for k in gather if k.endswith("-rows")}
    assert all(r["ratio"] > 0 for r in data["rows"])


def test_extra_tokens_sets_the_size_of_the_extra_cases(tmp_path: Path) -> None:
    """--extra-tokens: the layer-wise case (like bidir, matmul, sweep) runs at that size, not the
    largest; a size that is no multiple of 256 or exceeds --tokens is a usage error."""
    result = CliRunner().invoke(app, ["bench", "transfer", "--tokens", "256,1024", "--reps", "1",
                                      "--parts", "layerwise", "--extra-tokens", "512", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "transfer.json").read_text())
    assert data["extra_tokens"] == 512 and data["layerwise"]["tokens"] == 512
    for bad in ("300", "2048"):
        result = CliRunner().invoke(app, ["bench", "transfer", "--tokens", "256,1024", "--extra-tokens", bad,
                                          "--out", str(tmp_path)])
        assert result.exit_code == 2 and "--extra-tokens" in result.output, result.output


def test_engine_case_refuses_a_cpu_tier_too_small_to_hold_the_sequence() -> None:
    shape = tp.Shape("tiny", 2, 2, 64, 16)
    caches = tp.make_caches(shape, 512, torch.device("cpu"), unified=True)
    layout = detect_layout(caches)
    engine = make_engine(caches, layout, 256, 1 << 20, None)  # 10 slots: a 16-chunk save skips 6
    try:
        with pytest.raises(RuntimeError, match="cpu tier is too small"):
            engine_case(engine, shape, 4096, layout, 1)
    finally:
        engine.close()


def test_stream_part_times_back_to_back_calls_of_every_layout(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["bench", "transfer", "--tokens", "256", "--reps", "1",
                                      "--parts", "stream", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "transfer.json").read_text())["rows"]
    stream = [r for r in rows if f" engine x{STREAM_CALLS} " in r["case"]]
    # a save and a load row per layout, only those (no single-call engine rows without "engine"),
    # each covering the bytes of STREAM_CALLS calls
    assert len(stream) == len(rows) and len(rows) >= 8
    assert {r["case"].rsplit(" ", 1)[1] for r in rows} == {"save", "load"}
    assert all(r["paired"] and r["ratio"] > 0 for r in rows)
    assert all(r["bytes"] > 0 and r["bytes"] % STREAM_CALLS == 0 for r in rows)


def test_stream_case_refuses_a_cpu_tier_too_small_to_hold_the_sequence() -> None:
    shape = tp.Shape("tiny", 2, 2, 64, 16)
    caches = tp.make_caches(shape, 512, torch.device("cpu"), unified=True)
    layout = detect_layout(caches)
    engine = make_engine(caches, layout, 256, 1 << 20, None)
    try:
        with pytest.raises(RuntimeError, match="cpu tier is too small"):
            engine_stream(engine, shape, 4096, layout, 1)
    finally:
        engine.close()
