"""``s3``: a shared tier in any S3-compatible object store (boto3 + s3transfer).

One object per chunk payload, ``<prefix><chunk key hex>``. Blocking boto3 calls run on a
dedicated thread pool of ``max_concurrency`` workers (botocore's HTTP pool is sized to match).
Payloads of ``multipart_threshold`` bytes or more are uploaded with s3transfer's multipart
upload and read back with parallel byte-range GETs pinned to one version by ``If-Match`` (a
reader never mixes two writes). Retries use botocore's ``standard`` mode: exponential backoff
with jitter, ``max_attempts`` tries in all; connect and read timeouts bound every request, so a
stalled endpoint raises :class:`~kvortex_core.errors.BackendError` promptly.

``contains`` for several keys lists the prefix once and answers from that listing for
``list_cache_ttl`` seconds (one LIST per 1000 objects instead of one HEAD per key); see
docs/shared-tiers.md for the trade-offs. ``capacity`` is this instance's budget, accounted by
:class:`~kvortex_backends.ledger.WriteLedger`. boto3 is imported in :meth:`S3Backend.open`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import ByteSize, Field, field_validator

from kvortex_backends import _s3_io as s3io
from kvortex_backends.ledger import WriteLedger
from kvortex_core.errors import BackendError, BufferTooSmallError
from kvortex_core.storage.protocol import (
    BackendContext,
    BackendOptions,
    Health,
    StorageBackend,
    Usage,
)

T = TypeVar("T")
MiB = 1024 * 1024
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class S3Options(BackendOptions):
    """Options of an ``s3`` tier. Credentials come from boto3's standard chain, never from here."""

    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = "kvortex/"
    endpoint_url: str | None = Field(None, description="any S3-compatible endpoint; none = AWS")
    region: str | None = None
    profile: str | None = Field(None, description="named profile of the shared AWS config files")
    addressing_style: Literal["auto", "virtual", "path"] = "auto"
    verify: bool | str = Field(True, description="TLS verification: true, false or a CA bundle path")
    max_concurrency: int = Field(16, ge=1, le=256, description="threads and HTTP connections")
    multipart_threshold: ByteSize = Field(ByteSize(64 * MiB), ge=5 * MiB)
    multipart_chunksize: ByteSize = Field(ByteSize(16 * MiB), ge=5 * MiB)
    max_attempts: int = Field(3, ge=1, le=20, description="tries per request, with backoff")
    connect_timeout: float = Field(2.0, gt=0)
    read_timeout: float = Field(5.0, gt=0, description="seconds one socket read may wait")
    request_timeout: float = Field(
        30.0, gt=0, description="seconds one GET may take in all: a body trickling in slower "
        "than read_timeout allows is cut here, and its pool thread freed")
    contains_mode: Literal["auto", "list", "head"] = "auto"
    list_cache_ttl: float = Field(2.0, ge=0, description="seconds a prefix listing answers contains")
    list_max_objects: int = Field(100_000, ge=1, description="above this, contains uses HEADs")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"endpoint_url {v!r} must start with http:// or https://, "
                             "e.g. http://minio:9000")
        return v

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, v: str) -> str:
        # S3's naming rules: an endpoint would refuse anything else at the first request
        if not _BUCKET_RE.fullmatch(v) or ".." in v:
            raise ValueError(
                f"bucket {v!r} is not a valid S3 bucket name: use 3-63 lowercase letters, digits, "
                "'-' and '.', starting and ending with a letter or digit (e.g. 'kv-cache')"
            )
        return v

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, v: str) -> str:
        if v.startswith("/"):
            raise ValueError(f"prefix {v!r} must not start with '/'; write e.g. 'kvortex/'")
        if any(part in (".", "..") for part in v.split("/")):
            raise ValueError(f"prefix {v!r} holds a '.' or '..' segment; write e.g. 'kvortex/'")
        return v


class _Listing:
    """A short-lived snapshot of the key names under the prefix, patched by our own writes."""

    def __init__(self, names: set[str] | None, taken: float, stamp: int) -> None:
        self.names = names  # None: too many objects to list, use HEADs
        self.taken = taken  # when the listing arrived (time.monotonic())
        self.stamp = stamp  # the ledger's stamp when it was asked for (WriteLedger.stamp)


class S3Backend(StorageBackend):
    """A shared tier in an S3 bucket."""

    Options: ClassVar[type[BackendOptions]] = S3Options
    requires: ClassVar[tuple[str, ...]] = ("boto3",)
    install_hint: ClassVar[str | None] = 'pip install "kvortex-backends[s3]"'
    shared: ClassVar[bool] = True

    def __init__(self, options: BackendOptions, *, capacity: int, context: BackendContext) -> None:
        super().__init__(options, capacity=capacity, context=context)
        self.opts: S3Options = options  # type: ignore[assignment]
        self._ledger = WriteLedger(context.tier, capacity)
        self._client: Any = None
        self._manager: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._listing: _Listing | None = None
        self._listing_lock = asyncio.Lock()
        self._landed_while_listing: set[str] | None = None  # keys put while a listing is fetched
        self._where = f"s3://{self.opts.bucket}/{self.opts.prefix}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Build the client, thread pool and transfer manager, then check the bucket exists.

        Calling it again after a failure (the tiering retries) reuses what was built.
        """
        from kvortex_backends._s3_client import make_client, make_transfer_manager

        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.opts.max_concurrency, thread_name_prefix="kvortex-s3")
        if self._client is None:
            with self._errors("open", ""):  # a profile that does not exist, say
                self._client = make_client(self.opts)
            self._manager = make_transfer_manager(self._client, self.opts)
        await self._call("open", "", lambda: self._client.head_bucket(Bucket=self.opts.bucket))

    async def close(self) -> None:
        manager, pool, client = self._manager, self._pool, self._client
        self._manager = self._pool = self._client = None
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.shutdown()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    async def health(self) -> Health:
        try:
            await self._call("health", "", lambda: self._client.head_bucket(Bucket=self.opts.bucket))
        except BackendError as exc:
            return Health(ok=False, detail=str(exc))
        return Health(ok=True, detail=self._where)

    # -- data --------------------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.opts.prefix + key

    async def put(self, key: str, data: memoryview | bytes | bytearray) -> None:
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        reservation = self._ledger.reserve(key, view.nbytes)
        name, bucket = self._name(key), self.opts.bucket
        try:
            if view.nbytes >= self.opts.multipart_threshold:
                await self._call("put", key, lambda: s3io.put_large(self._manager, bucket, name, view))
            else:
                await self._call("put", key, lambda: s3io.put_small(self._client, bucket, name, view))
        except BaseException:
            self._ledger.rollback(reservation)
            raise
        self._ledger.landed(reservation)
        if self._listing is not None and self._listing.names is not None:
            self._listing.names.add(key)
        if self._landed_while_listing is not None:  # the listing in flight may not show it
            self._landed_while_listing.add(key)

    async def get(self, key: str, out: memoryview) -> int | None:
        view = out if out.format == "B" and out.ndim == 1 else out.cast("B")
        name, bucket = self._name(key), self.opts.bucket
        # A buffer below the threshold holds only objects read in one request; above it, the
        # first range tells the size and the rest is fetched as parallel ranges.
        threshold = int(self.opts.multipart_threshold)
        first_len = threshold if len(view) >= threshold else None
        since = self._ledger.stamp()
        first = await self._call(
            "get", key, lambda: s3io.get_first(self._client, bucket, name, view, first_len,
                                           self.opts.request_timeout)
        )
        if first is None:
            self._ledger.forget_missing([key], since)
            return None
        if first.got < first.total:
            await self._get_rest(key, view, first)
        return first.total

    async def _get_rest(self, key: str, view: memoryview, first: s3io.FirstRead) -> None:
        """Parallel byte ranges of the rest, all of the version the first range came from."""
        name, bucket, step = self._name(key), self.opts.bucket, int(self.opts.multipart_chunksize)
        starts = range(first.got, first.total, step)

        def fetch(start: int) -> Callable[[], None]:
            part = view[start : min(start + step, first.total)]
            return lambda: s3io.get_range(self._client, bucket, name, part, start, first.etag,
                                          self.opts.request_timeout)

        # Every range ends before this returns or raises: ranges still running on pool threads
        # after a failed one would keep writing into ``view``, a buffer the caller then reuses
        # (a red-team finding: a cpu slot taken by the next save, then overwritten)
        results = await asyncio.gather(*(self._call("get", key, fetch(s)) for s in starts),
                                       return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed

    async def contains(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        since = self._ledger.stamp()
        listing = await self._fresh_listing(len(keys))
        if listing is not None and listing.names is not None:
            found = [k in listing.names for k in keys]
            since = min(since, listing.stamp)  # what the listing missed may have landed after it
        else:
            found = await self._heads(keys)
        self._ledger.forget_missing((k for k, hit in zip(keys, found) if not hit), since)
        return found

    async def _heads(self, keys: Sequence[str]) -> list[bool]:
        bucket = self.opts.bucket

        def probe(name: str) -> Callable[[], bool]:
            return lambda: s3io.head(self._client, bucket, name)

        return list(await asyncio.gather(*(self._call("contains", k, probe(self._name(k))) for k in keys)))

    async def _fresh_listing(self, n_keys: int) -> _Listing | None:
        """The cached listing, refreshed when stale; None when HEADs are the better choice."""
        mode = self.opts.contains_mode
        if mode == "head" or (mode == "auto" and n_keys < 2):
            return None
        async with self._listing_lock:  # one LIST at a time; the others reuse its result
            listing = self._listing
            # Its age counts from its arrival: dated from the request, a listing slower than
            # list_cache_ttl was stale for every caller queued behind it, each listed again in
            # turn, past backend_op_s, and the timeouts took a healthy tier out of service.
            if listing is None or time.monotonic() - listing.taken > self.opts.list_cache_ttl:
                stamp, landed = self._ledger.stamp(), set[str]()
                self._landed_while_listing = landed
                try:
                    names = await self._call("contains", "", lambda: s3io.list_names(
                        self._client, self.opts.bucket, self.opts.prefix, self.opts.list_max_objects))
                finally:
                    self._landed_while_listing = None
                if names is not None:
                    names |= landed  # our writes that landed while it was fetched
                listing = self._listing = _Listing(names, time.monotonic(), stamp)
        return listing

    async def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        # S3 reports every key of a DeleteObjects as deleted, present or not: HEAD to count.
        present = [k for k, hit in zip(keys, await self._heads(keys)) if hit]
        if present:
            names = [self._name(k) for k in present]
            await self._call("delete", present[0],
                             lambda: s3io.delete_names(self._client, self.opts.bucket, names))
        self._ledger.forget(keys)
        if self._listing is not None and self._listing.names is not None:
            self._listing.names.difference_update(keys)
        if self._landed_while_listing is not None:
            self._landed_while_listing.difference_update(keys)
        return len(present)

    async def usage(self) -> Usage:
        return Usage(capacity=self.capacity, used=self._ledger.used, items=self._ledger.items)

    # -- helpers -----------------------------------------------------------------------------

    async def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        if self._pool is None or self._client is None:
            raise BackendError(f"s3 tier {self.context.tier!r} is not open; call open() first")
        loop = asyncio.get_running_loop()
        with self._errors(op, key):
            return await loop.run_in_executor(self._pool, fn)

    @contextlib.contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """botocore errors -> BackendError naming the bucket and the fix (never credentials)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            ProfileNotFound,
        )
        from s3transfer import exceptions as transfer_errors

        transfer = (transfer_errors.RetriesExceededError, transfer_errors.S3UploadFailedError,
                    transfer_errors.TransferNotDoneError, transfer_errors.FatalError)

        what = f"s3 {op} {key!r} on {self._where}" if key else f"s3 {op} on {self._where}"
        try:
            yield
        except (BackendError, BufferTooSmallError):
            raise
        except NoCredentialsError as exc:
            raise BackendError(
                f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "a profile (option `profile`) or an instance role"
            ) from exc
        except ClientError as exc:
            code = s3io.error_code(exc)
            hint = {"NoSuchBucket": "; create the bucket or fix the `bucket` option",
                    "PreconditionFailed": "; the object was overwritten during the read, retry",
                    "AccessDenied": "; check the credentials' permissions on the bucket"}.get(code, "")
            if op == "open" and code == "404":  # HeadBucket has no body: a missing bucket is a bare 404
                hint = (f": bucket {self.opts.bucket!r} does not exist at {self.opts.endpoint_url or 'AWS'}; "
                        "create it or fix the `bucket` option")
            raise BackendError(f"{what} failed: {code or exc}{hint}") from exc
        except ProfileNotFound as exc:
            raise BackendError(f"{what}: {exc}; fix the option `profile` or add the profile to "
                               "~/.aws/config") from exc
        except (BotoCoreError, OSError, *transfer) as exc:
            raise BackendError(
                f"{what} failed: {type(exc).__name__}: {exc}; check endpoint_url, network and "
                "timeouts (connect_timeout, read_timeout)"
            ) from exc
