"""Lower tiers under the connector: write-behind, async loads from disk, restart, shared Redis."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("vllm")

from vllm_harness import BLOCK, Harness, build

from kvortex_core.tiering.counters import FILE_CHECKS_GIVEN_UP, STALE_BLOCKS_REPORTED

pytestmark = pytest.mark.vllm

CHUNK = 32


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 131 + i * 7) % 900 + 10 for i in range(n)]


def tiers(tmp: Path, cpu: str = "64KiB", **extra: Any) -> dict[str, Any]:
    return {"tiers": {"cpu": {"type": "cpu", "capacity": cpu},
                      "disk": {"type": "disk", "capacity": "16MiB", "path": str(tmp / "disk"), "fsync": False},
                      **extra}}


def drain(h: Harness) -> None:
    for w in h.workers:
        assert w.connector.worker_side.tiers is not None
        assert w.connector.worker_side.tiers.mgr.drain(10.0)


def assert_kv(h: Harness, req_id: str, tokens: list[int], upto: int) -> None:
    for w in h.workers:
        assert torch.equal(h.kv_of(req_id, range(upto), w), h.expected_of(tokens, range(upto), w))


def evict_from_cpu(h: Harness, n: int) -> None:
    for i in range(n):
        h.add(f"filler{i}", prompt(500 + i, 2 * CHUNK + 1))
        h.run()
    drain(h)


def run_async_load(h: Harness, req_id: str, tokens: list[int]) -> list[Any]:
    h.add(req_id, tokens)
    for _ in range(2000):  # idle steps sleep 2 ms: background fetches get seconds
        h.step()
        if h.history and req_id in h.history[-1].scheduled:
            return h.history
    raise AssertionError(f"{req_id} was never scheduled")


def stored_below_only(tmp_path: Path, seed: int, cpu: str = "64KiB") -> tuple[Harness, Any, list[int]]:
    """An engine with cpu + disk tiers, and an 80-token prompt that was saved, written to disk
    and then evicted from the cpu tier: returns the harness, its scheduler side and the prompt."""
    h = build(tmp_path, tiers(tmp_path, cpu=cpu))
    side = h.connector.scheduler_side
    a = prompt(seed, 80)
    h.add("A", a)
    h.run()
    drain(h)
    evict_from_cpu(h, side.geometry.num_slots)
    return h, side, a


def stored_by_an_earlier_engine(tmp_path: Path, extra: dict[str, Any], tokens: list[int], **kw: Any) -> None:
    """An engine (same model directory: same keys) that saved ``tokens``, wrote them behind and
    shut down: what a restarted engine finds in the lower tiers."""
    first = build(tmp_path, extra, **kw)
    first.add("A", tokens)
    first.run()
    drain(first)
    first.close()


def test_chunk_evicted_from_cpu_is_loaded_back_from_disk(tmp_path: Path) -> None:
    h, side, a = stored_below_only(tmp_path, 1)
    assert not any(k in side.index for k in h.keys_of(a)), "A must be gone from the cpu tier"
    h.scrub()
    hist = run_async_load(h, "B", a[:70])
    assert any("B" in s.finished_recving for s in hist), "the async load was reported done"
    step = hist[-1]
    assert step.computed_before["B"] == 2 * CHUNK and step.scheduled["B"] == 70 - 2 * CHUNK
    assert_kv(h, "B", a, 2 * CHUNK)
    assert all(k in side.index for k in h.keys_of(a)), "fetched chunks are promoted to cpu"
    h.run()
    assert not side.index.open_pins()


def test_a_new_engine_finds_what_the_last_one_left_on_disk(tmp_path: Path) -> None:
    a = prompt(2, 80)
    stored_by_an_earlier_engine(tmp_path, tiers(tmp_path), a)
    h = build(tmp_path, tiers(tmp_path))
    hist = run_async_load(h, "B", a[:70])
    assert hist[-1].computed_before["B"] == 2 * CHUNK
    assert_kv(h, "B", a, 2 * CHUNK)


@pytest.mark.parametrize("when", ["before-lookup", "after-lookup"])
def test_lost_disk_file_is_a_failed_load_and_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           when: str) -> None:
    """A chunk's file gone before the scheduler looks (a rank evicted it, someone deleted it):
    the scheduler's view checks the file and promises only chunk 0. Gone after the look (the
    check is made to see it): the load fails, is reported, and the chunk is recomputed."""
    h, _, a = stored_below_only(tmp_path, 3)
    key1 = h.keys_of(a)[1].hex()
    lost = [p for p in (tmp_path / "disk").rglob("*.kv") if p.name.startswith(key1)]
    assert lost, "chunk 1 was written behind to disk"
    for p in lost:
        p.unlink()
    h.scrub()
    if when == "after-lookup":
        from kvortex_backends.disk import DiskBackend

        monkeypatch.setattr(DiskBackend, "files_present", lambda self, keys: [True] * len(keys))
    hist = run_async_load(h, "B", a[:70])
    if when == "after-lookup":
        assert any(s.invalid_blocks for s in hist), "the missing chunk's blocks are reported"
    else:
        assert not any(s.invalid_blocks for s in hist), "a chunk whose file is gone was promised"
        assert hist[-1].computed_before["B"] == CHUNK, "chunk 0 loaded, chunk 1 not promised"
    h.run()
    assert "B" in h.finished
    assert set(range(CHUNK, 2 * CHUNK)) <= set(h.computed_positions["B"])
    assert_kv(h, "B", a, 2 * CHUNK)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("tp", [1, 2])
def test_a_request_aborted_while_its_async_load_runs_writes_nothing_into_freed_blocks(
        tmp_path: Path, tp: int, async_scheduling: bool) -> None:
    """vLLM 0.15 frees the blocks of a request aborted in WAITING_FOR_REMOTE_KVS at once; the
    worker then copied the fetched chunks into them, over the request vLLM gave them to (a
    red-team finding: wrong KV). The connector now keeps those blocks until the load ended
    there (0.2x+ keep them themselves), and the workers never copy an aborted request's load."""
    h = build(tmp_path, tiers(tmp_path), tp=tp, num_blocks=16, async_scheduling=async_scheduling)
    side = h.connector.scheduler_side
    a = prompt(61, 2 * CHUNK + 1)
    h.add("A", a)
    h.run()
    drain(h)
    evict_from_cpu(h, side.geometry.num_slots)
    total = h.free_blocks()
    h.add("B", a)
    for _ in range(200):
        h.step()
        req = h.scheduler.requests.get("B")
        if req is not None and req.status.name == "WAITING_FOR_REMOTE_KVS":
            break
    else:
        pytest.fail("B never waited for an asynchronous load")
    h.abort("B")
    c = prompt(62, (h.free_blocks() - 1) * BLOCK)  # takes every block free now, B's included
    h.add("C", c, max_tokens=4)
    h.run()
    assert "C" in h.finished
    assert_kv(h, "C", c, len(c))
    for _ in range(50):  # the aborted load's report frees B's blocks and its cpu pins
        if h.free_blocks() == total and not side._async_pins:
            break
        h.step()
        time.sleep(0.01)
    assert h.free_blocks() == total and not side._async_pins


@pytest.mark.parametrize("tp", [1, 2])
def test_a_full_disk_tier_promises_none_of_the_chunks_it_evicted(tmp_path: Path, tp: int) -> None:
    """A disk tier at capacity (its steady state) evicts old chunks. The scheduler counted
    every chunk its ranks queued for it as stored, up to the whole tier's capacity in slots,
    and promised evicted ones: each an async load bound to fail (no fault injected; under
    vLLM's kv_load_failure_policy "fail", a failed request: a red-team finding). It now checks
    a chunk's files before it promises it."""
    probe = build(tmp_path / "probe", tiers(tmp_path / "probe"), tp=tp)
    slot = probe.connector.scheduler_side.geometry.slot_bytes
    probe.close()
    cfg = tiers(tmp_path)
    cfg["tiers"]["disk"]["capacity"] = f"{8 * slot * tp}B"  # 8 chunks per rank, 16 prompts of 2
    h = build(tmp_path, cfg, tp=tp)
    prompts = [prompt(100 + i, 2 * CHUNK + 1) for i in range(16)]
    for i, p in enumerate(prompts):
        h.add(f"W{i}", p)
        h.run()
        drain(h)
    held = [len(w.connector.worker_side.tiers.mgr.tiers[0].index) for w in h.workers]
    assert max(held) <= 8, held  # the disk tier evicted most of them
    n = len(h.history)
    for i in reversed(range(len(prompts))):  # newest first: each load promotes, and evicts
        h.add(f"R{i}", prompts[i])
        h.run()
        assert_kv(h, f"R{i}", prompts[i], 2 * CHUNK)
    assert not any(s.invalid_blocks for s in h.history[n:]), "a chunk the disk tier evicted was promised"
    assert any(s.loads for s in h.history[n:]), "what the disk tier kept is still served"
    h.close()


@pytest.mark.parametrize("delay_s", [0.0, 0.05])
def test_corrupt_fetch_is_reported_and_never_loaded_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delay_s: float
) -> None:
    """A chunk read back from disk fails its checksum. Its slot must never serve a later load,
    and the failure must reach the scheduler even when the slow read ends many steps after
    the plan (the block -> chunk map used to last 2 steps, and the bad bytes stayed in the
    slot behind a header naming the chunk, so the next request loaded them)."""
    from kvortex_vllm import lower

    fetch = lower.WorkerTiers._fetch

    async def slow(self: Any, key: bytes, slot: int) -> bool:  # a slow tier: ends steps later
        await asyncio.sleep(delay_s)
        return await fetch(self, key, slot)

    monkeypatch.setattr(lower.WorkerTiers, "_fetch", slow)
    h, _, a = stored_below_only(tmp_path, 3, cpu="128KiB")
    key1 = h.keys_of(a)[1]
    files = [p for p in (tmp_path / "disk").rglob("*.kv") if p.name.startswith(key1.hex())]
    assert files, "chunk 1 was written behind to disk"
    for p in files:  # the payload only: the header still names the chunk
        data = bytearray(p.read_bytes())
        data[-100] ^= 0xFF
        p.write_bytes(bytes(data))
    h.scrub()
    hist = run_async_load(h, "B", a[:70])
    assert any(s.invalid_blocks for s in hist), "the corrupt chunk's blocks are reported"
    h.run()
    assert "B" in h.finished
    assert_kv(h, "B", a, 2 * CHUNK)  # recomputed, then saved again
    h.scrub()
    h.add("C", a[:75])
    step = h.step()
    assert step.computed_before.get("C", 0) == 2 * CHUNK
    assert_kv(h, "C", a, 2 * CHUNK)  # what C got is B's recomputed chunk, not the corrupt bytes
    h.close()


def test_a_disk_value_too_long_for_any_slot_is_deleted_and_recomputed(tmp_path: Path) -> None:
    """A chunk's disk file grown past what any payload of its key can be (the tier answers
    BufferTooSmallError, a bad value): the load fails over to recompute, the file is deleted and
    counted as a bad payload (the tier stays in service), and a later request loads the
    recomputed chunk byte for byte."""
    h, _, a = stored_below_only(tmp_path, 3)
    key1 = h.keys_of(a)[1].hex()
    files = [p for p in (tmp_path / "disk").rglob("*.kv") if p.name.startswith(key1)]
    assert files, "chunk 1 was written behind to disk"
    for p in files:
        with p.open("ab") as f:
            f.write(bytes(4 << 20))
    grown = {p: p.stat().st_size for p in files}

    def still_grown() -> bool:  # deleted, or rewritten since by the recomputed chunk's write-behind
        return any(p.exists() and p.stat().st_size == size for p, size in grown.items())

    h.scrub()
    hist = run_async_load(h, "B", a[:70])
    assert any(s.invalid_blocks for s in hist), "the unusable chunk's blocks are reported"
    deadline = time.monotonic() + 10  # the delete runs on the tier loop (a slow read is reported first)
    while still_grown() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not still_grown(), "the unusable file is deleted"
    h.run()
    assert "B" in h.finished
    assert_kv(h, "B", a, 2 * CHUNK)
    h.scrub()
    h.add("C", a[:75])
    step = h.step()
    assert step.computed_before.get("C", 0) == 2 * CHUNK
    assert_kv(h, "C", a, 2 * CHUNK)
    h.close()


def test_one_step_never_plans_two_saves_into_one_slot(tmp_path: Path) -> None:
    """A cpu tier of two slots and three one-chunk requests in one step: a claim must not evict
    a chunk claimed earlier in the same plan (its slot then held two saves, and the requests
    whose save was overwritten never finished sending: their blocks leaked)."""
    h = build(tmp_path, {"tiers": {"cpu": {"type": "cpu", "capacity": 2 * 20480}},
                         "eviction": {"policy": "lru"}})
    side = h.connector.scheduler_side
    assert side.geometry.num_slots == 2
    plans: list[list[int]] = []
    build_plan = side.build_plan

    def recording(out: Any) -> Any:
        plan = build_plan(out)
        plans.append([spec.slot for spec in plan.saves])
        return plan

    side.build_plan = recording  # type: ignore[method-assign]
    free = h.free_blocks()
    for name, seed in (("A", 1), ("B", 2), ("C", 3)):
        h.add(name, prompt(seed, 40))
    h.run(30)
    assert sorted(h.finished) == ["A", "B", "C"]
    assert any(plans), "the step saved something"
    assert all(len(slots) == len(set(slots)) for slots in plans), plans
    assert h.free_blocks() == free, "every request's blocks came back"
    assert not h.workers[0].connector.worker_side._req_saves, "no save left pending on the worker"
    h.close()


def test_with_every_lower_tier_down_evicted_chunks_are_no_hit(tmp_path: Path) -> None:
    """A disk tier that cannot start (its path is under a file): chunks evicted from the cpu
    tier were never written, so a lookup must not promise them (each would be an async load
    bound to fail, then a recompute)."""
    (tmp_path / "file").write_text("not a directory")
    h = build(tmp_path, {"tiers": {"cpu": {"type": "cpu", "capacity": "64KiB"},
                                   "disk": {"type": "disk", "capacity": "16MiB",
                                            "path": str(tmp_path / "file" / "kv"), "fsync": False}}})
    side = h.connector.scheduler_side
    a = prompt(3, 80)
    h.add("A", a)
    h.run()
    for i in range(side.geometry.num_slots):
        h.add(f"filler{i}", prompt(500 + i, 2 * CHUNK + 1))
        h.run()
    assert side.stored_prefix(h.keys_of(a)[:2])[0] == 0, "nothing of A is in the cpu tier or below"
    h.scrub()
    h.add("B", a[:70])
    h.run()
    assert not any(s.finished_recving or s.invalid_blocks for s in h.history), "no async load planned"
    assert_kv(h, "B", a, 2 * CHUNK)
    h.close()


def test_an_async_hit_never_needs_more_slots_than_can_be_freed(tmp_path: Path) -> None:
    """Six chunks on disk (left by an engine with a larger cpu tier), a cpu tier of three
    slots: the hit is cut to what fits, so no chunk is planned into a slot that cannot exist
    (it used to get slot -1 and fail, every time)."""
    a = prompt(8, 6 * CHUNK + 1)
    stored_by_an_earlier_engine(tmp_path, tiers(tmp_path, cpu="1MiB"), a)
    h = build(tmp_path, tiers(tmp_path))
    slots = h.connector.scheduler_side.geometry.num_slots
    assert slots < 6
    hist = run_async_load(h, "B", a)
    h.run()
    assert not any(s.invalid_blocks for s in hist + h.history), "no load was planned to fail"
    loaded = next(s.computed_before["B"] for s in h.history if "B" in s.scheduled)
    assert 0 < loaded <= slots * CHUNK
    assert_kv(h, "B", a, 6 * CHUNK)
    h.close()


# ---------------------------------------------------------------------------------- redis


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("needs redis-server (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def redis_config(redis_url: str, cpu: str) -> dict[str, Any]:
    """A cpu tier over a write-through Redis tier; the scheduler may wait up to 5 s for Redis's
    answers (a loaded 2-core CI machine may take a while; the bound is tested elsewhere)."""
    return {"tiers": {"cpu": {"type": "cpu", "capacity": cpu},
                      "redis": {"type": "redis", "capacity": "16MiB", "url": redis_url, "write_through": True}},
            "timeouts": {"remote_lookup_s": 5.0}}


def saved_and_drained(h: Harness, req_id: str, tokens: list[int]) -> None:
    h.add(req_id, tokens)
    h.run()
    drain(h)


@pytest.mark.redis
def test_shared_redis_tier_serves_another_engine(tmp_path: Path, redis_url: str) -> None:
    shared = redis_config(redis_url, "1MiB")
    a = prompt(4, 80)
    writer = build(tmp_path, shared)
    saved_and_drained(writer, "A", a)
    reader = build(tmp_path, shared)
    hist = run_async_load(reader, "B", a[:70])
    assert hist[-1].computed_before["B"] == 2 * CHUNK
    assert_kv(reader, "B", a, 2 * CHUNK)


@pytest.mark.redis
@pytest.mark.parametrize("how", ["refused", "evicted"])
def test_our_own_write_the_shared_tier_does_not_hold_is_not_promised_once_it_could_answer(
        tmp_path: Path, redis_url: str, how: str) -> None:
    """The scheduler counts its own queued writes as stored (they land soon), but it used to do so
    for ever: a write Redis refused (full, no eviction) or a key it evicted or expired later was
    still promised, the load failed, and under vLLM's kv_load_failure_policy "fail" the request
    failed, again each time the prefix came back (a red-team finding). Where every lower tier is
    shared, a queued write now counts only for SHARED_WRITE_GRACE_S, then the tier answers."""
    import redis

    from kvortex_vllm.lower import SchedulerTiers

    client = redis.Redis.from_url(redis_url)
    if how == "refused":
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", 1)
    a = prompt(31, 100)
    h = build(tmp_path, redis_config(redis_url, "64KiB"))
    saved_and_drained(h, "A", a)
    if how == "evicted":
        assert client.dbsize() > 0
        client.flushall()  # as allkeys-lru eviction or a ttl would drop them
    assert client.dbsize() == 0
    evict_from_cpu(h, h.connector.scheduler_side.geometry.num_slots)
    time.sleep(SchedulerTiers.SHARED_WRITE_GRACE_S + 0.3)
    n = len(h.history)
    h.add("A2", a)
    h.run()
    assert not any(s.invalid_blocks for s in h.history[n:]), "a chunk Redis does not hold was promised"
    assert_kv(h, "A2", a, len(a))  # recomputed


def test_chunks_being_fetched_are_nobodys_hit_and_outlive_an_abort(tmp_path: Path) -> None:
    h, side, a = stored_below_only(tmp_path, 5)
    keys = h.keys_of(a)[:2]

    class Req:
        request_id = "X"
        prompt_token_ids = a[:70]

    assert side.get_num_new_matched_tokens(Req, 0) == (2 * CHUNK, True)
    side.update_state_after_alloc(Req, list(range(1, 6)), 2 * CHUNK)
    assert side.stored_prefix(keys)[0] == 0, "a slot being filled is not a hit for anyone"
    # aborted while its fetch is in flight: vLLM 0.15 (which frees the blocks of such a request
    # at once) is told to keep them until the workers report the load ended (0.2x+ keep them)
    from kvortex_vllm import compat

    assert side.request_finished(Req) is compat.frees_blocks_of_aborted_loads()
    assert side.index.open_pins(), "the slots stay pinned until the workers report the load"
    side.on_loads_finished({"X"})
    assert not side.index.open_pins()
    assert side.stored_prefix(keys) == (2, [True, True])


def test_async_only_when_a_chunk_to_load_is_below(tmp_path: Path) -> None:
    h = build(tmp_path, tiers(tmp_path, cpu="1MiB"))
    side = h.connector.scheduler_side
    a = prompt(6, 80)
    h.add("A", a)
    h.run()
    drain(h)
    keys = h.keys_of(a)[:2]
    side._on_evict(side.index.remove([keys[0]]))  # chunk 0 now only on disk, chunk 1 in cpu

    class Req:
        request_id = "Y"
        prompt_token_ids = a[:70]

    assert side.get_num_new_matched_tokens(Req, 0) == (2 * CHUNK, True), "chunk 0 must be read from disk"
    assert side.get_num_new_matched_tokens(Req, CHUNK) == (CHUNK, False), "vLLM holds chunk 0 itself"


def test_a_cache_reset_while_a_lower_tier_load_is_in_flight_reports_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load from disk already under way still lands the old KV: the connector's reset says it
    failed (as vLLM's own does while requests hold blocks); once the load ended, a retry works
    and nothing stored before is loaded again."""
    from kvortex_vllm import lower

    fetch = lower.WorkerTiers._fetch

    async def slow(self: Any, key: bytes, slot: int) -> bool:  # the reset lands while it runs
        await asyncio.sleep(0.3)
        return await fetch(self, key, slot)

    monkeypatch.setattr(lower.WorkerTiers, "_fetch", slow)
    h, side, a = stored_below_only(tmp_path, 5)
    h.scrub()
    h.add("B", a[:70])
    h.step()
    assert side._async_pins, "B waits for its chunks from disk"
    assert h.connector.reset_cache() is False
    h.run()  # B's load ends (it brings the old KV: the reset said it failed), B completes
    assert "B" in h.finished
    assert not side._async_pins
    assert h.connector.reset_cache() is True
    h.scrub()
    h.add("C", a[:70])
    step = h.step()
    assert step.loads == 0 and step.computed_before.get("C", 0) == 0
    h.run()
    assert not side.index.open_pins()


def test_a_timed_out_fetch_never_lets_its_late_bytes_into_another_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lower-tier read that times out goes on in its I/O thread (it cannot be stopped). Its
    slot was handed back to the scheduler with the failed load and reused for another chunk's
    save; the read's late payload then landed under that chunk's header, and the next load of
    the chunk passed the identity check and delivered another prompt's KV. A slot a late read
    may still write is now neither saved into nor loaded from on that rank until the read ended."""
    import threading

    from kvortex_backends.disk import DiskBackend
    from kvortex_core.data.payload import HEADER_BYTES
    from kvortex_vllm import lower

    gate, ended = threading.Event(), threading.Event()
    armed, late_slots = [False], set()
    real_get, real_fetch = DiskBackend.get, lower.WorkerTiers._fetch

    async def streaming_get(self: Any, key: str, out: memoryview) -> int | None:
        if not armed[0]:
            return await real_get(self, key, out)
        tmp = bytearray(len(out))
        n = await real_get(self, key, memoryview(tmp))
        if n is None:
            return None
        out[:HEADER_BYTES] = tmp[:HEADER_BYTES]  # the header arrives first, the payload hangs

        def rest() -> None:
            gate.wait(30)
            out[HEADER_BYTES:n] = tmp[HEADER_BYTES:n]
            ended.set()

        await asyncio.get_running_loop().run_in_executor(None, rest)
        return n

    async def recorded(self: Any, key: bytes, slot: int) -> bool:
        if armed[0]:
            late_slots.add(slot)
        return await real_fetch(self, key, slot)

    monkeypatch.setattr(DiskBackend, "get", streaming_get)
    monkeypatch.setattr(lower.WorkerTiers, "_fetch", recorded)
    extra = tiers(tmp_path, cpu="128KiB")
    extra["timeouts"] = {"backend_op_s": 0.2}
    h = build(tmp_path, extra)
    side = h.connector.scheduler_side
    a = prompt(7, 80)
    h.add("A", a)
    h.run()
    drain(h)
    evict_from_cpu(h, side.geometry.num_slots)
    a_keys = set(h.keys_of(a))
    armed[0] = True
    h.scrub()
    run_async_load(h, "B", a[:70])  # both chunks time out: a failed load, recomputed
    h.run()
    assert "B" in h.finished and late_slots
    armed[0] = False
    victim = None  # another prompt's chunk saved into a slot the late read still writes
    for i in range(4 * side.geometry.num_slots):
        filler = prompt(900 + i, 2 * CHUNK + 1)
        h.add(f"C{i}", filler)
        h.run()
        hit = [k for k in h.keys_of(filler)[:2] if k in side.index and h.slot_of(k) in late_slots]
        if hit and not a_keys & set(hit):
            victim = filler
            break
    assert victim is not None, "no later save was planned into a slot of the timed-out read"
    gate.set()
    assert ended.wait(10)
    time.sleep(0.1)  # the loop runs the read's completion
    h.scrub()
    h.add("D", victim[:2 * CHUNK + 1])
    h.run()
    assert "D" in h.finished
    assert_kv(h, "D", victim, 2 * CHUNK)  # its own KV (recomputed), never A's late bytes
    assert h.workers[0].connector.worker_side.stats.snapshot().counter("save_skipped_slot_busy", "cpu") > 0
    h.close()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("tp", "bad_rank"), [(1, 0), (2, 1)])
@pytest.mark.parametrize("below", [False, True])
def test_chunks_computed_over_a_failed_load_are_never_served(
    tmp_path: Path, tp: int, bad_rank: int, below: bool, async_scheduling: bool
) -> None:
    """B shares chunks 0-1 with A; chunk 1's slot is lost on one rank, so B's load of it fails
    while the same step computes B's chunks 2-3 over that chunk's garbage blocks (wrong KV, on
    every rank: attention reads the context, TP all-reduces). vLLM recomputes them, but the
    connector had saved them in that step and kept them (their keys were indexed, and written
    behind), so C, the same prompt, loaded them. Found by a red-team fuzzer (context-sensitive
    model, slot corruption)."""
    extra = tiers(tmp_path, cpu="1MiB") if below else {"tiers": {"cpu": {"type": "cpu", "capacity": "1MiB"}}}
    h = build(tmp_path, extra, tp=tp, context=True, async_scheduling=async_scheduling)
    skip_async_on_vllm_015(h)
    a = prompt(11, 100)
    h.add("A", a)
    h.run()
    k = h.keys_of(a)
    h.workers[bad_rank].connector.worker_side.pool.view(h.slot_of(k[1]))[:8].zero_()  # lost on one rank
    b = a[:2 * CHUNK] + prompt(12, 70)
    h.scrub()  # B's blocks hold no leftover of A: a failed load leaves garbage there
    h.add("B", b)
    h.step()  # B's load of chunk 1 fails on one rank; its chunks 2-3 are computed over it
    if below:
        drain(h)  # what the other rank saved of them is written behind before anything else
    h.run()
    assert h.tainted, "B's first forward ran over the failed chunk's blocks"
    assert "B" in h.finished
    if below:
        drain(h)
        evict_from_cpu(h, h.connector.scheduler_side.geometry.num_slots)  # C must read them from disk
    h.scrub()
    c = b[:4 * CHUNK + 1]
    if below:
        run_async_load(h, "C", c)
    else:
        h.add("C", c)
    h.run()
    assert "C" in h.finished
    assert_kv(h, "C", c, 4 * CHUNK)
    assert not h.kept_tainted, h.kept_tainted
    h.close()


def test_a_chunk_gone_below_after_a_restart_is_promised_once(tmp_path: Path) -> None:
    """Engine 2 indexes the disk that engine 1 left; chunk 0's file is then deleted. B's async
    load of it fails; the scheduler kept answering from its start-up view of the disk, vLLM asked
    again and B waited for ever (~1,500 failed loads in 3,000 steps). Now one failure, then B is
    recomputed."""
    a = prompt(13, 80)
    stored_by_an_earlier_engine(tmp_path, tiers(tmp_path), a)
    h = build(tmp_path, tiers(tmp_path))
    k0 = h.keys_of(a)[0].hex()
    files = [p for p in (tmp_path / "disk").rglob("*.kv") if p.name.startswith(k0)]
    assert files
    for p in files:
        p.unlink()
    h.add("B", a[:70])
    for _ in range(300):
        h.step()
        if "B" in h.finished:
            break
    assert "B" in h.finished, "B was promised the lost chunk again and again"
    assert sum("B" in s.finished_recving for s in h.history) <= 2
    assert_kv(h, "B", a, 2 * CHUNK)
    h.close()


def test_a_restarted_tp2_engine_finds_what_every_rank_left_on_disk(tmp_path: Path) -> None:
    """The scheduler opened the disk tier as rank 0 only: rank 1's files (under r1/) were never
    in its view, a chunk counts only when every rank has it, so after a restart with TP 2
    nothing on disk was ever a hit."""
    a = prompt(14, 80)
    extra = tiers(tmp_path, cpu="256KiB")
    stored_by_an_earlier_engine(tmp_path, extra, a, tp=2)
    h = build(tmp_path, extra, tp=2)
    hist = run_async_load(h, "B", a[:70])
    assert hist[-1].computed_before["B"] == 2 * CHUNK
    assert_kv(h, "B", a, 2 * CHUNK)
    h.close()


def test_a_request_sharing_the_failed_blocks_keeps_none_of_its_chunks(tmp_path: Path) -> None:
    """B loads chunks 0-1 from the connector; in the same step vLLM lets C share those blocks from
    its prefix cache, and C computes its chunks 2-3 over them. Chunk 1's load fails: C's chunks
    hold wrong KV. Only the loading request's chunks were dropped; C's were served to D.
    Found by a red-team probe."""
    h = build(tmp_path, prefix_caching=True, context=True)
    side = h.connector.scheduler_side
    a = prompt(21, 100)
    h.add("A", a)
    h.run()
    assert h.scheduler.reset_prefix_cache()  # vLLM forgets A's blocks; the connector keeps them
    h.workers[0].connector.worker_side.pool.view(h.slot_of(h.keys_of(a)[1]))[:8].zero_()
    h.scrub()
    b, c = a[:2 * CHUNK] + prompt(22, 3), a[:2 * CHUNK] + prompt(23, 70)
    h.add("B", b)
    h.add("C", c)
    h.run()
    assert any(r == "C" for _, r in h.tainted), "C forward ran over the failed blocks"
    assert {"B", "C"} <= h.finished
    assert h.scheduler.reset_prefix_cache()  # D must load from the connector
    h.scrub()
    h.add("D", c[:4 * CHUNK + 1])
    h.run()
    assert_kv(h, "D", c, 4 * CHUNK)
    assert not side.index.open_pins()
    h.close()


@pytest.mark.redis
def test_a_request_whose_async_load_failed_is_scheduled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    """vLLM 0.33 keeps a request whose asynchronous load failed among its in-flight prefills and
    reserves blocks for it against itself at its next asynchronous load, which then never fits:
    X (and Y behind it) waited for ever. After a failed load the connector offers X only cpu hits.
    Found by a red-team fuzzer (seed 141)."""
    from kvortex_vllm import lower

    real_fetch, fails = lower.WorkerTiers._fetch, []

    async def fails_once(self: Any, key: bytes, slot: int) -> bool:
        if not fails:
            fails.append(key)
            return False  # as a read that timed out
        return await real_fetch(self, key, slot)

    # 10 cpu slots; a shared tier, which still holds the chunk after the failed read
    cfg = {"tiers": {"cpu": {"type": "cpu", "capacity": "200KiB"},
                     "redis": {"type": "redis", "capacity": "64MiB", "url": redis_url}}}
    a = prompt(24, 250)
    stored_by_an_earlier_engine(tmp_path, cfg, a, num_blocks=24)
    h = build(tmp_path, cfg, num_blocks=24)
    monkeypatch.setattr(lower.WorkerTiers, "_fetch", fails_once)
    h.add("X", a)
    h.add("Y", prompt(25, 40))
    for _ in range(400):
        h.step()
        if {"X", "Y"} <= h.finished:
            break
    assert fails, "the first read from below failed"
    assert {"X", "Y"} <= h.finished, "X waited for ever after its failed asynchronous load"
    assert_kv(h, "X", a, 7 * CHUNK)
    h.close()


@pytest.mark.parametrize("tp", [1, 2])
def test_blocks_vllm_frees_after_a_failed_asynchronous_load_are_never_reported_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tp: int
) -> None:
    """W's asynchronous load from disk fails whole, so vLLM frees all of W's blocks while W waits
    (its next lookup put off, as while a shared tier's answer is on its way). L gets those blocks
    and loads its chunk 0 into them; L's chunk 1 then fails. The connector still held W's old
    block list and marked L's good chunk-0 blocks as garbage through it: the next step reported
    them stale and vLLM recomputed L from token 0 (found by a red-team fuzzer, vLLM 0.26 seeds
    5023, 5040-5045, 5062, 5134). Now W's list is dropped with its blocks."""
    from kvortex_vllm import lower
    from kvortex_vllm.scheduler import SchedulerSide

    cfg = tiers(tmp_path, cpu="1MiB")
    w_prompt = prompt(41, 4 * CHUNK + 1)
    stored_by_an_earlier_engine(tmp_path, cfg, w_prompt, tp=tp)  # W's chunks: on disk only
    h = build(tmp_path, cfg, tp=tp, prefix_caching=True, context=True, num_blocks=11)
    s, side = h.scheduler, h.connector.scheduler_side
    q = prompt(42, 2 * CHUNK + 5)
    h.add("Q", q)
    h.run()
    drain(h)
    assert s.reset_prefix_cache()
    h.workers[-1].connector.worker_side.pool.view(h.slot_of(h.keys_of(q)[1]))[:8].zero_()
    h.scrub()

    async def read_fails(self: Any, key: bytes, slot: int) -> bool:
        return False  # as a read that timed out

    monkeypatch.setattr(lower.WorkerTiers, "_fetch", read_fails)
    h.add("W", w_prompt)
    for _ in range(200):
        if "W" in s.failed_recving_kv_req_ids or h.step().invalid_blocks:
            break
    assert "W" in s.failed_recving_kv_req_ids or h.history[-1].invalid_blocks, "W's load failed"
    real_lookup, put_off = SchedulerSide.get_num_new_matched_tokens, [3]

    def put_off_w(self: Any, request: Any, computed: int) -> tuple[int | None, bool]:
        if request.request_id == "W" and put_off[0]:
            put_off[0] -= 1
            return None, False  # "ask again next step"
        return real_lookup(self, request, computed)

    monkeypatch.setattr(SchedulerSide, "get_num_new_matched_tokens", put_off_w)
    h.add("L", q, max_tokens=2)
    h.run()
    assert {"L", "W"} <= h.finished and not put_off[0]
    assert side.stats.snapshot().counter(STALE_BLOCKS_REPORTED, "cpu") == 0
    assert not set(range(CHUNK)) & set(h.computed_positions["L"]), "L's loaded chunk 0 was recomputed"
    assert not h.kept_tainted
    h.close()


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_failed_load_recomputed_over_several_steps_is_rolled_back_once(
    tmp_path: Path, async_scheduling: bool
) -> None:
    """B's load of chunk 0 fails and its recompute spans several steps (64-token budget). Under
    asynchronous scheduling the failure is reported again in the next step (recheck); that echo
    reached the scheduler side after B had recomputed the blocks, which marked them garbage again,
    reported them stale, and vLLM rolled B back every third step: B never finished (found by
    fuzzing). Echoes are no news to the scheduler side now."""
    h = build(tmp_path, {"tiers": {"cpu": {"type": "cpu", "capacity": "1MiB"}}}, context=True,
              async_scheduling=async_scheduling, max_batched=64)
    a = prompt(31, 100)
    h.add("A", a)
    h.run()
    h.workers[-1].connector.worker_side.pool.view(h.slot_of(h.keys_of(a)[0]))[:8].zero_()
    h.scrub()
    b = a[:3 * CHUNK] + prompt(32, 150)
    h.add("B", b)
    h.run(max_steps=40)  # B needs 5-8 steps; the livelock never ended
    assert "B" in h.finished
    assert h.tainted and not h.kept_tainted
    assert h.connector.scheduler_side.stats.snapshot().counter(STALE_BLOCKS_REPORTED, "cpu") == 0
    h.scrub()
    h.add("C", b[:7 * CHUNK + 1])
    h.run()
    assert_kv(h, "C", b, 7 * CHUNK)
    h.close()


def stored_then_corrupted(h: Any, chunk: int) -> list[int]:
    """A prompt computed and stored, vLLM's prefix cache reset, chunk ``chunk``'s cpu slot
    corrupted (last rank): its next load fails."""
    a = prompt(31, 100)
    h.add("A", a)
    h.run()
    assert h.scheduler.reset_prefix_cache()
    h.workers[-1].connector.worker_side.pool.view(h.slot_of(h.keys_of(a)[chunk]))[:8].zero_()
    h.scrub()
    return a


def assert_fresh_request_loads_good_kv(h: Any, tokens: list[int]) -> None:
    """With vLLM's prefix cache reset, a new request over ``tokens`` reads only what the
    connector kept: its 4 loaded chunks must be the true KV; then nothing stays pinned."""
    assert h.scheduler.reset_prefix_cache()
    h.scrub()
    h.add("D", tokens[:4 * CHUNK + 1])
    h.run()
    assert_kv(h, "D", tokens, 4 * CHUNK)
    assert not h.connector.scheduler_side.index.open_pins()
    h.close()


def skip_async_on_vllm_015(h: Harness) -> None:
    """vLLM 0.15 rolls a request back after a failed load by the tokens cached when it started,
    not by those computed before the failing step: under asynchronous scheduling it keeps what
    the next step computed over the garbage, and a second report (``StepPlan.recheck``) would
    roll back a request already recomputing. The connector does not recheck there."""
    if h.async_scheduling and not h.connector.scheduler_side._recheck:
        pytest.skip("vLLM 0.15 under asynchronous scheduling keeps a step computed over a failed load")


def assert_no_output_over_garbage(h: Any) -> None:
    """Every forward that ran over garbage was rolled back by vLLM (its result discarded, the
    blocks recomputed). Synchronous scheduling: those after the failing step ran over blocks
    vLLM handed out again (vLLM 0.26 handles an abort itself; 0.33 does not), counted."""
    assert h.tainted, "the scenario made no request compute over a failed load's blocks"
    assert not h.kept_tainted, f"vLLM kept results computed over garbage (step, request): {h.kept_tainted}"
    if h.async_scheduling:  # the step after the failing one ran over the garbage too (rechecked)
        return
    handed_back = [t for t in h.tainted if t[0] > h.tainted[0][0]]
    reported = h.connector.scheduler_side.stats.snapshot().counter(STALE_BLOCKS_REPORTED, "cpu")
    assert (reported > 0) == bool(handed_back), (reported, h.tainted)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_request_preempted_after_its_failed_load_recomputes_the_blocks_vllm_hands_back(
    tmp_path: Path, async_scheduling: bool
) -> None:
    """vLLM (0.26 and 0.33) hashes a synchronous load's blocks at allocation and, under the
    recompute policy, keeps them in its prefix cache when the load fails, for the loader to
    recompute. Preempted first (memory pressure, or a prefix-cache reset that preempts running
    requests), the loader is readmitted with its own failed blocks as a prefix-cache hit (found
    by fuzzing vLLM 0.26, seed 5053). The connector reports those blocks as failed loads in the
    readmission step, so vLLM discards what B computed over them and recomputes them: no result
    of B comes from garbage, and nothing computed over it is cached (D loads only good KV)."""
    import time as clock

    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    shape = getattr(FlashAttentionBackend, "get_kv_cache_shape", None)  # gone in 0.30+
    if shape is not None and len(shape(4, 16, 1, 8)) == 5:
        pytest.skip("vLLM 0.15: a preemption from outside schedule() breaks its step bookkeeping")
    h = build(tmp_path, prefix_caching=True, context=True, async_scheduling=async_scheduling)
    skip_async_on_vllm_015(h)
    a = stored_then_corrupted(h, 0)
    b = a[:3 * CHUNK] + prompt(32, 40)
    h.add("B", b, max_tokens=5)
    h.step()  # B's load of chunk 0 fails (vLLM 0.15 reports it otherwise than through invalid blocks)
    s = h.scheduler
    req = s.requests["B"]
    if req in s.running:  # a synchronous load (every chunk in the cpu tier): preempt it now
        s.running.remove(req)
        kwargs = {}  # as schedule() preempts under memory pressure (vLLM 0.33)
        if "drop_stale_output" in inspect.signature(s._preempt_request).parameters:
            kwargs["drop_stale_output"] = s.requires_kv_delivery
        s._preempt_request(req, clock.monotonic(), **kwargs)
    h.run()
    assert "B" in h.finished
    assert_no_output_over_garbage(h)
    assert_fresh_request_loads_good_kv(h, b)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("tp", [1, 2])
def test_blocks_a_failed_load_left_are_never_cached_after_its_request_is_aborted(
    tmp_path: Path, shared: bool, tp: int, async_scheduling: bool
) -> None:
    """vLLM 0.33 recovers from a failed load by letting the loading request recompute the failed
    blocks: it keeps them in its prefix cache and as computed for requests sharing them. B is
    aborted first, so vLLM hands C the garbage blocks as computed (``shared``: C shared them in
    B's step; else C arrives later with B's prompt). Found by a red-team fuzzer (seeds 2042,
    2047, 2088): the connector cached what C computed, and D (C's prompt, vLLM's prefix cache
    reset) loaded it. Now the connector reports those blocks as failed loads in C's step, so
    vLLM discards what C computed over them and recomputes them, and caches none of it."""
    h = build(tmp_path, prefix_caching=True, context=True, tp=tp, async_scheduling=async_scheduling)
    skip_async_on_vllm_015(h)
    a = stored_then_corrupted(h, 0 if shared else 1)
    b = a[:2 * CHUNK] + prompt(32, 3 if shared else 70)
    c = a[:2 * CHUNK] + prompt(33, 70) if shared else list(b)
    h.add("B", b, max_tokens=5)
    if shared:
        h.add("C", c)
    h.step()  # B's load fails; vLLM keeps the failed blocks for B to recompute
    h.abort("B")
    if not shared:
        h.run()
        h.add("C", c)
    h.run()
    assert "C" in h.finished
    assert_no_output_over_garbage(h)
    assert_fresh_request_loads_good_kv(h, c)


def test_a_second_server_on_the_same_disk_directory_promises_nothing_from_it_until_it_takes_over(
    tmp_path: Path,
) -> None:
    """Two vLLM servers configured with one disk path, both running. The first owns every rank's
    directory (the disk tier's flock, with its engine id); the second's ranks cannot open it,
    and its scheduler's view (an observer) sees the directories held for another engine: it
    promises none of the first server's files and none of its own write-behind (which cannot
    land), so no load is planned that must fail (under vLLM's default ``kv_load_failure_policy``
    "fail" that would fail the request). Once the first server stops, the second's ranks and
    view take the directories over and serve what the first left there."""
    a = prompt(21, 80)
    cfg = {**tiers(tmp_path, cpu="256KiB"), "circuit_breaker": {"reset_after_s": 0.1}}
    first = build(tmp_path, cfg, tp=2)
    first.add("A", a)
    first.run()
    drain(first)
    files = sorted(p.name for p in (tmp_path / "disk").rglob("*.kv"))
    assert files, "A was written behind to disk"
    second = build(tmp_path, cfg, tp=2)
    view = second.connector.scheduler_side.tiers
    assert view is not None and set(view.mgr.tier_states().values()) == {"open"}
    for w in second.workers:
        disk = w.connector.worker_side.tiers.mgr.tiers[0]
        # out of service: open, or half-open while a background retry probes (reset_after_s 0.1)
        assert disk.breaker.state in ("open", "half_open"), disk.breaker.state
        assert "in use by another engine" in disk.breaker.last_error
    side = second.connector.scheduler_side
    second.add("B", a[:70])
    second.run()
    assert not any("B" in s.finished_recving for s in second.history), "a load from the owned disk"
    assert_kv(second, "B", a, 64)  # recomputed
    evict_from_cpu(second, side.geometry.num_slots)  # B's chunks leave the cpu tier, never written below
    # A clock that runs 1 s per reading: the view's disk tier, out of service, is always past
    # reset_after_s ("available": its next probe may run) but still fails each probe. Its own
    # queued writes were promised in that window (a CI failure, once in many runs).
    ticks = itertools.count(time.monotonic(), 1.0)
    view.mgr.tiers[0].breaker._clock = lambda: next(ticks)
    second.add("C", a[:70])
    second.run()
    assert not any("C" in s.finished_recving for s in second.history), "its own write-behind promised"
    assert sorted(p.name for p in (tmp_path / "disk").rglob("*.kv")) == files
    first.close()
    deadline = time.monotonic() + 10
    while set(view.mgr.tier_states().values()) != {"closed"} or any(
            w.connector.worker_side.tiers.mgr.tier_states() != {"disk": "closed"} for w in second.workers):
        assert time.monotonic() < deadline, "the second server never took the directories over"
        second.step()
        time.sleep(0.02)
    hist = run_async_load(second, "D", a[:70])
    assert hist[-1].computed_before["D"] == 2 * CHUNK, "what the first server left is served"
    assert_kv(second, "D", a, 2 * CHUNK)
    second.close()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_data_parallel_engines_on_one_node_each_own_their_disk_directories(tmp_path: Path, kind: str) -> None:
    """Two data-parallel engines (TP 2 each) with one configuration: every engine's ranks are
    numbered from 0, so both used to ask for the same directories; engine 1 now has its own
    (``dp1/r<rank>``; engine 0 keeps the plain layout), each owns its own, and engine 1 serves
    from its own after a restart. vLLM runs a dense model's engines as independent ones (data
    parallel size 1, rank 0): only ``data_parallel_index`` tells them apart."""
    a = prompt(23, 80)
    cfg = tiers(tmp_path, cpu="256KiB")
    engines = [build(tmp_path, cfg, tp=2, dp=(k, 2, kind)) for k in range(2)]
    for h in engines:
        for w in h.workers:
            assert w.connector.worker_side.tiers.mgr.tier_states() == {"disk": "closed"}
    engines[1].add("A", a)
    engines[1].run()
    drain(engines[1])
    ns = next((tmp_path / "disk").iterdir())
    assert sorted(p.name for p in ns.iterdir()) == ["dp1", "r0", "r1"]
    assert sorted(p.name for p in (ns / "dp1").iterdir()) == ["r0", "r1"]
    assert list((ns / "dp1").rglob("*.kv")) and not list((ns / "r0").rglob("*.kv"))
    for h in engines:
        h.close()
    again = build(tmp_path, cfg, tp=2, dp=(1, 2, kind))  # data-parallel engine 1 restarted
    hist = run_async_load(again, "B", a[:70])
    assert hist[-1].computed_before["B"] == 2 * CHUNK
    assert_kv(again, "B", a, 2 * CHUNK)
    again.close()


def test_worker_shutdown_with_a_hung_tier_waits_close_s_once(tmp_path: Path, monkeypatch: Any) -> None:
    """Write-behind to a tier whose writes hang: the worker's shutdown drained for close_s, then
    the tier manager's close drained again for close_s (2 x the documented bound; a red-team
    finding, 8.0 s for close_s = 4). Now the drain runs once."""
    from kvortex_backends.disk import DiskBackend

    async def hung_put(self: Any, key: str, data: Any) -> None:
        await asyncio.sleep(60)

    monkeypatch.setattr(DiskBackend, "put", hung_put)
    close_s = 2.0
    extra = tiers(tmp_path)
    extra["timeouts"] = {"backend_op_s": 30.0, "close_s": close_s}
    h = build(tmp_path, extra)
    h.add("A", prompt(3, 80))
    h.run()
    worker = h.workers[0].connector
    tiers_ = worker.worker_side.tiers
    assert tiers_ is not None and tiers_.mgr.tiers[0].queue.pending > 0  # writes still hanging
    t0 = time.monotonic()
    worker.shutdown()
    took = time.monotonic() - t0
    assert close_s <= took < 1.6 * close_s, took


def test_a_disk_tier_on_a_hung_mount_never_stalls_the_scheduler(tmp_path: Path, monkeypatch: Any,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The scheduler checks a local tier's files (a stat per chunk) before it promises them. On a
    hung mount (a stalled NFS server) that stat never returns: it ran on the scheduler's thread,
    so vLLM's whole scheduler hung with it. Now the look runs on a thread of its own, waited for
    ``timeouts.remote_lookup_s``: the request is served by recomputing, one thread is stuck (not
    one per step), and once the mount answers again the chunks are promised again."""
    from kvortex_backends.disk import DiskBackend

    h, side, a = stored_below_only(tmp_path, 7)
    real = DiskBackend.files_present
    hung, calls = threading.Event(), []

    def stalled(self: DiskBackend, keys: Any) -> list[bool]:
        calls.append(len(keys))
        hung.wait(60)  # what a stat on a hung mount does
        return real(self, keys)

    monkeypatch.setattr(DiskBackend, "files_present", stalled)
    caplog.set_level("WARNING", logger="kvortex_vllm.lower")
    t0 = time.monotonic()
    hist = run_async_load(h, "B", a[:70])
    took = time.monotonic() - t0
    assert took < 10, f"the scheduler waited {took:.1f} s for a stat"
    assert hist[-1].computed_before["B"] == 0, "chunks on a mount that does not answer were promised"
    h.run()
    assert "B" in h.finished
    assert set(range(2 * CHUNK)) <= set(h.computed_positions["B"]), "B recomputed both chunks"
    assert_kv(h, "B", a, 2 * CHUNK)
    assert len(calls) == 1, f"a look was started at every step while the first one hung: {calls}"
    assert side.stats.snapshot().counter(FILE_CHECKS_GIVEN_UP, "disk") == 1
    assert sum("event=file_check_slow" in r.getMessage() and "tier=disk" in r.getMessage()
               for r in caplog.records) == 1

    hung.set()  # the mount answers again
    deadline = time.monotonic() + 10
    while not side.tiers._looks["disk"]._stuck.done.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    monkeypatch.setattr(DiskBackend, "files_present", real)
    evict_from_cpu(h, side.geometry.num_slots)  # B's chunks (saved again) leave the cpu tier too
    hist = run_async_load(h, "C", a[:70])
    assert hist[-1].computed_before["C"] == 2 * CHUNK, "the chunks were not promised once the mount answered"
    h.run()
    assert "C" in h.finished
    assert_kv(h, "C", a, 2 * CHUNK)
    assert any("event=file_check_recovered" in r.getMessage() for r in caplog.records)
    h.close()


def _scheduler_view(tmp_path: Path, tp: int = 1) -> Any:
    """The scheduler's view of a real disk tier, as the connector builds it."""
    from kvortex_core.config import KVortexConfig
    from kvortex_vllm.lower import scheduler_tiers

    cfg = KVortexConfig.model_validate({**tiers(tmp_path, cpu="64KiB"), "timeouts": {"remote_lookup_s": 0.05}})
    view = scheduler_tiers(cfg, b"n" * 32, (2, 4), torch.float16, 4096, tp)
    deadline = time.monotonic() + 10
    while not all(t.in_service for t in view.mgr.tiers) and time.monotonic() < deadline:
        time.sleep(0.01)
    return view


def test_a_slow_mount_serves_the_leading_chunks_answered_in_time(tmp_path: Path, monkeypatch: Any) -> None:
    """A working but slow mount (2 ms a stat): a lookup of 200 chunks waits about
    ``remote_lookup_s``, not 0.4 s, promises the leading chunks answered by then (a look used to
    be all or nothing, so such a mount never served a long prompt), and later lookups extend
    the run until every chunk is promised. No queued write is forgotten on the way."""
    from kvortex_backends.disk import DiskBackend

    def slow(self: DiskBackend, keys: Any) -> list[bool]:
        time.sleep(0.002 * len(keys))
        return [True] * len(keys)

    monkeypatch.setattr(DiskBackend, "files_present", slow)
    view = _scheduler_view(tmp_path)
    keys = [bytes([i % 256, i // 256]) * 16 for i in range(200)]
    for k in keys:
        view.note_written(k)
    t0 = time.monotonic()
    first = view.present(keys, [True] * len(keys))
    took = time.monotonic() - t0
    assert took < 0.3, f"the lookup waited {took:.2f} s"
    lead = first.index(False) if False in first else len(first)  # the run the caller uses
    assert 0 < lead < len(keys), f"leading run of {lead} chunks"

    runs = [lead]
    deadline = time.monotonic() + 20
    while runs[-1] < len(keys) and time.monotonic() < deadline:
        time.sleep(0.02)
        out = view.present(keys, [True] * len(keys))
        runs.append(out.index(False) if False in out else len(out))
    assert runs[-1] == len(keys), f"leading runs {runs}"
    assert len(view.written) == len(keys), "an unanswered chunk lost its queued write"
    view.close()


def test_a_files_present_that_raises_or_miscounts_is_a_miss_not_a_scheduler_error(
        tmp_path: Path, monkeypatch: Any, caplog: pytest.LogCaptureFixture) -> None:
    from kvortex_backends.disk import DiskBackend

    view = _scheduler_view(tmp_path)
    keys = [bytes([i]) * 32 for i in range(3)]
    for k in keys:
        view.note_written(k)
    caplog.set_level("WARNING", logger="kvortex_vllm.lower")
    for bad in (lambda self, ks: (_ for _ in ()).throw(RuntimeError("plugin bug")),
                lambda self, ks: [True] * (len(ks) + 1)):
        monkeypatch.setattr(DiskBackend, "files_present", bad)
        assert not view.present(keys, [True] * 3)[0], "a chunk nobody answered for was promised"
        assert len(view.written) == 3, "nothing was found missing: the queued writes stay"
    assert any("event=file_check_failed" in r.getMessage() for r in caplog.records)
    view.close()
