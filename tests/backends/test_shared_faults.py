"""Faults of the shared tiers: redis killed mid-put or restarted or paused, S3 erroring or stalling.

Every failure must surface as a prompt BackendError (the tiering layer turns those into misses
and opens its breaker), never as a partial or mixed payload, and the backend must recover once
the server is back.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from kvortex_backends.redis import RedisBackend, RedisOptions
from kvortex_backends.s3 import S3Backend, S3Options
from kvortex_core.errors import BackendError
from kvortex_core.storage.protocol import BackendContext
from kvortex_core.testing import run_scenario

redis = pytest.importorskip("redis")
MiB = 1024 * 1024


def redis_backend(url: str, prefix: str, **options: Any) -> RedisBackend:
    return RedisBackend(RedisOptions(url=url, key_prefix=prefix, **options), capacity=1 << 30,
                        context=BackendContext(tier="redis"))


class KillWhenReceiving:
    """A thread that SIGKILLs the server as soon as it holds part of a big command (or a MULTI) in
    flight; ``ready`` is set once it polls, ``stop()`` ends it without a kill."""

    def __init__(self, server: Any) -> None:
        self.server, self.killed = server, False
        self.ready, self._stop = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self.server.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                clients = client.client_list()
            except (redis.RedisError, OSError):
                return
            self.ready.set()
            for c in clients:
                if c.get("cmd") == "client|list":
                    continue
                if int(c.get("qbuf", 0)) > 0 or int(c.get("multi", -1)) > 0:
                    self.server.kill()
                    self.killed = True
                    return

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=15)


@pytest.mark.redis
@pytest.mark.parametrize("part_bytes", [None, 256 * 1024], ids=["one-set", "multi-parts"])
def test_redis_killed_mid_put_leaves_old_or_new_never_a_mix(make_redis, key_prefix, part_bytes) -> None:
    """A put killed mid-command fails and leaves the old value; one the kill missed (it finished
    first, on a loaded machine) leaves the new value, acknowledged and so durable: either way
    never a mix. Tried until a kill lands mid-put (at most 5 times), so the fault path runs."""
    # appendfsync always: whatever Redis acknowledged survives the kill, so a torn write would show.
    server = make_redis("--appendonly", "yes", "--appendfsync", "always")
    old, new = os.urandom(48 * MiB), os.urandom(48 * MiB)

    async def write_then_kill() -> tuple[BaseException | None, bool]:
        b = redis_backend(server.url, key_prefix, part_bytes=part_bytes, retries=0)
        await b.open()
        try:
            await b.put("victim", old)
            watcher = KillWhenReceiving(server)
            await asyncio.to_thread(watcher.ready.wait, 5)
            outcome: BackendError | None = None
            try:
                await b.put("victim", new)
            except BackendError as exc:
                outcome = exc
            finally:
                watcher.stop()  # joined: ``killed`` is final
            return outcome, watcher.killed
        finally:
            await b.close()

    async def read_back() -> bytes | None:
        b = redis_backend(server.url, key_prefix)
        await b.open()
        try:
            out = bytearray(len(new))
            n = await b.get("victim", memoryview(out))
            return None if n is None else bytes(out[:n])
        finally:
            await b.close()

    for _ in range(5):
        outcome, killed = asyncio.run(write_then_kill())
        if killed:
            server.start()  # same port and data directory: reloads the append-only file
        value = asyncio.run(read_back())
        assert value in (old, new), "a reader saw a partial or mixed payload after the crash"
        if outcome is None:  # the put finished before the kill: acknowledged, so it must have stuck
            assert value == new
            continue
        # The kill lands while the command is still arriving, so the put fails and the old value
        # stays (the new one could only win if the kill fell between fsync and the reply).
        assert isinstance(outcome, BackendError) and killed
        break
    else:
        pytest.fail("in 5 tries the kill never landed while the put was in flight")


@pytest.mark.redis
def test_redis_restart_and_outage_then_recovery(make_redis, key_prefix) -> None:
    server = make_redis()

    async def scenario() -> None:
        b = redis_backend(server.url, key_prefix, retries=1, connect_timeout=1)
        await b.open()
        try:
            await b.put("before", b"1" * 1000)
            server.restart()  # no persistence: the data is gone, pooled sockets are dead
            # The stale pooled connection fails once and is replaced by the retry.
            assert await b.get("before", memoryview(bytearray(1000))) is None
            server.kill()
            with pytest.raises(BackendError, match="127.0.0.1"):
                await b.put("during", b"2" * 1000)
            assert not (await b.health()).ok
            server.start()
            await b.put("after", b"3" * 1000)
            out = bytearray(1000)
            assert await b.get("after", memoryview(out)) == 1000 and bytes(out) == b"3" * 1000
            assert (await b.health()).ok
        finally:
            await b.close()

    asyncio.run(scenario())


@pytest.mark.redis
def test_redis_slow_server_times_out_promptly(make_redis, key_prefix) -> None:
    server = make_redis()
    admin = redis.Redis(host="127.0.0.1", port=server.port)

    async def scenario() -> None:
        b = redis_backend(server.url, key_prefix, socket_timeout=0.3)
        await b.open()
        try:
            await b.put("k", b"v" * 100)
            admin.execute_command("CLIENT", "PAUSE", "1500", "ALL")
            with pytest.raises(BackendError, match="Timeout"):
                await b.get("k", memoryview(bytearray(100)))
            await asyncio.sleep(1.6)  # pause over: the backend serves again
            out = bytearray(100)
            assert await b.get("k", memoryview(out)) == 100
        finally:
            await b.close()

    asyncio.run(scenario())


# -- S3 through the fault-injecting proxy in front of moto (conftest.FaultProxy) -----------------


def s3_backend(endpoint: str, bucket: str, **options: Any) -> S3Backend:
    opts = S3Options(bucket=bucket, endpoint_url=endpoint, region="us-east-1",
                     addressing_style="path", **options)
    return S3Backend(opts, capacity=1 << 30, context=BackendContext(tier="s3"))


run_s3 = run_scenario  # open, run the scenario, always close


@pytest.mark.s3
def test_s3_errors_are_retried_then_raised_and_recovered(fault_proxy, s3_bucket) -> None:
    async def scenario(b: S3Backend) -> None:
        await b.put("ok", b"1" * 500)
        fault_proxy.mode, before = "error", fault_proxy.requests
        with pytest.raises(BackendError, match="InternalError"):
            await b.put("fails", b"2" * 500)
        assert fault_proxy.requests - before == 3, "\n".join(fault_proxy.log)
        with pytest.raises(BackendError):
            await b.get("ok", memoryview(bytearray(500)))
        assert (await b.usage()).items == 1, "a failed put is not charged"
        fault_proxy.mode = "pass"
        out = bytearray(500)
        assert await b.get("ok", memoryview(out)) == 500 and bytes(out) == b"1" * 500
        assert await b.get("fails", memoryview(out)) is None

    run_s3(s3_backend(fault_proxy.url, s3_bucket, max_attempts=3), scenario)


@pytest.mark.s3
def test_s3_stalled_endpoint_times_out(fault_proxy, s3_bucket) -> None:
    async def scenario(b: S3Backend) -> None:
        await b.put("ok", b"1" * 500)
        fault_proxy.mode = "stall"
        with pytest.raises(BackendError, match="(?i)timeout"):
            await b.get("ok", memoryview(bytearray(500)))
        with pytest.raises(BackendError, match="(?i)timeout"):
            await b.contains(["ok", "other"])
        assert not (await b.health()).ok
        fault_proxy.mode = "pass"
        assert await b.contains(["ok"]) == [True]

    run_s3(s3_backend(fault_proxy.url, s3_bucket, read_timeout=0.3, max_attempts=1), scenario)


@pytest.mark.s3
def test_s3_unreachable_endpoint(unused_port) -> None:
    backend = s3_backend(f"http://127.0.0.1:{unused_port}", "bucket", max_attempts=1, connect_timeout=0.5)
    with pytest.raises(BackendError, match="endpoint_url"):
        asyncio.run(backend.open())
    asyncio.run(backend.close())


@pytest.mark.redis
def test_redis_open_retried_after_server_comes_up(make_redis, unused_port, key_prefix) -> None:
    """The tiering calls open() again on a tier that failed to open; the same client recovers."""
    backend = redis_backend(f"redis://127.0.0.1:{unused_port}/0", key_prefix, connect_timeout=0.5)

    async def scenario() -> None:
        with pytest.raises(BackendError):
            await backend.open()
        client = backend._client
        make_redis(port=unused_port)  # the server comes up where the tier points
        await backend.open()
        assert backend._client is client  # reused, not leaked and rebuilt
        await backend.put("k", b"v")
        out = bytearray(1)
        assert await backend.get("k", memoryview(out)) == 1 and out == b"v"
        await backend.close()

    asyncio.run(scenario())


@pytest.mark.s3
def test_s3_open_retried_after_endpoint_recovers(fault_proxy, s3_bucket) -> None:
    backend = s3_backend(fault_proxy.url, s3_bucket, max_attempts=1)

    async def scenario() -> None:
        fault_proxy.mode = "error"
        with pytest.raises(BackendError):
            await backend.open()
        pool, client = backend._pool, backend._client
        fault_proxy.mode = "pass"
        await backend.open()
        assert backend._pool is pool and backend._client is client  # nothing leaked or rebuilt
        await backend.put("k", b"v")
        await backend.close()

    asyncio.run(scenario())


@pytest.mark.s3
def test_s3_a_failed_range_returns_only_once_every_range_stopped_writing(fault_proxy, s3_bucket) -> None:
    """A read of parallel byte ranges where one range fails: get() used to raise at once while
    the other ranges' threads kept writing into the buffer, which the caller then reuses (a cpu
    slot the next save took: that save's chunk was loaded back with another chunk's bytes)."""
    value = os.urandom(16 * MiB)

    def rule(method: str, headers: Any) -> Any:
        rng = headers.get("Range") or ""
        if method == "GET" and rng.startswith(f"bytes={5 * MiB}-"):
            return ("error", 500)
        if method == "GET" and rng.startswith(f"bytes={10 * MiB}-"):
            return ("slowbody", 1.5)  # still streaming when the failed range answered
        return None

    async def scenario(b: S3Backend) -> None:
        await b.put("k", value)
        fault_proxy.rule = rule
        out = bytearray(len(value))
        with pytest.raises(BackendError, match="InternalError"):
            await b.get("k", memoryview(out))
        out[:] = bytes(len(out))  # the caller reuses its buffer
        await asyncio.sleep(2.0)
        assert out == bytes(len(out)), "a range kept writing into the buffer after get() raised"
        fault_proxy.rule = None
        assert await b.get("k", memoryview(out)) == len(value) and out == value

    run_s3(s3_backend(fault_proxy.url, s3_bucket, multipart_threshold="5MiB", multipart_chunksize="5MiB",
                      max_attempts=1), scenario)


@pytest.mark.s3
def test_s3_a_trickling_body_is_cut_at_request_timeout(fault_proxy, s3_bucket) -> None:
    """botocore's read_timeout bounds each socket read: a body trickling in held the read (its
    pool thread and the caller's buffer) without end. request_timeout bounds the whole GET."""
    async def scenario(b: S3Backend) -> None:
        await b.put("k", b"x" * MiB)
        fault_proxy.rule = lambda method, headers: ("slowbody", 20.0) if method == "GET" else None
        t0 = time.monotonic()
        with pytest.raises(BackendError, match="request_timeout"):
            await b.get("k", memoryview(bytearray(MiB)))
        assert time.monotonic() - t0 < 1.0 + 3.0  # request_timeout, plus at most one read_timeout
        fault_proxy.rule = None
        out = bytearray(MiB)
        assert await b.get("k", memoryview(out)) == MiB and out == b"x" * MiB

    run_s3(s3_backend(fault_proxy.url, s3_bucket, request_timeout=1.0, read_timeout=3.0, max_attempts=1),
           scenario)
