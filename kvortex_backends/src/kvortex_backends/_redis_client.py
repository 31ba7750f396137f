"""Build the redis.asyncio client of a ``redis`` tier: pool limits, TLS, auth, retries, cluster.

Imported only from :meth:`RedisBackend.open`, so ``redis`` is needed only when a redis tier is
configured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

    from kvortex_backends.redis import RedisOptions


def _retry(options: RedisOptions) -> Any:
    """Retry connection errors only: a timed-out command is not retried (it raises promptly)."""
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    return Retry(ExponentialBackoff(cap=0.5, base=0.05), options.retries, (RedisConnectionError,))


def _common_kwargs(options: RedisOptions) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "socket_timeout": options.socket_timeout,
        "socket_connect_timeout": options.connect_timeout,
        "socket_read_size": int(options.read_buffer_bytes),
        "retry": _retry(options),
    }
    if options.username is not None:
        kwargs["username"] = options.username
    if options.password is not None:
        kwargs["password"] = options.password.get_secret_value()
    if options.tls:
        kwargs.update(
            ssl_ca_certs=options.ssl_ca_certs,
            ssl_certfile=options.ssl_certfile,
            ssl_keyfile=options.ssl_keyfile,
            ssl_cert_reqs=options.ssl_cert_reqs,
            ssl_check_hostname=options.ssl_check_hostname,
        )
    return kwargs


def _standalone(options: RedisOptions) -> Redis:
    from redis.asyncio import BlockingConnectionPool, Redis

    # A blocking pool makes callers wait (up to pool_timeout) for a free connection instead
    # of failing with "too many connections" when more operations run than the limit.
    pool = BlockingConnectionPool.from_url(
        options.url,
        max_connections=options.max_connections,
        timeout=options.pool_timeout,
        **_common_kwargs(options),
    )
    return Redis.from_pool(pool)  # the client owns the pool and closes it


def _cluster(options: RedisOptions) -> RedisCluster:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    nodes = []
    for url in options.node_urls():
        parts = urlsplit(url)
        nodes.append(ClusterNode(parts.hostname or "127.0.0.1", parts.port or 6379))
    kwargs = _common_kwargs(options)
    if options.tls:
        kwargs["ssl"] = True
    return RedisCluster(startup_nodes=nodes, max_connections=options.max_connections, **kwargs)


def make_client(options: RedisOptions) -> Redis | RedisCluster:
    """The pooled async client for ``options`` (nothing is connected yet)."""
    return _cluster(options) if options.is_cluster else _standalone(options)
