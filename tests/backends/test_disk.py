"""The disk backend: conformance, restart, corruption, crash safety, failures."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvortex_backends import disk_io
from kvortex_backends.disk import DiskBackend
from kvortex_core.config import KVortexConfig
from kvortex_core.data import payload as pl
from kvortex_core.errors import BackendError, ConfigError, PayloadError
from kvortex_core.storage.protocol import BackendContext
from kvortex_core.testing import BackendConformance


def _disk(path, capacity: int, **opts: object) -> DiskBackend:  # type: ignore[no-untyped-def]
    return DiskBackend(
        DiskBackend.Options(path=path, **opts),
        capacity=capacity,
        context=BackendContext(tier="disk"),
    )


class TestDiskConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path):  # type: ignore[no-untyped-def]
        return lambda capacity: _disk(tmp_path / "cache", capacity)


class TestDiskConformanceCompressedNoFsync(BackendConformance):
    @pytest.fixture
    def backend_factory(self, tmp_path):  # type: ignore[no-untyped-def]
        return lambda capacity: _disk(
            tmp_path / "cache",
            capacity,
            compression="lz4",
            fsync=False,
            o_direct="on",
            shard_depth=0,
        )


# -- helpers ---------------------------------------------------------------------------------
NS = bytes.fromhex("ab" * 16)
SHAPE = (4, 1024)
MiB = 1024 * 1024


def _ns_disk(path: Path, capacity: int = 64 * MiB, **opts: object) -> DiskBackend:
    ctx = BackendContext(tier="disk", namespace=NS.hex())
    return DiskBackend(DiskBackend.Options(path=path, **opts), capacity=capacity, context=ctx)


def _value(i: int, n: int = 4096) -> tuple[str, bytes]:
    """A well-formed payload (header + n bytes) for key number i."""
    key = i.to_bytes(4, "big") * 8
    body = bytes((i + j) % 251 for j in range(n))
    buf = bytearray(pl.HEADER_BYTES + n)
    buf[pl.HEADER_BYTES :] = body
    pl.seal(buf, key=key, namespace=NS, shape=(n,), dtype="uint8", payload_len=n)
    return key.hex(), bytes(buf)


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


async def _opened(b: DiskBackend) -> DiskBackend:
    await b.open()
    return b


def _files(root: Path) -> list[Path]:
    """The tier's cache files (not the file naming its directory's owner)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != disk_io.OWNER_NAME)


# -- restart, layout, permissions ------------------------------------------------------------
def test_restart_keeps_cache_and_layout_is_sharded_private(tmp_path: Path) -> None:
    values = dict(_value(i) for i in range(5))

    async def first() -> None:
        b = await _opened(_ns_disk(tmp_path))
        for k, v in values.items():
            await b.put(k, v)
        await b.close()

    async def second() -> None:
        b = await _opened(_ns_disk(tmp_path))
        assert sorted(k for k, _ in await b.scan()) == sorted(values)
        assert (await b.usage()).used == sum(map(len, values.values()))
        for k, v in values.items():
            out = bytearray(len(v))
            assert await b.get(k, memoryview(out)) == len(v) and bytes(out) == v
        await b.close()

    _run(first())
    files = _files(tmp_path)
    assert len(files) == 5
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600
        assert f.parent.stat().st_mode & 0o777 == 0o700
        key = f.name.removesuffix(".kv")
        assert f.parent.name == key[2:4] and f.parent.parent.name == key[:2]
    _run(second())


def test_scan_removes_damaged_foreign_and_temp_files(tmp_path: Path) -> None:
    values = dict(_value(i) for i in range(6))
    _run(_put_all(tmp_path, values))
    keys = sorted(values)
    paths = {k: Path(_ns_disk(tmp_path)._path(k)) for k in keys}
    # truncated, header bit flip, foreign namespace, foreign junk, renamed file, orphan temp
    paths[keys[0]].write_bytes(values[keys[0]][:-100])
    flipped = bytearray(values[keys[1]])
    flipped[20] ^= 0x04
    paths[keys[1]].write_bytes(flipped)
    other = bytearray(values[keys[2]])
    pl.write_header(
        other,
        key=bytes.fromhex(keys[2]),
        namespace=b"other model",
        shape=(4096,),
        dtype="uint8",
        payload_len=4096,
        checksum=pl.checksum(other[pl.HEADER_BYTES :]),
    )
    paths[keys[2]].write_bytes(other)
    paths[keys[3]].write_bytes(b"\x89PNG" + bytes(5000))
    (paths[keys[4]].parent / "junk.txt").write_bytes(b"x")
    temp = Path(disk_io.temp_name(str(paths[keys[5]])))
    temp.write_bytes(values[keys[5]][:777])

    async def reopen() -> None:
        b = await _opened(_ns_disk(tmp_path))
        assert sorted(k for k, _ in await b.scan()) == [keys[4], keys[5]]
        assert b.scan_removed == {"temp": 1, "damaged": 2, "foreign": 3}
        await b.close()

    _run(reopen())
    assert sorted(f.name for f in _files(tmp_path)) == sorted(f"{k}.kv" for k in keys[4:])


async def _put_all(path: Path, values: dict[str, bytes], **opts: object) -> None:
    b = await _opened(_ns_disk(path, **opts))
    for k, v in values.items():
        await b.put(k, v)
    await b.close()


def test_payload_bit_flip_is_caught_by_parse(tmp_path: Path) -> None:
    """The disk tier returns bytes as stored; the payload checksum catches a flipped bit."""
    k, v = _value(1)
    _run(_put_all(tmp_path, {k: v}))
    path = Path(_ns_disk(tmp_path)._path(k))
    data = bytearray(path.read_bytes())
    data[pl.HEADER_BYTES + 1000] ^= 0x10
    path.write_bytes(data)

    async def check() -> None:
        b = await _opened(_ns_disk(tmp_path))  # headers are fine, so the scan keeps it
        out = bytearray(len(v))
        assert await b.get(k, memoryview(out)) == len(v)
        with pytest.raises(PayloadError, match="checksum"):
            pl.parse(out, key=bytes.fromhex(k), namespace=NS, shape=(4096,), dtype="uint8")
        await b.close()

    _run(check())


def test_compression_on_disk_shrinks_and_reads_back_raw(tmp_path: Path) -> None:
    key = b"\x07" * 32
    buf = bytearray(pl.HEADER_BYTES + MiB)  # zeros compress well
    pl.seal(buf, key=key, namespace=NS, shape=(MiB,), dtype="uint8", payload_len=MiB)
    _run(_put_all(tmp_path, {key.hex(): bytes(buf)}, compression="zstd"))
    (f,) = _files(tmp_path)
    assert f.stat().st_size < len(buf) // 10

    async def read(**opts: object) -> None:
        b = await _opened(_ns_disk(tmp_path, **opts))
        out = bytearray(len(buf))
        assert await b.get(key.hex(), memoryview(out)) == len(buf) and out == buf
        await b.close()

    _run(read(compression="zstd"))
    _run(read())  # turning compression off later still reads old compressed files


# -- crash safety ----------------------------------------------------------------------------
_WRITER = textwrap.dedent("""
    import asyncio, sys
    from kvortex_backends.disk import DiskBackend
    from kvortex_core.data import payload as pl
    from kvortex_core.storage.protocol import BackendContext

    async def main():
        ns = bytes.fromhex(sys.argv[2])
        b = DiskBackend(DiskBackend.Options(path=sys.argv[1]), capacity=1 << 40,
                        context=BackendContext(namespace=ns.hex()))
        await b.open()
        n = 16 << 20
        value = bytearray(pl.HEADER_BYTES + n)
        i = 0
        while True:
            key = i.to_bytes(32, "big")
            value[pl.HEADER_BYTES:pl.HEADER_BYTES + 8] = key[-8:]
            pl.seal(value, key=key, namespace=ns, shape=(n,), dtype="uint8", payload_len=n)
            await b.put(key.hex(), value)
            i += 1
    asyncio.run(main())
""")


def test_sigkill_mid_write_leaves_no_partial_entry(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), NS.hex()])

    def state() -> tuple[int, bool]:
        names = [p.name for p in tmp_path.rglob("*") if p.is_file()]
        return sum(n.endswith(".kv") for n in names), any(disk_io.TMP_MARK in n for n in names)

    try:
        deadline = time.monotonic() + 120
        while not (state()[0] >= 2 and state()[1]):  # killed while a write is in flight
            assert proc.poll() is None, "writer died on its own"
            assert time.monotonic() < deadline, "writer never got going"
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    n = 16 << 20

    async def reopen() -> None:
        b = await _opened(_ns_disk(tmp_path))
        entries = await b.scan()
        assert len(entries) >= 2 and b.scan_removed["damaged"] == 0
        out = bytearray(pl.HEADER_BYTES + n)
        for k, size in entries:  # every visible entry is complete and verifies
            assert size == len(out) and await b.get(k, memoryview(out)) == size
            body = pl.parse(out, key=bytes.fromhex(k), namespace=NS, shape=(n,), dtype="uint8")
            assert bytes(body[:8]) == bytes.fromhex(k)[-8:]
        await b.close()

    _run(reopen())
    assert not any(disk_io.TMP_MARK in p.name for p in tmp_path.rglob("*"))


# -- one engine per directory ----------------------------------------------------------------
def test_a_second_backend_on_the_same_directory_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    values = dict(_value(i) for i in range(3))

    async def go() -> None:
        first = await _opened(_ns_disk(tmp_path))
        for k, v in values.items():
            await first.put(k, v)
        second = _ns_disk(tmp_path)
        with pytest.raises(BackendError, match=rf"in use by another engine \(pid {os.getpid()} on .*: this process, .*\).*own directory"):
            await second.open()
        # the refused open changed nothing: the owner still reads every value
        for k, v in values.items():
            out = bytearray(len(v))
            assert await first.get(k, memoryview(out)) == len(v) and bytes(out) == v
        await first.close()
        await second.open()  # the retried open (the tier's probe) takes over
        assert sorted(k for k, _ in await second.scan()) == sorted(values)
        await second.close()
        owner = next(p for p in tmp_path.rglob(disk_io.OWNER_NAME))
        assert owner.stat().st_mode & 0o777 == 0o600
        # another namespace (another model or salt) is another directory: no conflict
        other = DiskBackend(DiskBackend.Options(path=tmp_path), capacity=MiB,
                            context=BackendContext(tier="disk", namespace="cd" * 16))
        owner = await _opened(_ns_disk(tmp_path))
        await other.open()
        await other.close()
        await owner.close()

    _run(go())


def test_an_observer_reads_an_owned_directory_and_changes_nothing(tmp_path: Path) -> None:
    """The vLLM scheduler's view of a rank's directory: no lock, no cleaning, no writes."""
    values = dict(_value(i) for i in range(3))

    async def go() -> None:
        owner = await _opened(_ns_disk(tmp_path))
        for k, v in values.items():
            await owner.put(k, v)
        folder = Path(owner._path(next(iter(values)))).parent
        temp = folder / ("ab" * 4 + disk_io.SUFFIX + disk_io.TMP_MARK + "1.x")  # a write in progress
        temp.write_bytes(b"partial")
        foreign = folder / "notes.txt"
        foreign.write_bytes(b"someone else's")
        observer = DiskBackend(DiskBackend.Options(path=tmp_path), capacity=64 * MiB,
                               context=BackendContext(tier="disk@r0", namespace=NS.hex(), observer=True))
        await observer.open()
        assert sorted(k for k, _ in await observer.scan()) == sorted(values)
        assert temp.exists() and foreign.exists()  # the owner's, not the observer's to clean
        k0, v0 = next(iter(values.items()))
        out = bytearray(len(v0))
        assert await observer.get(k0, memoryview(out)) == len(v0) and bytes(out) == v0
        with pytest.raises(BackendError, match="observer: it writes nothing"):
            await observer.put(*_value(9))
        assert await observer.delete([k0]) == 1  # forgotten by the observer only
        assert k0 not in dict(await observer.scan())
        assert await owner.get(k0, memoryview(out)) == len(v0) and bytes(out) == v0
        await observer.close()
        await owner.close()

    _run(go())


_OWNER = textwrap.dedent("""
    import asyncio, os, sys, time
    from kvortex_backends.disk import DiskBackend
    from kvortex_core.storage.protocol import BackendContext

    async def main():  # argv: path, namespace, then "hold" key value-hex, or "fork"
        b = DiskBackend(DiskBackend.Options(path=sys.argv[1]), capacity=1 << 30,
                        context=BackendContext(tier="disk", namespace=sys.argv[2]))
        await b.open()
        if sys.argv[3] == "hold":
            await b.put(sys.argv[4], bytes.fromhex(sys.argv[5]))
            print("ready", flush=True)
        else:
            child = os.fork()
            if child == 0:  # the forked child outlives its parent; its close() must not unlock
                await b.close()
                time.sleep(600)
                os._exit(0)
            print(child, flush=True)
        time.sleep(600)
    asyncio.run(main())
""")


def test_another_process_owning_the_directory_is_named_and_its_death_frees_it(tmp_path: Path) -> None:
    key, value = _value(7)
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path), NS.hex(), "hold", key, value.hex()],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

        async def refused() -> None:
            b = _ns_disk(tmp_path)
            with pytest.raises(BackendError, match=rf"in use by another engine \(pid {proc.pid} on "):
                await b.open()
            await b.close()

        _run(refused())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    async def after() -> None:  # no stale lock: the kernel dropped it with the process
        b = await _opened(_ns_disk(tmp_path))
        out = bytearray(len(value))
        assert await b.get(key, memoryview(out)) == len(value) and bytes(out) == value
        await b.close()

    _run(after())


def test_deleting_every_file_of_an_owned_directory_leaves_it_owned(tmp_path: Path) -> None:
    """A cleanup that deletes files (the owner's name included) cannot take the lock away: it is
    on the directory, and the refusal says the owner is unknown."""
    async def go() -> None:
        owner = await _opened(_ns_disk(tmp_path))
        for p in Path(owner.root).rglob("*"):
            if p.is_file():
                p.unlink()
        second = _ns_disk(tmp_path)
        with pytest.raises(BackendError, match=r"in use by another engine \(unknown owner\)"):
            await second.open()
        await owner.close()
        await second.open()
        await second.close()

    _run(go())


def test_a_child_forked_from_the_owner_neither_keeps_nor_releases_the_lock(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _OWNER, str(tmp_path), NS.hex(), "fork"],
                            stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        time.sleep(0.3)  # the child has closed its backend by now

        async def refused() -> None:  # the child's close() did not release the parent's lock
            with pytest.raises(BackendError, match=rf"in use by another engine \(pid {proc.pid} on "):
                await _ns_disk(tmp_path).open()

        _run(refused())
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        async def free() -> None:  # the parent died; its living child holds nothing
            b = await _opened(_ns_disk(tmp_path))
            await b.close()

        _run(free())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


# -- failures --------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 1 MiB filesystem (needs root and mount); skips where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_disk_full_raises_cleanly_and_keeps_old_data(small_tmpfs: Path) -> None:
    values = dict(_value(i, 200_000) for i in range(10))  # 2 MB into a 1 MiB filesystem

    async def scenario() -> None:
        b = await _opened(_ns_disk(small_tmpfs, capacity=64 * MiB))
        stored = {}
        with pytest.raises(BackendError, match="disk is full"):
            for k, v in values.items():
                await b.put(k, v)
                stored[k] = v
        assert stored, "at least one value fits"
        assert (await b.usage()).items == len(stored)
        for k, v in stored.items():
            out = bytearray(len(v))
            assert await b.get(k, memoryview(out)) == len(v) and bytes(out) == v
        await b.delete(list(stored))
        k, v = next(iter(values.items()))
        await b.put(k, v)  # room again: the tier recovers by itself
        await b.close()

    _run(scenario())
    assert not any(disk_io.TMP_MARK in p.name for p in small_tmpfs.rglob("*"))


@pytest.mark.parametrize(
    ("err", "match"),
    [
        (errno.ENOSPC, "disk is full"),
        (errno.EACCES, "permission denied"),
        (errno.EIO, "Input/output error"),
    ],
)
def test_injected_write_errors_become_backend_errors(
    tmp_path: Path, monkeypatch, err: int, match: str
) -> None:  # type: ignore[no-untyped-def]
    k, v = _value(3)

    def failing(fd: int, view: memoryview, offset: int) -> None:
        raise OSError(err, os.strerror(err))

    async def scenario() -> None:
        b = await _opened(_ns_disk(tmp_path))
        monkeypatch.setattr(disk_io, "_write_all", failing)
        with pytest.raises(BackendError, match=match):
            await b.put(k, v)
        assert (await b.usage()).used == 0 and await b.contains([k]) == [False]
        monkeypatch.undo()
        await b.put(k, v)
        assert await b.contains([k]) == [True]
        await b.close()

    _run(scenario())
    assert not any(disk_io.TMP_MARK in p.name for p in tmp_path.rglob("*"))


def test_vanished_directory_is_unhealthy_and_never_recreated(tmp_path: Path) -> None:
    import shutil

    k, v = _value(4)
    k2, v2 = _value(5)

    async def scenario() -> None:
        b = await _opened(_ns_disk(tmp_path / "cache"))
        await b.put(k, v)
        shutil.rmtree(tmp_path / "cache")
        assert not (await b.health()).ok
        assert await b.get(k, memoryview(bytearray(len(v)))) is None  # gone: a miss, forgotten
        assert await b.contains([k]) == [False]
        with pytest.raises(BackendError, match="vanished"):
            await b.put(k2, v2)
        assert not (tmp_path / "cache").exists()
        await b.close()

    _run(scenario())


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"compression": "zstd", "compression_level": 99}, "-7 (fastest) to 22"),
        ({"compression": "zstd", "compression_level": -8}, "-7 (fastest) to 22"),
        ({"compression": "lz4", "compression_level": 3}, "applies to zstd only"),
        ({"compression_level": 3}, "applies to zstd only"),
        ({"path": ""}, "path '' is empty"),
        ({"path": "  "}, "is empty"),
    ],
)
def test_bad_options_fail_at_config_load_naming_the_value(tmp_path: Path, options: dict, needle: str) -> None:
    """Refused when the config loads, not by the first write (zstd's own error there put the
    tier out of service with nothing written)."""
    tier = {"type": "disk", "capacity": "1MiB", "path": str(tmp_path), **options}
    with pytest.raises(ConfigError) as err:
        KVortexConfig.load(tiers={"cpu": {"type": "cpu", "capacity": "1MiB"}, "d": tier})
    assert needle in str(err.value) and "tiers.d" in str(err.value)


@pytest.mark.parametrize("level", [-7, 1, 22])
def test_every_accepted_zstd_level_writes_and_reads_back(tmp_path: Path, level: int) -> None:
    key = b"\x05" * 32
    buf = bytearray(pl.HEADER_BYTES + MiB)
    buf[pl.HEADER_BYTES:] = bytes(range(256)) * (MiB // 256)  # compresses at every level
    pl.seal(buf, key=key, namespace=NS, shape=(MiB,), dtype="uint8", payload_len=MiB)
    _run(_put_all(tmp_path, {key.hex(): bytes(buf)}, compression="zstd", compression_level=level))
    (f,) = _files(tmp_path)
    assert f.stat().st_size < len(buf) // 2

    async def read() -> None:
        b = await _opened(_ns_disk(tmp_path, compression="zstd"))
        out = bytearray(len(buf))
        assert await b.get(key.hex(), memoryview(out)) == len(buf) and out == buf
        await b.close()

    _run(read())


def test_corrupt_compressed_file_reads_back_as_stored_for_the_reader_to_reject(tmp_path: Path) -> None:
    """``get`` never raises for a compressed file that does not expand (a tier error would put
    the whole tier out of service): it returns the stored bytes, which fail verification."""
    key = b"\x06" * 32
    buf = bytearray(pl.HEADER_BYTES + MiB)
    pl.seal(buf, key=key, namespace=NS, shape=(MiB,), dtype="uint8", payload_len=MiB)
    _run(_put_all(tmp_path, {key.hex(): bytes(buf)}, compression="zstd"))
    (f,) = _files(tmp_path)
    data = bytearray(f.read_bytes())
    data[-2] ^= 0x20
    f.write_bytes(data)

    async def read() -> None:
        b = await _opened(_ns_disk(tmp_path, compression="zstd"))
        out = bytearray(len(buf))
        n = await b.get(key.hex(), memoryview(out))
        assert n == len(data) and out[:n] == data, "the stored bytes, untouched"
        with pytest.raises(PayloadError, match="checksum"):
            pl.decompress_value(bytes(out[:n]), bytearray(len(buf)))
        await b.close()

    _run(read())


def test_bad_keys_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        b = await _opened(_ns_disk(tmp_path))
        for bad in ("../../etc/passwd", "ABCDEF", "", "g" * 10):
            with pytest.raises(BackendError, match="lowercase hex"):
                await b.put(bad, b"x")
        await b.close()

    _run(scenario())


def test_bench_disk_smoke(tmp_path: Path) -> None:
    """The benchmark runs end to end on tiny payloads (numbers are not asserted)."""
    from kvortex_core.cli.bench.disk import bench_disk

    result = bench_disk(sizes=[64 * 1024], reps=1, out=tmp_path, concurrency=[1, 2], variants=False)
    ops = {(r["op"], r["concurrency"]) for r in result["rows"]}
    assert ops == {(op, c) for op in ("put", "get cold", "get warm") for c in (1, 2)}
    assert all(r["ratio"] > 0 for r in result["rows"])
    assert (tmp_path / "disk.json").exists() and (tmp_path / "disk.md").exists()
    assert not any(p.name.startswith("kvortex-disk-bench-") for p in tmp_path.iterdir())


def test_read_cached_never_waits_and_reads_exact_bytes(tmp_path: Path) -> None:
    if not disk_io.HAS_NOWAIT:
        pytest.skip("no RWF_NOWAIT on this platform")
    path = tmp_path / "f.kv"
    data = os.urandom(300_000)
    disk_io.write_atomic(str(path), memoryview(data), fsync=True, direct=False)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    out = bytearray(len(data))
    first = disk_io.read_cached(str(path), memoryview(out))  # None unless the kernel kept it
    assert first is None or bytes(out) == data
    assert disk_io.read_into(str(path), memoryview(out), direct=False) == len(data)
    out[:] = bytes(len(out))
    assert disk_io.read_cached(str(path), memoryview(out)) == len(data) and bytes(out) == data


def test_concurrent_writers_of_one_key_never_mix(tmp_path: Path) -> None:
    """Eight concurrent puts of one key with different values: the survivor is one of them, whole."""
    key = "ab" * 32
    values = [bytes([i]) * (256 * 1024 + i) for i in range(8)]

    async def scenario() -> None:
        b = await _opened(_ns_disk(tmp_path, io_threads=8))
        await asyncio.gather(*(b.put(key, v) for v in values))
        out = bytearray(300 * 1024)
        n = await b.get(key, memoryview(out))
        assert bytes(out[:n]) in values
        usage = await b.usage()
        assert usage.items == 1 and usage.used == n
        await b.close()

    _run(scenario())
    assert [p.name for p in _files(tmp_path)] == [f"{key}.kv"]


def test_a_fifo_in_place_of_a_cache_file_never_blocks_a_read(tmp_path: Path) -> None:
    """Something that is no regular file where a value was (a FIFO here: its plain open() blocks
    until a writer comes) is an error for that key, at once, on the loop and on the I/O threads;
    other values still read."""
    root = tmp_path / "cache"

    async def scenario() -> None:
        b = await _opened(_ns_disk(root))
        (k1, v1), (k2, v2) = _value(1), _value(2)
        await b.put(k1, v1)
        await b.put(k2, v2)
        path = b._path(k1)
        os.unlink(path)
        os.mkfifo(path)
        out = memoryview(bytearray(len(v1)))
        for inline in (True, False):  # the page-cache read on the loop, then the thread read
            b._inline_ok = inline
            with pytest.raises(BackendError, match="not a regular file"):
                await asyncio.wait_for(b.get(k1, out), 5)
        assert await asyncio.wait_for(b.get(k2, out), 5) == len(v2)
        assert bytes(out[: len(v2)]) == v2
        await b.close()

    _run(scenario())


def test_a_fifo_under_a_cache_file_name_or_the_owner_file_never_blocks_the_open(tmp_path: Path) -> None:
    """The start-up scan read each file's header with a blocking open(), and the lock wrote the
    owner file the same way: one FIFO there (no writer, no reader) held the open on an I/O
    thread for good, the tier out of service, and the directory's lock was never released (a
    red-team finding). Now the scan removes it as foreign, the owner file is replaced, the open
    takes no time and every other value is served; the lock is released at close."""
    root = tmp_path / "cache"
    (k1, v1), (k2, v2) = _value(1), _value(2)

    async def scenario() -> None:
        b = await _opened(_ns_disk(root))
        await b.put(k1, v1)
        await b.put(k2, v2)
        path, rank_root = b._path(k1), b.root
        await b.close()
        os.unlink(path)
        os.mkfifo(path)
        owner = os.path.join(rank_root, disk_io.OWNER_NAME)
        os.unlink(owner)
        os.mkfifo(owner)
        assert disk_io.owner_of(rank_root) == "unknown owner"  # reading it does not block either
        b = _ns_disk(root)
        await asyncio.wait_for(b.open(), 5)
        assert [k for k, _ in await b.scan()] == [k2] and b.scan_removed["foreign"] == 1
        assert not os.path.exists(path)
        assert os.path.isfile(owner) and f"pid {os.getpid()}" in disk_io.owner_of(rank_root)
        out = memoryview(bytearray(len(v2)))
        assert await b.get(k2, out) == len(v2) and bytes(out) == v2
        await b.close()
        b = _ns_disk(root)  # the lock was released: a new backend takes the directory
        await asyncio.wait_for(b.open(), 5)
        await b.close()

    _run(scenario())


def test_a_lock_whose_owner_file_cannot_be_written_is_released(tmp_path: Path) -> None:
    """lock_dir took the lock, then failed writing the owner file and kept it held for good."""
    os.mkdir(tmp_path / disk_io.OWNER_NAME)  # a directory where the owner file goes
    with pytest.raises(OSError):
        disk_io.lock_dir(str(tmp_path))
    held, _ = disk_io.peek_owner(str(tmp_path))
    assert not held, "the lock stayed held after the failure"


def test_a_slow_read_on_the_loop_turns_loop_reads_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RWF_NOWAIT covers the data, not the open: a filesystem whose opens are slow (a network
    mount) makes the tier read on its I/O threads from then on. Fault injected: a slow open."""
    if not disk_io.HAS_NOWAIT:
        pytest.skip("no RWF_NOWAIT on this kernel/Python: reads never run on the loop")
    root = tmp_path / "cache"
    real = disk_io.read_cached

    def slow_read_cached(path: str, out: memoryview) -> int | None:
        time.sleep(0.02)  # the injected fault: an open that blocks the loop
        return real(path, out)

    async def scenario() -> None:
        b = await _opened(_ns_disk(root))
        k, v = _value(3)
        await b.put(k, v)
        out = memoryview(bytearray(len(v)))
        monkeypatch.setattr(disk_io, "read_cached", slow_read_cached)
        assert b._inline_ok
        assert await b.get(k, out) == len(v)  # still served, then loop reads are off
        assert not b._inline_ok
        assert bytes(out[: len(v)]) == v
        await b.close()

    _run(scenario())


@pytest.mark.parametrize(("codec", "package"), [("lz4", "lz4"), ("zstd", "zstandard")])
def test_a_codec_that_is_not_installed_fails_validation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, codec: str, package: str) -> None:
    """compression: lz4 without lz4 passed validation and then failed every write (the tier out
    of service, nothing stored). Fault injected: the package reported missing."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    with pytest.raises(ConfigError, match=rf"compression '{codec}' needs the {package} package.*kvortex\[compression\]"):
        KVortexConfig(tiers={"cpu": {"type": "cpu", "capacity": "1MiB"},
                             "disk": {"type": "disk", "capacity": "1MiB", "path": str(tmp_path),
                                      "compression": codec}})


def test_every_directory_the_tier_creates_is_0700(tmp_path: Path) -> None:
    """docs/backends.md: the path is created 0700 if absent; makedirs gave 0700 to the last
    directory only (the path itself and the namespace directory were 0755 under umask 022)."""
    import os

    old = os.umask(0o022)
    try:
        mine = tmp_path / "existing"
        mine.mkdir(mode=0o755)
        root = mine / "sub" / "cache"
        b = _run(_opened(_ns_disk(root)))
        _run(b.close())
    finally:
        os.umask(old)
    assert mine.stat().st_mode & 0o777 == 0o755, "a directory that existed keeps its mode"
    made = [mine / "sub", root, *[p for p in root.rglob("*") if p.is_dir()]]
    assert len(made) >= 4  # sub, cache, <namespace>, r0
    assert {str(p.relative_to(mine)): p.stat().st_mode & 0o777 for p in made} == {
        str(p.relative_to(mine)): 0o700 for p in made}


def test_a_delete_whose_caller_timed_out_still_unlinks_its_files(tmp_path: Path) -> None:
    """The delete takes its keys out of the accounting at once; its unlink runs on the I/O
    pool. Cancelled by the caller's timeout while queued behind other I/O, the unlink was
    dropped: the file stayed on disk, counted nowhere until the next start (a red-team finding)."""
    async def scenario() -> None:
        backend = DiskBackend(DiskBackend.Options(path=str(tmp_path), io_threads=1), capacity=1 << 20,
                              context=BackendContext())
        await backend.open()
        try:
            key = "ab" * 16
            await backend.put(key, b"x" * 4096)
            assert len(list(tmp_path.rglob("*.kv"))) == 1
            busy = asyncio.get_running_loop().run_in_executor(backend._pool, time.sleep, 0.3)  # a slow write
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(backend.delete([key]), 0.05)  # the tier's backend_op_s
            await busy
            deadline = time.monotonic() + 5
            while list(tmp_path.rglob("*.kv")) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert list(tmp_path.rglob("*.kv")) == [] and (await backend.usage()).used == 0
        finally:
            await backend.close()

    asyncio.run(scenario())


def test_other_namespaces_under_the_path_are_named_at_open(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Files of another model, dtype or salt under the same path are neither counted nor removed
    by this tier (another engine may use them): the open says so, once, naming them."""
    from kvortex_backends.disk import DiskOptions

    def backend(ns: str) -> DiskBackend:
        return DiskBackend(DiskOptions(path=str(tmp_path)), capacity=1 << 20,
                           context=BackendContext(tier="disk", namespace=ns))

    async def scenario() -> None:
        old = backend("a" * 32)
        await old.open()
        await old.put("ab" * 16, b"x" * 100)
        await old.close()
        caplog.clear()
        new = backend("b" * 32)
        await new.open()
        assert (await new.usage()).used == 0  # the other namespace's file is not ours
        await new.close()

    with caplog.at_level("WARNING", logger="kvortex_backends.disk"):
        asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if "other namespace" in r.getMessage()]
    assert len(said) == 1 and "1 other namespace directory" in said[0] and "a" * 32 in said[0]
    assert (tmp_path / ("a" * 32)).is_dir()  # never removed
