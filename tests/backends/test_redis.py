"""The redis backend against a real redis-server: conformance, layout, TTL, parts, options."""

from __future__ import annotations

import asyncio
import os
import re
from typing import Any

import pytest

from kvortex_backends.redis import RedisBackend, RedisOptions
from kvortex_core.errors import BackendError, BackendFullError, BadValueError, BufferTooSmallError
from kvortex_core.storage.protocol import BackendContext
from kvortex_core.testing import BackendConformance, run_scenario

pytestmark = pytest.mark.redis
redis = pytest.importorskip("redis")

MiB = 1024 * 1024


def make_backend(capacity: int = 256 * MiB, **options: Any) -> RedisBackend:
    return RedisBackend(RedisOptions(**options), capacity=capacity, context=BackendContext(tier="shared"))


run = run_scenario  # open, run the scenario, always close


class TestRedisConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self, redis_server, key_prefix):  # type: ignore[no-untyped-def]
        return lambda capacity: make_backend(capacity, url=redis_server.url, key_prefix=key_prefix)


class TestRedisPartsConformance(BackendConformance):
    """The same contract when large payloads are written as MULTI/EXEC parts."""

    @pytest.fixture
    def backend_factory(self, redis_server, key_prefix):  # type: ignore[no-untyped-def]
        return lambda capacity: make_backend(capacity, url=redis_server.url, key_prefix=key_prefix,
                                             part_bytes=16 * 1024)


class TestRedisUncoalescedConformance(BackendConformance):
    """The same contract with every get on its own pooled connection."""

    sizes = (1, 65537)

    @pytest.fixture
    def backend_factory(self, redis_server, key_prefix):  # type: ignore[no-untyped-def]
        return lambda capacity: make_backend(capacity, url=redis_server.url, key_prefix=key_prefix,
                                             coalesce_gets=False)


def test_coalesced_gets_keep_per_key_results_and_errors(redis_server, key_prefix) -> None:
    values = {f"c{i}": os.urandom(1000 + i) for i in range(12)}

    async def scenario(b: RedisBackend) -> None:
        for k, v in values.items():
            await b.put(k, v)
        outs = {k: bytearray(len(v)) for k, v in values.items()}
        small = bytearray(10)
        await b._require().rpush(b._name("listed"), b"x")  # another program's list under a key
        results = await asyncio.gather(
            *(b.get(k, memoryview(o)) for k, o in outs.items()),
            b.get("absent", memoryview(bytearray(10))),
            b.get("c0", memoryview(small)),
            b.get("listed", memoryview(bytearray(10))),
            return_exceptions=True,
        )
        assert results[:12] == [len(v) for v in values.values()]
        assert all(bytes(outs[k]) == v for k, v in values.items())
        assert results[12] is None
        assert isinstance(results[13], BufferTooSmallError)
        assert isinstance(results[14], BadValueError) and "'listed'" in str(results[14])
        assert "WRONGTYPE" in str(results[14]) and not isinstance(results[14], BufferTooSmallError)
        many = b.get_many(["c1", "listed"], [memoryview(bytearray(2000)), memoryview(bytearray(10))])
        with pytest.raises(BadValueError, match="get_many 'listed'"):
            await many
        # A waiter cancelled mid-batch (the engine's timeout) leaves the others intact.
        tasks = [asyncio.ensure_future(b.get(k, memoryview(bytearray(2000)))) for k in values]
        await asyncio.sleep(0)
        tasks[0].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[0], asyncio.CancelledError)
        assert done[1:] == [len(v) for v in list(values.values())[1:]]

    run(make_backend(url=redis_server.url, key_prefix=key_prefix), scenario)


def test_one_key_per_payload_under_prefix(redis_server, key_prefix) -> None:
    value = os.urandom(200_000)

    async def scenario(b: RedisBackend) -> None:
        await b.put("ab" * 20, value)

    run(make_backend(url=redis_server.url, key_prefix=key_prefix, part_bytes=65536), scenario)
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.keys(f"{key_prefix}*") == [f"{key_prefix}{'ab' * 20}".encode()]
    assert raw.get(f"{key_prefix}{'ab' * 20}") == value  # the whole payload, header and all


def test_ttl_sets_expiry_and_ledger_follows(redis_server, key_prefix) -> None:
    async def scenario(b: RedisBackend) -> None:
        await b.put("k1", b"v" * 100)
        ttl_ms = redis.Redis.from_url(redis_server.url).pttl(f"{key_prefix}k1")
        assert 0 < ttl_ms <= 60_000
        big = os.urandom(100_000)
        await b.put("k2", big)  # parts keep the TTL of the first SET
        assert 0 < redis.Redis.from_url(redis_server.url).pttl(f"{key_prefix}k2") <= 60_000

    run(make_backend(url=redis_server.url, key_prefix=key_prefix, ttl=60, part_bytes=30_000), scenario)


def test_expired_key_is_a_miss_and_uncharged(redis_server, key_prefix) -> None:
    async def scenario(b: RedisBackend) -> None:
        await b.put("gone", b"x" * 1000)
        redis.Redis.from_url(redis_server.url).pexpire(f"{key_prefix}gone", 1)
        await asyncio.sleep(0.05)
        assert await b.get("gone", memoryview(bytearray(1000))) is None
        assert (await b.usage()).used == 0

    run(make_backend(url=redis_server.url, key_prefix=key_prefix), scenario)


def test_keys_of_other_writers_are_visible_but_not_charged(redis_server, key_prefix) -> None:
    redis.Redis.from_url(redis_server.url).set(f"{key_prefix}theirs", b"t" * 500)

    async def scenario(b: RedisBackend) -> None:
        assert await b.contains(["theirs", "nobody"]) == [True, False]
        out = bytearray(500)
        assert await b.get("theirs", memoryview(out)) == 500 and bytes(out) == b"t" * 500
        assert (await b.usage()).used == 0

    run(make_backend(url=redis_server.url, key_prefix=key_prefix), scenario)


def test_batch_put_get_pipelined(redis_server, key_prefix) -> None:
    values = {f"b{i}": os.urandom(10_000 + i) for i in range(20)}

    async def scenario(b: RedisBackend) -> None:
        await b.put_many(list(values.items()))
        outs = [memoryview(bytearray(20_000)) for _ in values]
        sizes = await b.get_many([*values, "missing"], [*outs, memoryview(bytearray(1))])
        assert sizes[-1] is None
        for (k, v), n, out in zip(values.items(), sizes, outs):
            assert n == len(v) and bytes(out[:n]) == v, k
        assert (await b.usage()).items == len(values)
        with pytest.raises(BackendFullError):
            await b.put_many([("huge", b"z" * (b.capacity + 1))])
        assert (await b.usage()).items == len(values)

    run(make_backend(url=redis_server.url, key_prefix=key_prefix), scenario)


def test_server_oom_is_backend_full(make_redis, key_prefix) -> None:
    server = make_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")

    async def scenario(b: RedisBackend) -> None:
        with pytest.raises(BackendFullError, match="maxmemory-policy"):
            for i in range(20):
                await b.put(f"k{i}", os.urandom(500_000))

    run(make_backend(url=server.url, key_prefix=key_prefix), scenario)


def test_evicted_under_maxmemory_is_a_miss(make_redis, key_prefix) -> None:
    server = make_redis("--maxmemory", "4mb", "--maxmemory-policy", "allkeys-lru")

    async def scenario(b: RedisBackend) -> None:
        values = {f"k{i}": os.urandom(400_000) for i in range(30)}
        for k, v in values.items():
            await b.put(k, v)
        present = await b.contains(list(values))
        assert not all(present) and any(present)
        found = []
        for (k, v), hit in zip(values.items(), present):
            out = bytearray(len(v))
            n = await b.get(k, memoryview(out))
            # a key present a moment ago may be evicted since (the server's reply buffers count
            # against maxmemory too): a miss then, never other bytes
            assert n is None if not hit else (n is None or (n == len(v) and bytes(out) == v))
            found.append(n is not None)
        assert any(found)
        assert (await b.usage()).items == sum(found)  # evicted keys are no longer charged

    run(make_backend(url=server.url, key_prefix=key_prefix), scenario)


def test_acl_auth_and_url_password_is_moved_out(make_redis, key_prefix) -> None:
    server = make_redis("--user", "alice", "on", ">wonder", "~*", "&*", "+@all",
                        "--user", "default", "off", username="alice", password="wonder")
    opts = RedisOptions(url=f"redis://alice:wonder@127.0.0.1:{server.port}/0", key_prefix=key_prefix)
    assert "wonder" not in opts.url and "wonder" not in repr(opts)
    assert opts.username == "alice" and opts.password.get_secret_value() == "wonder"
    backend = RedisBackend(opts, capacity=MiB, context=BackendContext())

    async def scenario(b: RedisBackend) -> None:
        await b.put("k", b"secret payload")
        out = bytearray(64)
        assert await b.get("k", memoryview(out)) == 14

    run(backend, scenario)
    bad = make_backend(url=f"redis://127.0.0.1:{server.port}/0", username="alice", password="nope")
    with pytest.raises(BackendError) as err:
        asyncio.run(bad.open())
    assert "nope" not in str(err.value)
    asyncio.run(bad.close())


def test_options_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="redis://"):
        RedisOptions(url="http://127.0.0.1:6379")
    with pytest.raises(ValueError) as err:  # the whole URL is named, its password masked
        RedisOptions(url="http://u:hunter6@h:1/0")
    msg = err.value.errors()[0]["msg"]  # what the config error quotes (it masks its input too)
    assert "url 'http://u:********@h:1/0' must start with redis://" in msg and "hunter6" not in msg
    with pytest.raises(ValueError):
        RedisOptions(urls="redis://x")  # typo: unknown option
    with pytest.raises(ValueError):
        RedisOptions(cluster=[])
    for url, what in (("redis://h:6379/cache", "database number such as /0, not 'cache'"),  # was db 0
                      ("redis://u:pw@h:99999/0", "'redis://u:********@h:99999/0': the port must be"),
                      ("redis://", "names no host")):
        with pytest.raises(ValueError, match=re.escape(what)):
            RedisOptions(url=url)
    # a file of another machine: a note for `config validate`, an error when the tier opens
    tls = RedisOptions(url="rediss://h:6380/0", ssl_ca_certs="/nonexistent/ca.pem")
    assert tls.machine_notes() == [("ssl_ca_certs '/nonexistent/ca.pem' is not a file here; give the path of "
                                    "the PEM file")]
    with pytest.raises(BackendError, match="ssl_ca_certs '/nonexistent/ca.pem' is not a file here"):
        asyncio.run(RedisBackend(tls, capacity=1 << 20, context=BackendContext()).open())
    for ttl in (0, 0.0005):  # Redis counts milliseconds: PX 0 refused every write
        with pytest.raises(ValueError, match="ttl"):
            RedisOptions(ttl=ttl)
    for part in (0, -1, 512):  # 0 used to be accepted
        with pytest.raises(ValueError, match="part_bytes"):
            RedisOptions(part_bytes=part)
    assert RedisOptions(part_bytes="4MiB").part_bytes == 4 * MiB
    # two different passwords (one in the URL): refused without quoting either (one was dropped)
    with pytest.raises(ValueError) as err:
        RedisOptions(url="redis://me:topsecret@h:1/0", password="pw2")
    msg = err.value.errors()[0]["msg"]  # what the config error quotes (masking its input)
    assert "keep one of them" in msg and "topsecret" not in msg and "pw2" not in msg
    same = RedisOptions(url="redis://me:pw@h:1/0", password="pw")
    assert same.password.get_secret_value() == "pw" and "pw@" not in same.url


def test_unreachable_server_raises_backend_error_promptly(unused_port) -> None:
    backend = make_backend(url=f"redis://127.0.0.1:{unused_port}/0", connect_timeout=1)
    with pytest.raises(BackendError, match="127.0.0.1"):
        asyncio.run(backend.open())
    assert not asyncio.run(backend.health()).ok
    asyncio.run(backend.close())


def test_plugin_registers_redis() -> None:
    from kvortex_core.plugins.manager import PluginManager

    info = PluginManager().backend("redis")
    assert info.cls is RedisBackend and info.cls.shared


def test_tier_config_validates_redis_and_s3_options(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from kvortex_core import KVortexConfig
    from kvortex_core.errors import ConfigError

    monkeypatch.setenv("KVORTEX_TIERS__SHARED__PASSWORD", "from-env")
    cfg = KVortexConfig(tiers={
        "cpu": {"type": "cpu", "capacity": "1GiB"},
        "shared": {"type": "redis", "capacity": "8GiB", "url": "rediss://kv:6380/0", "ttl": 60},
        "cold": {"type": "s3", "capacity": "1TiB", "bucket": "kv-bucket", "prefix": "m/"},
    })
    assert cfg.tiers["shared"].options["password"] == "from-env"
    with pytest.raises(ConfigError) as err:
        KVortexConfig(tiers={"cpu": {"type": "cpu", "capacity": "1GiB"},
                             "shared": {"type": "redis", "capacity": "8GiB", "urll": "redis://x"}})
    assert "urll" in str(err.value) and "key_prefix" in str(err.value)  # lists the valid options
    # a bad scheme is named at the url option (it was named at the whole tier: a red-team
    # finding), with no password of the url in the message
    for where, tier in (("url", {"url": "http://u:s3cret@kv:6379/0"}),
                        ("cluster", {"cluster": ["redis://a:6379", "http://u:s3cret@b:6379"]})):
        with pytest.raises(ConfigError) as err:
            KVortexConfig(tiers={"cpu": {"type": "cpu", "capacity": "1GiB"},
                                 "shared": {"type": "redis", "capacity": "8GiB", **tier}})
        text = str(err.value)
        assert f"tiers.shared.{where} " in text and f"KVORTEX_TIERS__SHARED__{where.upper()}" in text, text
        assert "must start with redis:// or rediss://" in text and "s3cret" not in text, text


def _engine_over(url: str, **redis_opts: Any) -> Any:
    import torch

    from kvortex_core import KVortexConfig, KVortexEngine

    config = KVortexConfig(model_id="m", chunk_tokens=32, tiers={
        "cpu": {"type": "cpu", "capacity": "16MiB"},
        "r": {"type": "redis", "capacity": "64MiB", "url": url, "write_through": True, **redis_opts}})
    engine = KVortexEngine.create(config)
    engine.register_kv_caches([torch.randn(2, 64, 16, 2, 64).half() for _ in range(4)])
    return engine


def test_writes_a_full_server_refuses_are_counted(make_redis, key_prefix) -> None:
    """Redis with maxmemory and noeviction refuses writes: the tier answered (no breaker
    failure), but each refused value is counted (it was counted nowhere before)."""
    server = make_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    engine = _engine_over(server.url, key_prefix=key_prefix)
    with engine:
        for p in range(6):
            engine.save([p * 1000 + i for i in range(128)], list(range(8)))
        assert engine._reg.tiers.drain(10)
        counters = engine.stats()["counters"]
    stored = len(redis.Redis(port=server.port).keys(f"{key_prefix}*"))
    refused = counters.get("tier_writes_refused", {}).get("r", 0)
    assert refused > 0
    assert stored + refused == 24  # every write-through chunk: stored or counted
    assert not any(counters.get("tier_errors", {}).values())  # (exported at 0 from the start)


def test_a_tier_that_cannot_open_counts_an_error(make_redis, key_prefix) -> None:
    """A wrong password: the tier starts out of service and `kvortex stats` shows an error."""
    server = make_redis("--requirepass", "s3cret")
    with _engine_over(server.url, key_prefix=key_prefix, password="wrong") as engine:
        assert engine.stats()["counters"]["tier_errors"] == {"r": 1}


def test_a_chunk_the_engine_evicts_from_redis_is_not_reported_there_any_more(redis_server, key_prefix) -> None:
    """Our own eviction deletes the chunk from redis: the cached "present" answer of the shared
    tier must go with it (it stayed, so lookup reported a hit no load delivered, and a save of
    that prompt skipped the chunk as stored: the load right after it missed)."""
    import time

    import torch

    from kvortex_core import KVortexConfig, KVortexEngine

    ct = 16
    value = 4096 + 2 * ct * 16 * 2
    config = KVortexConfig(model_id="m", chunk_tokens=ct, eviction={"policy": "lru"}, tiers={
        "cpu": {"type": "cpu", "capacity": 4 * 8192},
        "r": {"type": "redis", "capacity": 4 * value, "url": redis_server.url, "key_prefix": key_prefix}})

    def prompt(i: int) -> list[int]:
        return [7000 * (i + 1) + j for j in range(ct)]

    with KVortexEngine.create(config) as engine:
        engine.register_kv_caches([torch.randn(2, 64, ct, 1, 16, dtype=torch.float16)])
        tiers = engine._reg.tiers
        shared = tiers.tiers[0]
        for i in range(4):  # prompt 0 leaves the cpu tier for redis (which keeps it)
            engine.save(prompt(i), [i])
            assert tiers.drain(10)  # (a save while demotions hold every slot drops a victim)
        key = engine.keys(prompt(0))[0]
        deadline = time.monotonic() + 10
        while not shared.remote.present(key) and time.monotonic() < deadline:
            engine.lookup(prompt(0))  # the remote cache learns "present" in the background
            time.sleep(0.05)
        assert shared.remote.present(key)
        for i in range(4, 30):  # churn: redis evicts prompt 0 (we delete it there)
            engine.save(prompt(i), [i % 64])
            assert tiers.drain(10)
        assert key not in shared.index
        assert not shared.remote.present(key)
        assert engine.lookup(prompt(0)) == 0
        assert engine.save(prompt(0), [40]) == ct
        assert engine.load(prompt(0), [41]) == ct


def test_a_miss_answered_after_a_put_of_the_key_keeps_that_puts_charge(redis_server, key_prefix) -> None:
    """A GET sent before a put of the same key, whose nil reply is handled after the put
    reserved its charge and landed, used to drop that charge: the instance's budget
    under-counted what it had written (a red-team finding)."""
    async def scenario(b: RedisBackend) -> None:
        assert b._batcher is not None
        real_get = b._batcher.get
        got_reply = asyncio.Event()
        release = asyncio.Event()

        async def late_get(name: str) -> Any:  # the reply is slow to come back
            value = await real_get(name)
            got_reply.set()
            await release.wait()
            return value

        b._batcher.get = late_get  # type: ignore[method-assign]
        read = asyncio.ensure_future(b.get("k", memoryview(bytearray(64))))
        await got_reply.wait()  # the server answered nil: the key did not exist yet
        await b.put("k", b"v" * 40)  # charged and stored while the reply is on its way
        release.set()
        assert await read is None
        usage = await b.usage()
        assert (usage.items, usage.used) == (1, 40)
        assert await b.contains(["k"]) == [True]

    run(make_backend(url=redis_server.url, key_prefix=key_prefix), scenario)
