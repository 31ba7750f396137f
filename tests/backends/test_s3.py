"""The s3 backend against moto in server mode (a real HTTP S3 endpoint on loopback)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any

import pytest

from kvortex_backends.s3 import S3Backend, S3Options
from kvortex_core.errors import BackendError, BufferTooSmallError
from kvortex_core.storage.protocol import BackendContext
from kvortex_core.testing import BackendConformance, run_scenario

pytestmark = pytest.mark.s3
pytest.importorskip("boto3")

MiB = 1024 * 1024


def make_backend(endpoint: str, bucket: str, capacity: int = 256 * MiB, **options: Any) -> S3Backend:
    opts = S3Options(bucket=bucket, endpoint_url=endpoint, region="us-east-1", **options)
    return S3Backend(opts, capacity=capacity, context=BackendContext(tier="s3"))


run = run_scenario  # open, run the scenario, always close


class TestS3Conformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self, moto_s3, s3_bucket):  # type: ignore[no-untyped-def]
        return lambda capacity: make_backend(moto_s3.endpoint_url, s3_bucket, capacity)


class TestS3HeadModeConformance(BackendConformance):
    """The same contract when contains uses one HEAD per key instead of listings."""

    sizes = (1, 65537)

    @pytest.fixture
    def backend_factory(self, moto_s3, s3_bucket):  # type: ignore[no-untyped-def]
        return lambda capacity: make_backend(moto_s3.endpoint_url, s3_bucket, capacity,
                                             contains_mode="head")


def test_multipart_upload_and_ranged_parallel_read(moto_s3, s3_bucket) -> None:
    """Above the threshold: multipart put, byte-range reads straight into the caller's buffer."""
    value = os.urandom(12 * MiB + 7)
    backend = make_backend(moto_s3.endpoint_url, s3_bucket, multipart_threshold="5MiB",
                           multipart_chunksize="5MiB")

    async def scenario(b: S3Backend) -> None:
        await b.put("big", memoryview(value))
        out = bytearray(len(value) + 100)
        assert await b.get("big", memoryview(out)) == len(value)
        assert bytes(out[: len(value)]) == value
        with pytest.raises(BufferTooSmallError):
            await b.get("big", memoryview(bytearray(MiB)))

    run(backend, scenario)
    head = moto_s3.client().head_object(Bucket=s3_bucket, Key="kvortex/big")
    assert head["ContentLength"] == len(value)
    assert "-" in head["ETag"], "a multipart upload has an ETag ending in -<parts>"


def test_one_object_per_payload_under_prefix(moto_s3, s3_bucket) -> None:
    value = os.urandom(3000)
    run(make_backend(moto_s3.endpoint_url, s3_bucket, prefix="team/a/"),
        lambda b: b.put("cd" * 20, value))
    listed = moto_s3.client().list_objects_v2(Bucket=s3_bucket)["Contents"]
    assert [o["Key"] for o in listed] == [f"team/a/{'cd' * 20}"]
    body = moto_s3.client().get_object(Bucket=s3_bucket, Key=f"team/a/{'cd' * 20}")["Body"].read()
    assert body == value


def test_listing_cache_sees_other_writers_after_ttl(moto_s3, s3_bucket) -> None:
    """contains answers from a short-lived listing: another writer's key shows up once it expires."""
    raw = moto_s3.client()

    async def scenario(b: S3Backend) -> None:
        await b.put("mine", b"m" * 10)
        assert await b.contains(["mine", "theirs"]) == [True, False]
        raw.put_object(Bucket=s3_bucket, Key="kvortex/theirs", Body=b"t" * 10)
        assert await b.contains(["mine", "theirs"]) == [True, False]  # cached listing
        assert await b.contains(["theirs"]) == [True]  # a single key always HEADs
        await asyncio.sleep(0.35)
        assert await b.contains(["mine", "theirs"]) == [True, True]
        await b.delete(["mine"])
        assert await b.contains(["mine", "theirs"]) == [False, True]  # own delete patches the cache
        assert (await b.usage()).used == 0  # "theirs" is never charged to this instance

    run(make_backend(moto_s3.endpoint_url, s3_bucket, list_cache_ttl=0.3), scenario)


def test_listing_too_large_falls_back_to_heads(moto_s3, s3_bucket) -> None:
    async def scenario(b: S3Backend) -> None:
        for i in range(5):
            await b.put(f"k{i}", b"x")
        assert await b.contains([f"k{i}" for i in range(7)]) == [True] * 5 + [False] * 2

    run(make_backend(moto_s3.endpoint_url, s3_bucket, list_max_objects=3), scenario)


def test_missing_bucket_raises_backend_error(moto_s3) -> None:
    backend = make_backend(moto_s3.endpoint_url, "no-such-bucket-kvortex")
    with pytest.raises(BackendError, match="bucket 'no-such-bucket-kvortex' does not exist at http.*; create "
                                           "it or fix the `bucket` option"):  # HeadBucket: a bare 404
        asyncio.run(backend.open())
    asyncio.run(backend.close())


def test_an_unknown_profile_is_named_with_the_option(moto_s3) -> None:
    backend = make_backend(moto_s3.endpoint_url, "kv-profile", profile="no-such-profile-kvortex")
    with pytest.raises(BackendError, match="no-such-profile-kvortex.*fix the option `profile`"):
        asyncio.run(backend.open())
    asyncio.run(backend.close())


def test_credentials_never_in_errors(moto_s3, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    backend = make_backend(moto_s3.endpoint_url, "absent-bucket-kvortex")
    with pytest.raises(BackendError) as err:
        asyncio.run(backend.open())
    assert "very-secret-value" not in str(err.value)
    assert "very-secret-value" not in repr(backend.opts)
    asyncio.run(backend.close())


def test_options_validate() -> None:
    with pytest.raises(ValueError):
        S3Options()  # bucket is required
    with pytest.raises(ValueError):
        S3Options(bucket="b" * 3, prefix="/abs/")
    with pytest.raises(ValueError):
        S3Options(bucket="bkt", multipart_chunksize="1MiB")  # S3 parts are at least 5 MiB
    with pytest.raises(ValueError):
        S3Options(bucket="bkt", endpoint="http://x")  # typo: unknown option
    assert S3Options(bucket="bkt", multipart_threshold="128MiB").multipart_threshold == 128 * MiB
    for bucket in ("Bad_Bucket", "-kv", "kv-", "a..b", "kv/x"):  # refused by S3 itself later
        with pytest.raises(ValueError, match="not a valid S3 bucket name"):
            S3Options(bucket=bucket)
    for prefix in ("../../", "kv/../x/", "./kv/"):
        with pytest.raises(ValueError, match="'..' segment"):
            S3Options(bucket="bkt", prefix=prefix)
    assert S3Options(bucket="kv.cache-01", prefix="team/a/").prefix == "team/a/"
    with pytest.raises(ValueError, match="endpoint_url 'minio:9000' must start with http:// or https://"):
        S3Options(bucket="bkt", endpoint_url="minio:9000")


def test_plugin_registers_s3() -> None:
    from kvortex_core.plugins.manager import PluginManager

    info = PluginManager().backend("s3")
    assert info.cls is S3Backend and info.cls.shared


def test_ranged_read_never_mixes_two_writes(moto_s3, s3_bucket, monkeypatch) -> None:
    """An overwrite between the first range and the rest fails the read (If-Match), no mix."""
    from kvortex_backends import _s3_io

    old, new = os.urandom(11 * MiB), os.urandom(11 * MiB)
    raw = moto_s3.client()
    original = _s3_io.get_first

    def first_then_overwrite(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        raw.put_object(Bucket=s3_bucket, Key="kvortex/race", Body=new)  # another writer
        return result

    async def scenario(b: S3Backend) -> None:
        await b.put("race", old)
        monkeypatch.setattr(_s3_io, "get_first", first_then_overwrite)
        with pytest.raises(BackendError, match="PreconditionFailed"):
            await b.get("race", memoryview(bytearray(len(old))))
        monkeypatch.setattr(_s3_io, "get_first", original)
        out = bytearray(len(new))
        assert await b.get("race", memoryview(out)) == len(new) and bytes(out) == new

    run(make_backend(moto_s3.endpoint_url, s3_bucket, multipart_threshold="5MiB",
                     multipart_chunksize="5MiB"), scenario)


def test_a_listing_slower_than_its_ttl_serves_every_caller_queued_behind_it(moto_s3, s3_bucket,
                                                                            monkeypatch) -> None:
    """Callers queued behind one slow listing reuse it. Dated from its request, a listing slower
    than ``list_cache_ttl`` was stale on arrival: each queued caller listed again in turn, past
    ``backend_op_s``, and the timeouts took a healthy tier out of service (a red-team finding:
    12 lookups, 12 listings, 11 timeouts)."""
    from kvortex_backends import _s3_io

    real, listings = _s3_io.list_names, []

    def slow(*args: Any, **kwargs: Any) -> Any:
        listings.append(1)
        time.sleep(0.3)  # a large prefix: longer than list_cache_ttl
        return real(*args, **kwargs)

    async def scenario(b: S3Backend) -> None:
        await b.put("mine", b"m" * 10)
        monkeypatch.setattr(_s3_io, "list_names", slow)
        answers = await asyncio.gather(*(b.contains(["mine", f"other{i}"]) for i in range(6)))
        assert answers == [[True, False]] * 6
        assert len(listings) == 1

    run(make_backend(moto_s3.endpoint_url, s3_bucket, list_cache_ttl=0.2), scenario)


@pytest.mark.parametrize("when", ["listing-in-flight", "listing-cached"])
def test_a_put_in_flight_stays_charged_when_a_listing_misses_it(moto_s3, s3_bucket, monkeypatch,
                                                                 when: str) -> None:
    """A listing fetched (or cached) before a put of ours landed does not show it; the put's charge
    must stay in the ledger, or the instance's budget under-counts what it stored."""
    from kvortex_backends import _s3_io

    real_put, started, release = _s3_io.put_small, threading.Event(), threading.Event()

    def held_put(*args: Any, **kwargs: Any) -> Any:
        started.set()
        release.wait(10)
        return real_put(*args, **kwargs)

    async def scenario(b: S3Backend) -> None:
        await b.put("early", b"e" * 10)
        if when == "listing-cached":
            assert await b.contains(["early", "late"]) == [True, False]  # cached before the put
        monkeypatch.setattr(_s3_io, "put_small", held_put)
        put = asyncio.ensure_future(b.put("late", b"l" * 100))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        assert await b.contains(["early", "late"]) == [True, False]  # not landed yet
        assert (await b.usage()).used == 110  # still charged
        release.set()
        await put
        assert (await b.usage()).used == 110
        assert await b.contains(["early", "late"]) == [True, True]  # own write patches the listing

    run(make_backend(moto_s3.endpoint_url, s3_bucket, list_cache_ttl=60), scenario)


def test_a_write_that_lands_while_a_listing_is_fetched_is_in_that_listing(moto_s3, s3_bucket,
                                                                          monkeypatch) -> None:
    """A listing sent before our put landed may not show it; dated at arrival, it would answer
    "absent" for our own key for a whole list_cache_ttl."""
    from kvortex_backends import _s3_io

    real_list, listed, release = _s3_io.list_names, threading.Event(), threading.Event()

    def held_listing(*args: Any, **kwargs: Any) -> Any:
        names = real_list(*args, **kwargs)  # taken before the put below
        listed.set()
        release.wait(10)
        return names

    async def scenario(b: S3Backend) -> None:
        monkeypatch.setattr(_s3_io, "list_names", held_listing)
        asked = asyncio.ensure_future(b.contains(["new", "other"]))
        await asyncio.get_running_loop().run_in_executor(None, listed.wait, 10)
        await b.put("new", b"n" * 10)  # lands while the listing is on its way back
        release.set()
        assert (await asked)[1] is False  # (asked before the put landed: either answer for "new")
        assert await b.contains(["new", "other"]) == [True, False]  # the cached listing has it

    run(make_backend(moto_s3.endpoint_url, s3_bucket, list_cache_ttl=60), scenario)
