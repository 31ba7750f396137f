"""The redis backend against a real 3-master Redis Cluster."""

from __future__ import annotations

import asyncio
import os

import pytest

from kvortex_backends.redis import RedisBackend, RedisOptions
from kvortex_core.storage.protocol import BackendContext
from kvortex_core.testing import BackendConformance

pytestmark = pytest.mark.redis
redis = pytest.importorskip("redis")


def cluster_backend(urls: list[str] | None, url: str, key_prefix: str, capacity: int, **kw: object) -> RedisBackend:
    opts = RedisOptions(url=url, cluster=urls if urls else True, key_prefix=key_prefix, **kw)
    return RedisBackend(opts, capacity=capacity, context=BackendContext(tier="cluster"))


class TestClusterConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self, redis_cluster, key_prefix):  # type: ignore[no-untyped-def]
        return lambda capacity: cluster_backend(redis_cluster.urls, redis_cluster.urls[0], key_prefix, capacity)


def test_keys_spread_over_all_masters_and_batches_span_slots(redis_cluster, key_prefix) -> None:
    """`cluster: true` discovers every master from one URL; pipelines cross slots and nodes."""
    values = {os.urandom(20).hex(): os.urandom(5000) for _ in range(60)}

    async def main() -> None:
        b = cluster_backend(None, redis_cluster.urls[1], key_prefix, 1 << 30, part_bytes=2000)
        await b.open()
        try:
            for k, v in values.items():
                await b.put(k, v)
            assert await b.contains([*values, "f" * 40]) == [True] * len(values) + [False]
            for k, v in values.items():
                out = bytearray(len(v))
                assert await b.get(k, memoryview(out)) == len(v) and bytes(out) == v
            assert await b.delete(list(values)[:30]) == 30
            assert (await b.usage()).items == 30
        finally:
            await b.close()

    asyncio.run(main())
    per_node = []
    for node in redis_cluster.nodes:
        client = redis.Redis(host="127.0.0.1", port=node.port)
        per_node.append(len(client.keys(f"{key_prefix}*")))
    assert sum(per_node) == 30 and all(n > 0 for n in per_node), per_node
