"""End to end: KVortexEngine instances sharing one Redis and one S3 bucket.

What one engine saves, another (a separate engine with its own cpu tier and index) finds through
the shared tier and loads byte for byte; and an engine keeps serving from cpu when its shared
tier dies or stalls, with the breaker taking the tier out of service.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvortex_core import KVortexConfig, KVortexEngine
from kvortex_core.data import kv_samples as ks

pytest.importorskip("redis")
pytest.importorskip("boto3")

L, B, N, H, D = 2, 64, 16, 2, 8
CHUNK = 32  # 2 blocks per chunk


@pytest.fixture(autouse=True)
def _quiet_pageable_warning(recwarn: pytest.WarningsRecorder) -> None:
    """The pinned pool warns that it is pageable without CUDA; expected here."""


def _config(shared: dict[str, Any], *, cpu: str = "1MiB", **kw: Any) -> KVortexConfig:
    return KVortexConfig(
        model_id="test/shared", chunk_tokens=CHUNK,
        tiers={"cpu": {"type": "cpu", "capacity": cpu}, "shared": {"write_through": True, **shared}},
        timeouts={"remote_lookup_s": 5.0, "backend_op_s": 5.0, "close_s": 5.0},
        circuit_breaker={"failure_threshold": 2, "reset_after_s": 60.0}, **kw)


def _wait_for(condition: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    """Poll a condition the background tiering makes true (write-behind, remote lookups)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {limit_s} s")
        time.sleep(0.05)


def _redis_tier(server: Any, prefix: str) -> dict[str, Any]:
    return {"type": "redis", "capacity": "32MiB", "url": server.url, "key_prefix": prefix,
            "socket_timeout": 1.0, "connect_timeout": 0.5, "retries": 0}


def _s3_tier(endpoint: str, bucket: str) -> dict[str, Any]:
    return {"type": "s3", "capacity": "32MiB", "bucket": bucket, "endpoint_url": endpoint,
            "region": "us-east-1", "list_cache_ttl": 0.2, "read_timeout": 1.0, "max_attempts": 1}


@pytest.fixture(params=["redis", "s3"])
def shared_tier(request: pytest.FixtureRequest, key_prefix: str) -> dict[str, Any]:
    if request.param == "redis":
        request.applymarker(pytest.mark.redis)
        return _redis_tier(request.getfixturevalue("redis_server"), key_prefix)
    request.applymarker(pytest.mark.s3)
    moto = request.getfixturevalue("moto_s3")
    return _s3_tier(moto.endpoint_url, moto.new_bucket())


def test_what_one_engine_saves_the_other_loads_byte_for_byte(shared_tier) -> None:  # type: ignore[no-untyped-def]
    src, _, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=1)
    dst, _, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=2)
    tokens = list(range(100, 100 + 3 * CHUNK))
    with KVortexEngine.create(_config(shared_tier)) as a, KVortexEngine.create(_config(shared_tier)) as b:
        a.register_kv_caches(src)
        b.register_kv_caches(dst)
        assert b.lookup(tokens) == 0
        assert a.save(tokens, list(range(6))) == 3 * CHUNK
        # b has never seen these chunks: only the shared tier can answer (write-behind, then
        # b's background contains refreshes its remote view).
        _wait_for(lambda: b.lookup(tokens) == 3 * CHUNK, "b seeing a's chunks")
        assert b.load(tokens, list(range(20, 26))) == 3 * CHUNK
    for s, d in zip(range(6), range(20, 26), strict=True):
        for layer in range(L):
            assert torch.equal(block(dst, layer, d), block(src, layer, s)), (s, d, layer)


@pytest.mark.redis
def test_engine_keeps_serving_with_redis_killed(make_redis, key_prefix) -> None:  # type: ignore[no-untyped-def]
    server = make_redis()
    caches, _, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=3)
    with KVortexEngine.create(_config(_redis_tier(server, key_prefix))) as engine:
        engine.register_kv_caches(caches)
        first = list(range(2 * CHUNK))
        assert engine.save(first, [0, 1, 2, 3]) == 2 * CHUNK
        server.kill()
        # Saves and loads go on from the cpu tier; write-behind to redis fails and is counted.
        for i in range(4):
            tokens = list(range(1000 * (i + 1), 1000 * (i + 1) + CHUNK))
            assert engine.save(tokens, [8 + 2 * i, 9 + 2 * i]) == CHUNK
        assert engine.lookup(first) == 2 * CHUNK
        assert engine.load(first, [40, 41, 42, 43]) == 2 * CHUNK
        assert all(torch.equal(block(caches, layer, d), block(caches, layer, s))
                   for s, d in zip([0, 1, 2, 3], [40, 41, 42, 43]) for layer in range(L))
        _wait_for(lambda: _counter(engine, "tier_errors") >= 2, "redis errors being counted")
        _wait_for(lambda: engine._registered().tiers.tier_states()["shared"] == "open", "breaker opening")


@pytest.mark.s3
def test_engine_keeps_serving_with_s3_stalling(fault_proxy, s3_bucket) -> None:  # type: ignore[no-untyped-def]
    tier = _s3_tier(fault_proxy.url, s3_bucket) | {"addressing_style": "path", "read_timeout": 0.3}
    caches, _, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=4)
    with KVortexEngine.create(_config(tier)) as engine:
        engine.register_kv_caches(caches)
        first = list(range(2 * CHUNK))
        assert engine.save(first, [0, 1, 2, 3]) == 2 * CHUNK
        fault_proxy.mode = "stall"
        for i in range(4):
            tokens = list(range(1000 * (i + 1), 1000 * (i + 1) + CHUNK))
            assert engine.save(tokens, [8 + 2 * i, 9 + 2 * i]) == CHUNK
        assert engine.lookup(first) == 2 * CHUNK
        assert engine.load(first, [40, 41, 42, 43]) == 2 * CHUNK
        assert all(torch.equal(block(caches, layer, d), block(caches, layer, s))
                   for s, d in zip([0, 1, 2, 3], [40, 41, 42, 43]) for layer in range(L))
        _wait_for(lambda: engine._registered().tiers.tier_states()["shared"] == "open", "breaker opening")
        fault_proxy.mode = "pass"  # lets close() finish quickly


def _counter(engine: KVortexEngine, name: str) -> int:
    counters = engine.stats()["counters"].get(name, {})
    return int(sum(counters.values())) if isinstance(counters, dict) else int(counters)


@pytest.mark.redis
def test_a_redis_key_holding_a_list_is_a_bad_payload_deleted_not_a_tier_failure(redis_server, key_prefix) -> None:  # type: ignore[no-untyped-def]
    """Another program's list under a chunk's key (a shared key_prefix): redis answers WRONGTYPE.
    That is a bad value, not a failing server: counted with the checksum failures, the key is
    deleted, the breaker stays closed (the breaker's threshold is 2; three such loads), the
    prompt is a miss, and the other prompts load byte for byte."""
    import redis

    src, _, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=5)
    dst, _, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=6)
    prompts = [list(range(7000 * (i + 1), 7000 * (i + 1) + CHUNK)) for i in range(4)]
    client = redis.Redis.from_url(redis_server.url)
    tier = _redis_tier(redis_server, key_prefix)
    with KVortexEngine.create(_config(tier)) as a, KVortexEngine.create(_config(tier)) as b:
        a.register_kv_caches(src)
        b.register_kv_caches(dst)
        for i, tokens in enumerate(prompts):
            assert a.save(tokens, [2 * i, 2 * i + 1]) == CHUNK
        _wait_for(lambda: all(b.lookup(t) == CHUNK for t in prompts), "b seeing a's chunks")
        foreign = [key_prefix + b.keys(t)[0].hex() for t in prompts[:3]]
        for name in foreign:
            client.delete(name)
            client.rpush(name, b"not a payload")
        for tokens in prompts[:3]:
            assert b.load(tokens, [40, 41]) == 0
        assert not any(client.exists(name) for name in foreign)
        assert _counter(b, "checksum_failures") == 3 and _counter(b, "tier_errors") == 0
        assert b._registered().tiers.tier_states()["shared"] == "closed"
        assert b.load(prompts[3], [50, 51]) == CHUNK
    for s, d in zip([6, 7], [50, 51], strict=True):
        assert all(torch.equal(block(dst, layer, d), block(src, layer, s)) for layer in range(L))


@pytest.mark.redis
def test_evictions_whose_redis_delete_failed_are_deleted_once_it_works_again(make_redis, key_prefix) -> None:  # type: ignore[no-untyped-def]
    """A failed delete of an evicted chunk used to be forgotten: Redis kept the value, the
    instance's capacity budget kept charging it, and once Redis worked again every write was
    refused for good (a red-team finding; here the ACL denies UNLINK for a while)."""
    import redis

    server = make_redis()
    admin = redis.Redis(host="127.0.0.1", port=server.port)
    caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=5)
    slot = 4096 + L * 2 * CHUNK * H * D * 2  # header + one chunk's payload (bf16)
    config = KVortexConfig(
        model_id="test/shared", chunk_tokens=CHUNK,
        tiers={"cpu": {"type": "cpu", "capacity": "256KiB"},
               "shared": {**_redis_tier(server, key_prefix), "capacity": 20 * slot, "write_through": True}},
        circuit_breaker={"failure_threshold": 1000})
    with KVortexEngine.create(config) as engine:
        engine.register_kv_caches(caches)
        tiers = engine._registered().tiers
        n = 0

        def save(count: int) -> None:
            nonlocal n
            for _ in range(count):
                engine.save([n * 100_000 + i for i in range(CHUNK)], [0, 1])
                n += 1
                assert tiers.drain(10)

        save(30)
        admin.execute_command("ACL", "SETUSER", "default", "-unlink")  # deletes fail for a while
        save(30)
        admin.execute_command("ACL", "SETUSER", "default", "+unlink")
        save(20)  # the failed deletes are retried with the first deletes now (a few writes racing
        refused = _counter(engine, "tier_writes_refused")  # them may still be refused)
        save(20)
        assert _counter(engine, "tier_writes_refused") == refused, "writes refused after Redis recovered"
        redis_keys = {k.decode().removeprefix(key_prefix) for k in admin.keys(f"{key_prefix}*")}
        assert redis_keys == {k.hex() for k in tiers.tiers[0].index.keys()}  # noqa: SIM118 - no orphan left



@pytest.mark.redis
def test_engines_with_other_chunk_sizes_on_one_store_never_take_each_others_partial_chunk(
        redis_server, key_prefix) -> None:  # type: ignore[no-untyped-def]
    """A prompt shorter than both chunk sizes: its partial chunk was keyed alike by engines with
    32- and 64-token chunks, though its stored shape differs; the other engine's lookup promised
    it, its load found a wrong shape, counted a checksum failure and deleted the first's value
    (a red-team finding). Now each keeps its own, and each loads its own bytes."""
    import redis

    src, _, block = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=5)
    dst, _, _ = ks.flash_attn(L, B, N, H, D, torch.bfloat16, seed=6)
    tokens = list(range(300, 324))  # 24 tokens: 2 blocks, under both chunk sizes
    client = redis.Redis.from_url(redis_server.url)
    tier = _redis_tier(redis_server, key_prefix)
    sources = {CHUNK: [0, 1], 2 * CHUNK: [2, 3]}  # each engine saves other blocks

    def engine(ct: int) -> KVortexEngine:
        return KVortexEngine.create(_config(tier, store_partial_chunks=True).model_copy(update={"chunk_tokens": ct}))

    for ct, ids in sources.items():
        with engine(ct) as e:
            e.register_kv_caches(src)
            assert e.save(tokens, ids) == 24
    _wait_for(lambda: len(client.keys(key_prefix + "*")) == 2, "both partial chunks written")
    for ct, ids in sources.items():
        with engine(ct) as e:  # a fresh engine: only the shared tier holds the chunk
            e.register_kv_caches(dst)
            _wait_for(lambda e=e: e.lookup(tokens) == 24, f"the {ct}-token engine seeing its chunk")
            assert e.load(tokens, [10, 11]) == 24
            assert _counter(e, "checksum_failures") == 0
        for layer in range(L):
            assert torch.equal(block(dst, layer, 10), block(src, layer, ids[0])), (ct, layer)
            assert torch.equal(block(dst, layer, 11)[:, :8], block(src, layer, ids[1])[:, :8]), (ct, layer)
    assert len(client.keys(key_prefix + "*")) == 2, "a partial chunk was deleted"
