"""Measurements of ``kvortex bench backends``: shared tiers vs their raw client on one server.

For every payload size and concurrency ``c``, one repetition writes (then reads) ``c`` payloads
of the same bytes under ``c`` keys at once:

- redis: our backend's ``c`` concurrent ``put``/``get`` (pooled connections, reads copied into
  caller buffers) vs raw redis-py (``redis.asyncio``) sending the same ``c`` SET/GET on the same
  server in the faster of two shapes, each timed in every repetition: one pipeline, or ``c``
  concurrent commands over a pool of as many connections as ours (``Point.raw_shape`` says
  which won);
- s3: our backend's ``c`` concurrent ``put``/``get`` vs raw boto3 ``put_object``/``get_object``
  from ``c`` threads against the same endpoint.

Local servers (redis-server, moto in its own process) are started when no URL is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

MiB = 1024 * 1024


@dataclass
class Point:
    """One (target, op, size, concurrency) cell: seconds per repetition for ours and raw."""

    target: str
    op: str
    size: int
    concurrency: int
    ours: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    #: gets only: the raw read plus the copy into the caller's buffer that a tier must make
    raw_copy: list[float] = field(default_factory=list)
    #: with several raw shapes: the one with the lowest median (``raw`` holds, per repetition,
    #: the fastest shape's time)
    raw_shape: str = ""

    @property
    def inner(self) -> int:
        """Operations per timed repetition: small payloads repeat until ~32 MiB have moved (at
        most 32 times), so one scheduler hiccup does not decide a 1 ms measurement."""
        return max(1, min(32, (32 * MiB) // (self.size * self.concurrency)))

    @property
    def nbytes(self) -> int:
        return self.size * self.concurrency * self.inner

    def gbps(self, which: str) -> float:
        secs = sorted(getattr(self, which))
        return self.nbytes / secs[len(secs) // 2] / 1e9 if secs else 0.0

    @property
    def ratio(self) -> float:
        raw, ours = self.gbps("raw"), self.gbps("ours")
        return ours / raw if raw else 0.0

    @property
    def ratio_vs_copy(self) -> float | None:
        if not self.raw_copy:
            return None
        raw, ours = self.gbps("raw_copy"), self.gbps("ours")
        return ours / raw if raw else 0.0


# -- local servers ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within {timeout:.0f} s")
        time.sleep(0.1)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def local_redis() -> Iterator[str]:
    """A throwaway redis-server (no persistence) on a free loopback port."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed; install it or pass --redis-url")
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", tmp],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait(lambda: _accepts(port), "redis-server")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@contextlib.contextmanager
def local_moto() -> Iterator[str]:
    """moto's S3 server in its own process (so it does not share the client's GIL)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _accepts(port), "moto server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- timing -------------------------------------------------------------------------------------


async def _paired(point: Point, ours: Callable[[], Awaitable[Any]],
                  raw: Callable[[], Awaitable[Any]] | dict[str, Callable[[], Awaitable[Any]]], reps: int,
                  raw_copy: Callable[[], Awaitable[Any]] | dict[str, Callable[[], Awaitable[Any]]] | None = None,
                  ) -> Point:
    """Time ours and the baselines in a rotating order, so load drift hits all of them alike.

    ``raw`` (and ``raw_copy``) may name several shapes of the raw client doing the same work;
    each is timed in every repetition and the faster one per repetition is the baseline."""
    raws = raw if isinstance(raw, dict) else {"": raw}
    copies = raw_copy if isinstance(raw_copy, dict) else ({"": raw_copy} if raw_copy else {})
    times: dict[tuple[str, str], list[float]] = {}
    runs: list[tuple[Callable[[], Awaitable[Any]], list[float]]] = [(ours, point.ours)]
    for kind, fns in (("raw", raws), ("copy", copies)):
        for name, fn in fns.items():
            runs.append((fn, times.setdefault((kind, name), [])))
    for fn, _ in runs:  # warm-up: connections open, keys exist, allocator primed
        await fn()
    for rep in range(reps):
        shift = rep % len(runs)
        for fn, sink in runs[shift:] + runs[:shift]:
            t0 = time.perf_counter()
            for _ in range(point.inner):
                await fn()
            sink.append(time.perf_counter() - t0)
    point.raw = [min(ts) for ts in zip(*(times["raw", n] for n in raws), strict=True)]
    if copies:
        point.raw_copy = [min(ts) for ts in zip(*(times["copy", n] for n in copies), strict=True)]
    if len(raws) > 1:
        point.raw_shape = min(raws, key=lambda n: sorted(times["raw", n])[len(times["raw", n]) // 2])
    return point


def _copy_into(outs: list[memoryview], values: list[Any]) -> None:
    for out, value in zip(outs, values):
        out[: len(value)] = value


def _keys(size: int, conc: int, tag: str) -> list[str]:
    return [f"{tag}{size:x}{conc:02d}{i:02d}".ljust(40, "0") for i in range(conc)]


# -- redis --------------------------------------------------------------------------------------


async def _redis_points(url: str, sizes: list[int], concs: list[int], reps: int,
                        part_bytes: int | None, label: str) -> list[Point]:
    import redis.asyncio as aredis

    from kvortex_backends.redis import RedisBackend, RedisOptions
    from kvortex_core.storage.protocol import BackendContext

    prefix = f"kvbench:{uuid.uuid4().hex[:8]}:"
    ours = RedisBackend(RedisOptions(url=url, key_prefix=prefix, part_bytes=part_bytes,
                                     max_connections=max(concs) + 2, socket_timeout=60),
                        capacity=1 << 40, context=BackendContext(tier="bench"))
    raw = aredis.Redis.from_url(url, socket_timeout=60, max_connections=max(concs) + 2)  # as ours
    await ours.open()
    points: list[Point] = []
    try:
        for size in sizes:
            payload = os.urandom(size)
            for conc in concs:
                points += await _redis_point(ours, raw, label, prefix, payload, conc, reps)
    finally:
        await ours.close()
        await raw.aclose()
    return points


async def _redis_point(ours: Any, raw: Any, label: str, prefix: str, payload: bytes, conc: int,
                       reps: int) -> list[Point]:
    """put then get of ``conc`` payloads: our backend vs raw redis-py (pipelined or concurrent)."""
    size = len(payload)
    keys = _keys(size, conc, "r")
    outs = [memoryview(bytearray(size)) for _ in keys]
    names = [prefix + "raw" + k for k in keys]

    async def pipelined_put() -> None:
        pipe = raw.pipeline(transaction=False)
        for n in names:
            pipe.set(n, payload)
        await pipe.execute()

    async def pipelined_get() -> list[Any]:
        pipe = raw.pipeline(transaction=False)
        for n in names:
            pipe.get(n)
        return await pipe.execute()

    async def concurrent_put() -> None:
        await asyncio.gather(*(raw.set(n, payload) for n in names))

    async def concurrent_get() -> list[Any]:
        return list(await asyncio.gather(*(raw.get(n) for n in names)))

    async def pipelined_get_copy() -> None:
        _copy_into(outs, await pipelined_get())

    async def concurrent_get_copy() -> None:
        _copy_into(outs, await concurrent_get())

    put = await _paired(Point(label, "put", size, conc),
                        lambda: asyncio.gather(*(ours.put(k, payload) for k in keys)),
                        {"pipeline": pipelined_put, "concurrent": concurrent_put}, reps)
    get = await _paired(Point(label, "get", size, conc),
                        lambda: asyncio.gather(*(ours.get(k, o) for k, o in zip(keys, outs))),
                        {"pipeline": pipelined_get, "concurrent": concurrent_get}, reps,
                        {"pipeline": pipelined_get_copy, "concurrent": concurrent_get_copy})
    if bytes(outs[-1]) != payload:
        raise RuntimeError("redis bench read back different bytes")
    await ours.delete(keys)
    await raw.delete(*names)
    return [put, get]


def bench_redis(url: str, sizes: list[int], concs: list[int], reps: int,
                part_bytes: int | None) -> list[Point]:
    points = asyncio.run(_redis_points(url, sizes, concs, reps, None, "redis"))
    if part_bytes:
        label = f"redis parts {part_bytes // MiB}MiB" if part_bytes >= MiB else f"redis parts {part_bytes}B"
        points += asyncio.run(_redis_points(url, sizes, concs, reps, part_bytes, label))
    return points


# -- s3 -----------------------------------------------------------------------------------------


def _raw_s3(endpoint: str, bucket: str, conc: int) -> tuple[Any, ThreadPoolExecutor]:
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          config=Config(max_pool_connections=max(conc, 10)))
    return client, ThreadPoolExecutor(conc)


async def _s3_points(endpoint: str, sizes: list[int], concs: list[int], reps: int) -> list[Point]:
    from kvortex_backends.s3 import S3Backend, S3Options
    from kvortex_core.storage.protocol import BackendContext

    bucket = f"kvbench-{uuid.uuid4().hex[:12]}"
    client, pool = _raw_s3(endpoint, bucket, max(concs))
    client.create_bucket(Bucket=bucket)
    ours = S3Backend(S3Options(bucket=bucket, endpoint_url=endpoint, region="us-east-1",
                               max_concurrency=max(concs), read_timeout=120),
                     capacity=1 << 40, context=BackendContext(tier="bench"))
    await ours.open()
    points: list[Point] = []
    try:
        for size in sizes:
            payload = os.urandom(size)
            for conc in concs:
                points += await _s3_point(ours, client, pool, bucket, payload, conc, reps)
    finally:
        await ours.close()
        pool.shutdown()
    return points


async def _s3_point(ours: Any, client: Any, pool: ThreadPoolExecutor, bucket: str, payload: bytes,
                    conc: int, reps: int) -> list[Point]:
    """put then get of ``conc`` payloads: our backend vs raw boto3 calls from ``conc`` threads."""
    loop = asyncio.get_running_loop()
    size = len(payload)
    keys = _keys(size, conc, "s")
    outs = [memoryview(bytearray(size)) for _ in keys]
    names = [f"raw/{k}" for k in keys]

    def raw_all(fn: Callable[[str], Any]) -> Callable[[], Awaitable[Any]]:
        return lambda: asyncio.gather(*(loop.run_in_executor(pool, fn, n) for n in names))

    def read(name: str) -> bytes:
        return client.get_object(Bucket=bucket, Key=name)["Body"].read()

    async def raw_get_copy() -> None:
        _copy_into(outs, await raw_all(read)())

    put = await _paired(Point("s3", "put", size, conc),
                        lambda: asyncio.gather(*(ours.put(k, payload) for k in keys)),
                        raw_all(lambda n: client.put_object(Bucket=bucket, Key=n, Body=payload)), reps)
    get = await _paired(Point("s3", "get", size, conc),
                        lambda: asyncio.gather(*(ours.get(k, o) for k, o in zip(keys, outs))),
                        raw_all(read), reps, raw_get_copy)
    if bytes(outs[-1]) != payload:
        raise RuntimeError("s3 bench read back different bytes")
    await ours.delete(keys)
    client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": n} for n in names]})
    return [put, get]


def bench_s3(endpoint: str, sizes: list[int], concs: list[int], reps: int) -> list[Point]:
    return asyncio.run(_s3_points(endpoint, sizes, concs, reps))
