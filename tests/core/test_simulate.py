"""The hit-rate simulator: seeded traces, the JSONL loader, replay through the real index."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from kvortex_core.cli.bench.simulate import register
from kvortex_core.sim import TraceError, chat_sessions, document_qa, load_jsonl, zipf_mix
from kvortex_core.sim.simulator import ideal_hit_rate, prepare, simulate, sweep
from kvortex_core.sim.trace import Request


def _same(a: list[Request], b: list[Request]) -> bool:
    return len(a) == len(b) and all(
        x.timestamp == y.timestamp and np.array_equal(x.tokens, y.tokens)
        for x, y in zip(a, b, strict=True)
    )


@pytest.mark.parametrize("gen", [chat_sessions, document_qa, zipf_mix])
def test_generators_are_seeded(gen: object) -> None:
    assert _same(gen(7), gen(7))  # type: ignore[operator]
    assert not _same(gen(7), gen(8))  # type: ignore[operator]


def test_chat_turns_extend_their_history_and_share_system_prompts() -> None:
    reqs = chat_sessions(1, sessions=20, system_prompts=2)
    by_session: dict[str, list[Request]] = {}
    for r in reqs:
        by_session.setdefault(r.label, []).append(r)
    assert all(a.timestamp <= b.timestamp for a, b in itertools.pairwise(reqs))
    for turns in by_session.values():
        for prev, cur in itertools.pairwise(turns):
            assert len(cur.tokens) > len(prev.tokens)
            assert np.array_equal(cur.tokens[: len(prev.tokens)], prev.tokens)
    heads = {bytes(t[0].tokens[:1024]) for t in by_session.values()}
    assert len(heads) <= 2  # every session starts with one of two system prompts


def test_docqa_repeats_popular_documents() -> None:
    trace = prepare(document_qa(2, documents=10, requests=100))
    # Each document is hashed once into the working set however often it is asked about.
    total = sum(len(k) for k in trace.keys)
    assert trace.unique_chunks < total / 3
    assert ideal_hit_rate(trace) > 0.7


def test_unbounded_cache_reaches_the_ideal_and_small_ones_do_not() -> None:
    trace = prepare(zipf_mix(3, requests=300))
    full = simulate(trace, policy="lru", capacities=[("cpu", trace.working_set_bytes)])
    assert full.token_hit_rate == pytest.approx(ideal_hit_rate(trace))
    assert full.tiers[0].evictions == 0
    small = simulate(trace, policy="lru", capacities=[("cpu", trace.working_set_bytes // 20)])
    assert small.token_hit_rate < full.token_hit_rate
    assert small.tiers[0].evictions > 0


def test_demotion_moves_exactly_the_evicted_chunks_down() -> None:
    trace = prepare(chat_sessions(4, sessions=30))
    cb = trace.chunk_bytes[0]
    res = simulate(
        trace,
        policy="lru",
        capacities=[("cpu", trace.working_set_bytes // 10), ("disk", trace.working_set_bytes)],
    )
    cpu, disk = res.tiers
    # Nothing is written behind: the disk only receives what cpu evicts and it lacks.
    assert 0 < disk.bytes_written <= cpu.evictions * cb
    assert disk.bytes_written < trace.unique_chunks * cb
    assert disk.bytes_read > 0  # demoted chunks come back as hits
    assert res.token_hit_rate > res.tier_hit_rate("cpu")


def test_bytes_moved_add_up_per_tier() -> None:
    trace = prepare(chat_sessions(4, sessions=30))
    cb = trace.chunk_bytes[0]
    res = simulate(
        trace,
        policy="prefix-lru",
        capacities=[("cpu", trace.working_set_bytes // 10), ("disk", trace.working_set_bytes)],
        write_through=True,
    )
    cpu, disk = res.tiers
    # Every unique chunk is written behind to the unbounded disk exactly once.
    assert disk.bytes_written == trace.unique_chunks * cb
    assert disk.evictions == 0
    # Reads are whole chunks, and the hit tokens equal what the tiers served.
    assert cpu.bytes_read % cb == 0 and disk.bytes_read % cb == 0
    assert (cpu.bytes_read + disk.bytes_read) // cb * 256 == res.hit_tokens
    # With everything on disk, the two tiers together reach the ideal.
    assert res.token_hit_rate == pytest.approx(ideal_hit_rate(trace))
    assert res.tier_hit_rate("cpu") < res.token_hit_rate


@pytest.mark.parametrize("gen", [chat_sessions, document_qa, zipf_mix])
def test_prefix_lru_is_never_worse_than_lru(gen: object) -> None:
    trace = prepare(gen(0))  # type: ignore[operator]
    runs = sweep(
        trace,
        policies=["lru", "prefix-lru"],
        fractions=[0.05, 0.1, 0.3],
        lower_tiers=[("disk", 4.0)],
    )
    for lru, plru in zip(runs[::2], runs[1::2], strict=True):
        assert (lru.policy, plru.policy) == ("lru", "prefix-lru")
        assert plru.tier_hit_rate("cpu") >= lru.tier_hit_rate("cpu") - 1e-9
        assert plru.token_hit_rate >= lru.token_hit_rate - 1e-9


def test_jsonl_loader_reads_tokens_and_mooncake_hash_ids(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    lines = [
        {"timestamp": 3000, "input_length": 1300, "output_length": 10, "hash_ids": [1, 2, 3]},
        {"timestamp": 1000, "input_length": 1024, "output_length": 10, "hash_ids": [1, 2]},
        {"timestamp": 2000, "tokens": list(range(600))},
        list(range(600)),
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    reqs = load_jsonl(path)
    assert [r.timestamp for r in reqs] == [3.0, 1000.0, 2000.0, 3000.0]  # bare list: line order
    assert reqs[1].block_hashes == [1, 2] and reqs[1].num_tokens == 1024
    trace = prepare(reqs, chunk_tokens=256)
    res = simulate(trace, policy="lru", capacities=[("cpu", trace.working_set_bytes)])
    # [1,2] is stored by the first request; [1,2,3] hits 2 blocks of 512; the two
    # 600-token prompts are equal: the second hits its 2 whole 256-token chunks.
    assert res.hit_tokens == 2 * 512 + 2 * 256
    assert trace.tokens[-1] == 1300


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "not JSON"),
        ('{"prompt": "hi"}', "no token or block-hash field"),
        ('{"tokens": [1, -2]}', "non-negative integers"),
        ('"text"', "expected a list of token ids"),
    ],
)
def test_jsonl_loader_errors_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("[1, 2]\n" + line + "\n")
    with pytest.raises(TraceError, match=message) as info:
        load_jsonl(path)
    assert f"{path}:2" in str(info.value)


def _bench_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root() -> None:
        """bench"""

    register(app)
    return app


def test_cli_writes_json_png_and_reports_the_gain(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        _bench_app(),
        [
            "simulate",
            "--out",
            str(tmp_path),
            "--reps",
            "2",
            "--workloads",
            "chat",
            "--fractions",
            "0.1,1.0",
            "--policies",
            "lru,prefix-lru",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "simulate.json").read_text())
    chat = data["workloads"]["chat"]
    assert set(chat["curves"]) == {"lru", "prefix-lru"}
    top = chat["curves"]["lru"][-1]
    assert top["capacity_fraction"] == 1.0
    assert top["hit_rate"]["median"] == pytest.approx(chat["ideal"]["median"])
    assert top["hit_rate"]["min"] <= top["hit_rate"]["median"] <= top["hit_rate"]["max"]
    assert chat["prefix_lru_vs_lru"]["min_total"] >= 0
    assert "hardware" in data and data["params"]["reps"] == 2
    assert (tmp_path / "simulate_chat.png").read_bytes()[:4] == b"\x89PNG"
    assert "prefix-lru - lru" in result.output


def test_cli_replays_a_trace_file(tmp_path: Path) -> None:
    trace = tmp_path / "mooncake.jsonl"
    trace.write_text(
        "\n".join(json.dumps({"timestamp": i, "hash_ids": [0, 1, 2 + i % 3]}) for i in range(30))
    )
    result = CliRunner().invoke(
        _bench_app(),
        [
            "simulate",
            "--out",
            str(tmp_path),
            "--trace",
            str(trace),
            "--fractions",
            "1.0",
            "--quiet",
            "--disk-factor",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / "simulate.json").read_text())["workloads"]["mooncake"]
    # 30 requests of 3 blocks; the first sees 0 hits, the next two 2 blocks, then all 3.
    assert res["ideal"]["median"] == pytest.approx((2 * 2 + 27 * 3) / 90)


def test_cli_refuses_a_negative_disk_factor(tmp_path: Path) -> None:
    result = CliRunner().invoke(_bench_app(), ["simulate", "--out", str(tmp_path), "--disk-factor", "-1", "--quiet"])
    assert result.exit_code == 2 and "disk-factor" in result.output
    assert not (tmp_path / "simulate.json").exists()
