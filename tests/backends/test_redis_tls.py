"""The redis backend over TLS (rediss://) with a test CA, client certificates and an ACL user."""

from __future__ import annotations

import asyncio
import os

import pytest

from kvortex_backends.redis import RedisBackend, RedisOptions
from kvortex_core.errors import BackendError
from kvortex_core.storage.protocol import BackendContext
from kvortex_core.testing import BackendConformance

pytestmark = pytest.mark.redis
pytest.importorskip("redis")


def tls_backend(tls, key_prefix: str, capacity: int = 1 << 28, **overrides: object) -> RedisBackend:  # type: ignore[no-untyped-def]
    options: dict[str, object] = {
        "url": tls.url, "key_prefix": key_prefix, "username": tls.username, "password": tls.password,
        "ssl_ca_certs": str(tls.files.ca), "ssl_certfile": str(tls.files.client_cert),
        "ssl_keyfile": str(tls.files.client_key),
        # 48 concurrent TLS handshakes on a loaded 2-core CI box can take seconds.
        "connect_timeout": 15, "socket_timeout": 30,
    }
    options.update(overrides)
    return RedisBackend(RedisOptions(**options), capacity=capacity, context=BackendContext(tier="tls"))


class TestTlsConformance(BackendConformance):
    sizes = (1, 65537, 1024 * 1024 + 3)

    @pytest.fixture
    def backend_factory(self, redis_tls, key_prefix):  # type: ignore[no-untyped-def]
        return lambda capacity: tls_backend(redis_tls, key_prefix, capacity)


def test_large_payload_round_trip_over_tls(redis_tls, key_prefix) -> None:
    value = os.urandom(8 * 1024 * 1024 + 5)

    async def main() -> None:
        b = tls_backend(redis_tls, key_prefix)
        await b.open()
        try:
            await b.put("big", memoryview(value))
            out = bytearray(len(value))
            assert await b.get("big", memoryview(out)) == len(value) and bytes(out) == value
        finally:
            await b.close()

    asyncio.run(main())


@pytest.mark.parametrize("drop", ["ssl_ca_certs", "client_cert", "password"])
def test_refused_without_trust_cert_or_auth(redis_tls, key_prefix, drop) -> None:
    overrides: dict[str, object] = {
        "ssl_ca_certs": {"ssl_ca_certs": None},
        "client_cert": {"ssl_certfile": None, "ssl_keyfile": None},
        "password": {"password": "wrong"},
    }[drop]
    b = tls_backend(redis_tls, key_prefix, **overrides)
    with pytest.raises(BackendError) as err:
        asyncio.run(b.open())
    assert redis_tls.password not in str(err.value)
    asyncio.run(b.close())
