"""``redis``: a shared tier in Redis or Redis Cluster (redis.asyncio with hiredis).

One Redis key per chunk payload, ``<key_prefix><chunk key hex>``, whose value is the complete
payload (header included), so Redis can never evict the metadata of a chunk apart from its
bytes. Large payloads go in one ``SET`` (measured faster than parts, see
docs/shared-tiers.md); with ``part_bytes`` set, a large payload is written as ``SET`` + ``APPEND``
parts of the same key inside one ``MULTI``/``EXEC``, which Redis applies atomically, so a
reader (one ``GET``) never sees parts of two writes nor a half-written value.

``capacity`` is the budget of this instance, accounted by :class:`~kvortex_backends.ledger.WriteLedger`
(bytes this instance wrote minus what it deleted or found gone). The ``redis`` package is
imported in :meth:`RedisBackend.open`, so registering the backend never needs it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator

from kvortex_backends._redis_batch import GetBatcher
from kvortex_backends.ledger import WriteLedger
from kvortex_core.errors import BackendError, BackendFullError, BadValueError, BufferTooSmallError
from kvortex_core.storage.protocol import (
    BackendContext,
    BackendOptions,
    Health,
    StorageBackend,
    Usage,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

_SCHEMES = ("redis", "rediss")


def _split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``url`` without its password, plus the username and password it carried."""
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES:
        shown = url if parts.password is None else url.replace(f":{parts.password}@", ":********@", 1)
        raise ValueError(
            f"url {shown!r} must start with redis:// or rediss:// (TLS), e.g. redis://host:6379/0"
        )
    shown = url if parts.password is None else url.replace(f":{parts.password}@", ":********@", 1)
    if not parts.hostname:
        raise ValueError(f"url {shown!r} names no host; e.g. redis://host:6379/0")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port when it is read
    except ValueError:
        raise ValueError(f"url {shown!r}: the port must be a number in 1-65535, e.g. 6379") from None
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"url {shown!r}: the path must be a database number such as /0, not {db!r}")
    if parts.password is None:
        return url, parts.username, None
    host = parts.hostname or ""
    netloc = f"{parts.username}@" if parts.username else ""
    netloc += f"[{host}]" if ":" in host else host
    netloc += f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=netloc)), parts.username, parts.password


class RedisOptions(BackendOptions):
    """Options of a ``redis`` tier. A password written inside a URL moves to ``password``."""

    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool | list[str] = Field(
        False, description="true: `url` is a cluster node; or a list of cluster node URLs"
    )
    key_prefix: str = "kvortex:"
    ttl: float | None = Field(None, ge=0.001, description="seconds a payload lives (Redis counts "
                              "milliseconds: at least 0.001); none = no expiry")
    username: str | None = None
    password: SecretStr | None = None
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    ssl_check_hostname: bool = True
    max_connections: int = Field(32, ge=1, description="connection pool limit (per node in a cluster)")
    pool_timeout: float = Field(5.0, gt=0, description="seconds to wait for a free pooled connection")
    socket_timeout: float = Field(5.0, gt=0)
    connect_timeout: float = Field(2.0, gt=0)
    read_buffer_bytes: ByteSize = Field(
        ByteSize(64 * 1024), ge=4096, description="socket read size per read call"
    )
    retries: int = Field(1, ge=0, le=10, description="retries of a command after a connection error")
    coalesce_gets: bool = Field(
        True, description="gets issued in the same event-loop turn share one pipeline"
    )
    part_bytes: ByteSize | None = Field(
        None, ge=1024,
        description="write payloads larger than this as SET+APPEND parts in one MULTI (>= 1KiB)",
    )

    @model_validator(mode="before")
    @classmethod
    def _move_url_passwords(cls, data: Any) -> Any:
        """Keep secrets out of URLs (which get logged): ``redis://u:pw@h`` -> password option."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        urls = [data["url"]] if isinstance(data.get("url"), str) else []
        nodes = data.get("cluster")
        if isinstance(nodes, list):
            urls += [u for u in nodes if isinstance(u, str)]
        cleaned = {}
        for url in urls:
            try:
                bare, user, password = _split_credentials(url)
            except ValueError:  # a bad scheme: reported by the field's own check, under its name
                continue
            cleaned[url] = bare
            given = data.get("password")
            if password is not None and given is not None:
                given = given.get_secret_value() if isinstance(given, SecretStr) else given
                if given != password:
                    raise ValueError(
                        "a URL carries a password and the `password` option gives another one; "
                        "keep one of them (the option, so the secret stays out of the URL)"
                    )
            if password is not None and data.get("password") is None:
                data["password"] = password
            if user and data.get("username") is None:
                data["username"] = user
        if isinstance(data.get("url"), str):
            data["url"] = cleaned.get(data["url"], data["url"])
        if isinstance(nodes, list):
            data["cluster"] = [cleaned.get(u, u) for u in nodes]
        return data

    def machine_notes(self) -> list[str]:
        """TLS files this machine lacks (checked again, as an error, when the tier opens)."""
        return [f"{name} {path!r} is not a file here; give the path of the PEM file"
                for name, path in self._tls_files() if not os.path.isfile(path)]

    def _tls_files(self) -> list[tuple[str, str]]:
        return [(name, path) for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
                if (path := getattr(self, name)) is not None]

    @field_validator("cluster")
    @classmethod
    def _nodes_not_empty(cls, v: bool | list[str]) -> bool | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("cluster node list is empty; give node URLs or `cluster: true`")
        if isinstance(v, list):
            for url in v:
                _split_credentials(url)  # the scheme, named under tiers.<name>.cluster
        return v

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        _split_credentials(v)  # a bad scheme is named under tiers.<name>.url, not the tier
        return v

    @property
    def tls(self) -> bool:
        urls = self.cluster if isinstance(self.cluster, list) else [self.url]
        return any(u.startswith("rediss://") for u in urls)

    @property
    def is_cluster(self) -> bool:
        return bool(self.cluster)

    def node_urls(self) -> list[str]:
        return self.cluster if isinstance(self.cluster, list) else [self.url]


def _byte_view(data: memoryview | bytes | bytearray) -> memoryview:
    """A flat unsigned-byte view (redis-py sends memoryviews without copying them)."""
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class RedisBackend(StorageBackend):
    """A shared tier in Redis (standalone or cluster)."""

    Options: ClassVar[type[BackendOptions]] = RedisOptions
    requires: ClassVar[tuple[str, ...]] = ("redis",)
    install_hint: ClassVar[str | None] = 'pip install "kvortex-backends[redis]"'
    shared: ClassVar[bool] = True

    def __init__(self, options: BackendOptions, *, capacity: int, context: BackendContext) -> None:
        super().__init__(options, capacity=capacity, context=context)
        self.opts: RedisOptions = options  # type: ignore[assignment]
        self._ledger = WriteLedger(context.tier, capacity, self.opts.ttl)
        self._client: Redis | RedisCluster | None = None
        self._batcher: GetBatcher | None = None
        self._where = ", ".join(urlsplit(u).netloc.split("@")[-1] for u in self.opts.node_urls())

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Build the pooled client, then PING; a BackendError names the servers if it fails.

        The client stays usable after a failed PING (every later call reconnects), and calling
        ``open()`` again (the tiering retries a tier that failed to open) reuses it.
        """
        from kvortex_backends._redis_client import make_client

        missing = self.opts.machine_notes()
        if missing:  # checked here, not with the configuration: it may be validated elsewhere
            raise BackendError(f"redis tier: {'; '.join(missing)}")
        if self._client is None:
            self._client = make_client(self.opts)
        if self.opts.coalesce_gets and self._batcher is None:
            self._batcher = GetBatcher(self._require, max_batch=64)
        with self._errors("connect"):
            await self._client.ping()

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()
            self._batcher = None
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a dead connection is not an error
                await client.aclose()

    async def health(self) -> Health:
        try:
            with self._errors("ping"):
                await self._require().ping()
        except BackendError as exc:
            return Health(ok=False, detail=str(exc))
        return Health(ok=True, detail=f"redis {self._where}")

    # -- data --------------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.opts.key_prefix + key

    async def put(self, key: str, data: memoryview | bytes | bytearray) -> None:
        view = _byte_view(data)
        reservation = self._ledger.reserve(key, view.nbytes)
        try:
            with self._errors("put", key):
                await self._write(self._name(key), view)
        except BaseException:
            self._ledger.rollback(reservation)
            raise
        self._ledger.landed(reservation)

    async def _write(self, name: str, view: memoryview) -> None:
        px = int(self.opts.ttl * 1000) if self.opts.ttl else None
        part = self.opts.part_bytes
        client = self._require()
        if not part or view.nbytes <= part:
            await client.set(name, view, px=px)
            return
        # One MULTI/EXEC: Redis applies SET and every APPEND together or not at all.
        pipe = client.pipeline(transaction=True)
        pipe.set(name, view[:part], px=px)
        for start in range(part, view.nbytes, part):
            pipe.append(name, view[start : start + part])
        await pipe.execute()

    async def get(self, key: str, out: memoryview) -> int | None:
        since = self._ledger.stamp()
        with self._errors("get", key):
            if self._batcher is not None:
                value = await self._batcher.get(self._name(key))
            else:
                value = await self._require().get(self._name(key))
        if value is None:
            self._ledger.forget_missing([key], since)  # evicted, expired or deleted elsewhere
            return None
        n = len(value)
        if len(out) < n:
            raise BufferTooSmallError(
                f"redis value of {key!r} is {n} bytes but the buffer holds {len(out)}; "
                "pass a buffer of at least the payload size"
            )
        _byte_view(out)[:n] = value
        return n

    async def contains(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        since = self._ledger.stamp()
        with self._errors("contains", keys[0]):
            pipe = self._require().pipeline(transaction=False)
            for key in keys:
                pipe.execute_command("EXISTS", self._name(key))
            found = [bool(n) for n in await pipe.execute()]
        self._ledger.forget_missing((k for k, hit in zip(keys, found) if not hit), since)
        return found

    async def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        with self._errors("delete", keys[0]):
            pipe = self._require().pipeline(transaction=False)
            for key in keys:
                # UNLINK frees large values off the server's main thread; one key per command
                # so that a cluster pipeline routes each to its own slot.
                pipe.execute_command("UNLINK", self._name(key))
            removed = sum(int(n) for n in await pipe.execute())
        self._ledger.forget(keys)
        return removed

    async def usage(self) -> Usage:
        return Usage(capacity=self.capacity, used=self._ledger.used, items=self._ledger.items)

    # -- batches (one round trip per node) ---------------------------------------------------

    async def put_many(self, items: Sequence[tuple[str, memoryview | bytes | bytearray]]) -> None:
        """Store several payloads in one pipeline; all are charged first or none."""
        views = [(k, _byte_view(v)) for k, v in items]
        reservations = []
        try:
            for key, view in views:
                reservations.append(self._ledger.reserve(key, view.nbytes))
            with self._errors("put_many", views[0][0] if views else ""):
                pipe = self._require().pipeline(transaction=False)
                px = int(self.opts.ttl * 1000) if self.opts.ttl else None
                for key, view in views:
                    pipe.set(self._name(key), view, px=px)
                await pipe.execute()
        except BaseException:
            for reservation in reversed(reservations):
                self._ledger.rollback(reservation)
            raise
        for reservation in reservations:
            self._ledger.landed(reservation)

    async def get_many(self, keys: Sequence[str], outs: Sequence[memoryview]) -> list[int | None]:
        """Read several payloads in one pipeline into the matching buffers."""
        if len(keys) != len(outs):
            raise ValueError(f"get_many got {len(keys)} keys but {len(outs)} buffers")
        since = self._ledger.stamp()
        with self._errors("get_many", keys[0] if keys else ""):
            pipe = self._require().pipeline(transaction=False)
            for key in keys:
                pipe.get(self._name(key))
            values = await pipe.execute(raise_on_error=False)
        result: list[int | None] = []
        for key, value, out in zip(keys, values, outs):
            if isinstance(value, Exception):  # this key's own error (WRONGTYPE names it)
                with self._errors("get_many", key):
                    raise value
            if value is None:
                self._ledger.forget_missing([key], since)
                result.append(None)
                continue
            if len(out) < len(value):
                raise BufferTooSmallError(f"redis value of {key!r} is {len(value)} bytes, buffer {len(out)}")
            _byte_view(out)[: len(value)] = value
            result.append(len(value))
        return result

    # -- helpers -----------------------------------------------------------------------------

    def _require(self) -> Redis | RedisCluster:
        if self._client is None:
            raise BackendError(f"redis tier {self.context.tier!r} is not open; call open() first")
        return self._client

    @contextlib.contextmanager
    def _errors(self, op: str, key: str = "") -> Iterator[None]:
        """Turn redis-py errors into BackendError (OOM into BackendFullError), secrets-free."""
        import redis.exceptions as rex

        what = f"redis {op} {key!r} on {self._where}" if key else f"redis {op} on {self._where}"
        try:
            yield
        except rex.OutOfMemoryError as exc:
            raise BackendFullError(
                f"{what}: the server is out of memory ({exc}); set maxmemory-policy to "
                "allkeys-lru or volatile-lru so Redis evicts old payloads"
            ) from exc
        except rex.ResponseError as exc:
            if str(exc).startswith("WRONGTYPE"):  # another program's list, hash... under our key
                raise BadValueError(f"{what}: the key holds a non-string value ({exc}); it is not a "
                                    "KVortex payload (key_prefix shared with another application?)") from exc
            raise BackendError(f"{what}: {exc}") from exc
        except (TimeoutError, rex.RedisError, rex.RedisClusterException, OSError) as exc:
            raise BackendError(
                f"{what} failed: {type(exc).__name__}: {exc}; check that the server is up and "
                "reachable (url, TLS and auth options)"
            ) from exc
