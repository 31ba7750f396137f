"""``disk``: chunk payloads as files on a local filesystem.

Layout: ``<path>/<namespace>/r<rank>/<k0k1>/<k2k3>/<key>.kv`` (``shard_depth`` levels of two
hex characters), directories 0700, files 0600. Each file is exactly the stored value (payload
header + KV bytes, see :mod:`kvortex_core.data.payload`). The in-memory index (key -> size) is
rebuilt at ``open()`` from the file headers; orphaned temporary files and damaged or foreign
files are removed then. I/O runs on a dedicated thread pool, reads land straight in the
caller's buffer (a pinned slot). Every OS error becomes a :class:`BackendError` whose message
names the directory and the cause; the tiering layer turns repeated errors into an open
circuit breaker, so a full or vanished disk never stops the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import importlib.util
import logging
import os
import re
import stat
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, field_validator, model_validator

from kvortex_backends import disk_io
from kvortex_core.data import payload as pl
from kvortex_core.errors import (
    BackendError,
    BackendFullError,
    BadValueError,
    BufferTooSmallError,
    PayloadError,
)
from kvortex_core.storage.protocol import (
    BackendContext,
    BackendOptions,
    Health,
    StorageBackend,
    Usage,
)

log = logging.getLogger("kvortex_backends.disk")
T = TypeVar("T")
_KEY_RE = re.compile(r"^[0-9a-f]{1,128}$")
#: Largest value read on the event loop when fully in the page cache (see ``_read_inline``).
INLINE_READ_MAX = 4 * 1024 * 1024
#: A read on the event loop slower than this turns them off for the tier (see ``_read_inline``).
INLINE_OPEN_LIMIT_S = 0.005
#: zstd levels accepted for ``compression_level`` (negative: faster; zstd itself goes lower,
#: to -131072, where it hardly compresses: not worth a disk write).
ZSTD_MIN_LEVEL, ZSTD_MAX_LEVEL = -7, 22


class DiskOptions(BackendOptions):
    """Options of a ``disk`` tier (YAML keys under ``tiers.<name>``)."""

    path: Path = Field(description="directory holding the cache files (created 0700 if absent)")
    shard_depth: int = Field(2, ge=0, le=3, description="levels of 2-hex-char subdirectories")
    fsync: bool = Field(True, description="fsync file and directory on every write (crash safe)")
    o_direct: Literal["auto", "on", "off", "write"] = Field(
        "auto",
        description="auto: the page cache (measured best for loads, see "
        "docs/backends.md); write: O_DIRECT writes only; on: O_DIRECT reads and writes; off: never",
    )
    compression: pl.Compression = Field("none", description="none, lz4 or zstd (lossless)")
    compression_level: int | None = Field(
        None, description="zstd level, -7 (fastest) to 22 (smallest); default 1; zstd only"
    )
    io_threads: int = Field(4, ge=1, le=64, description="threads doing blocking file I/O")

    @field_validator("path", mode="before")
    @classmethod
    def _path_named(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():  # Path("") is the working directory
            raise ValueError(
                f"path {value!r} is empty; give the cache directory, e.g. path: /var/cache/kvortex"
            )
        return value

    @model_validator(mode="after")
    def _codec_installed(self) -> DiskOptions:
        """A codec that is not installed fails here, not at every write (the tier out of service)."""
        package = {"lz4": "lz4", "zstd": "zstandard"}.get(self.compression)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ValueError(
                f"compression {self.compression!r} needs the {package} package, which is not installed: "
                f"pip install 'kvortex[compression]' (or pip install {package}), or set compression: none"
            )
        return self

    @model_validator(mode="after")
    def _level_fits(self) -> DiskOptions:
        level = self.compression_level
        if level is None:
            return self
        if self.compression != "zstd":
            raise ValueError(
                f"compression_level={level} applies to zstd only (compression is "
                f"{self.compression!r}); set compression: zstd or drop compression_level"
            )
        if not ZSTD_MIN_LEVEL <= level <= ZSTD_MAX_LEVEL:
            raise ValueError(
                f"compression_level={level} is outside zstd's range; use {ZSTD_MIN_LEVEL} "
                f"(fastest) to {ZSTD_MAX_LEVEL} (smallest), 1-3 for KV caches"
            )
        return self


class DiskBackend(StorageBackend):
    """Local-file tier: atomic writes, checksummed headers, index rebuilt at start."""

    Options = DiskOptions
    requires = ()
    install_hint = None
    shared = False

    def __init__(self, options: DiskOptions, *, capacity: int, context: BackendContext) -> None:
        super().__init__(options, capacity=capacity, context=context)
        self.options: DiskOptions = options
        ns = re.sub(r"[^0-9A-Za-z_\-]", "_", context.namespace)[:32] or "default"
        base = Path(options.path).expanduser() / ns
        if context.instance:  # one of several data-parallel engines: a directory of its own
            base = base / re.sub(r"[^0-9A-Za-z_\-]", "_", context.instance)[:64]
        self.root = str(base / f"r{context.rank}")
        self._ns_dir = ns
        self._ns_hash = _namespace_hash(context.namespace)
        self._index: dict[str, int] = {}
        self._used = 0
        self._lock = asyncio.Lock()
        self._key_locks: dict[str, _KeyLock] = {}  # only keys with a put in progress
        self._pool: ThreadPoolExecutor | None = None
        self._dirs: set[str] = set()
        # auto = page cache: O_DIRECT writes were faster to write but left the data out of
        # the page cache and made later reads of those files slower (docs/backends.md), and
        # reads (loads) are on the time-to-first-token path while writes are background work.
        self._write_direct = options.o_direct in ("on", "write")
        self._read_direct = options.o_direct == "on"
        self._inline_ok = disk_io.HAS_NOWAIT
        self.scan_removed: dict[str, int] = {}
        self._lock_fd: int | None = None  # the directory's flock, held from open() to close()

    # -- lifecycle -------------------------------------------------------------------------
    async def open(self) -> None:
        if self._pool is None:  # open() is retried after a failed start
            self._pool = ThreadPoolExecutor(
                self.options.io_threads, thread_name_prefix="kvortex-disk"
            )
        try:
            await self._run(self._prepare_root)
        except OSError as exc:
            raise BackendError(self._explain("creating the cache directory", exc)) from exc
        # Only then the scan: it deletes temporary files, which in a directory shared with a
        # live engine would be that engine's writes in progress. An observer (the vLLM
        # scheduler's view of a rank's directory) takes no lock and deletes nothing.
        await self._run(self._check_owner if self.context.observer else self._take_lock)
        entries = await self._run(self._scan_files)
        self._index = dict(entries)
        self._used = sum(self._index.values())
        if any(self.scan_removed.values()):
            log.warning("disk tier %s: removed at start %s", self.root, self.scan_removed)
        others = await self._run(self._other_namespaces)
        if others and not self.context.observer and self.context.rank == 0:
            log.warning(
                "disk tier %s: %d other namespace director%s under %s (%s): cache files of other "
                "models, dtypes, salts or KVortex versions; they do not count against this tier's "
                "capacity and are never removed by it: delete those no engine uses", self.root,
                len(others), "y" if len(others) == 1 else "ies", self.options.path,
                ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""))

    def _other_namespaces(self) -> list[str]:
        """Namespace directories under ``path`` other than this engine's (a listing, no walk)."""
        top = Path(self.options.path).expanduser()
        try:
            names = os.listdir(top)
        except OSError:
            return []
        return sorted(n for n in names if n != self._ns_dir and not n.startswith(".") and (top / n).is_dir())

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._lock_fd is not None:
            disk_io.unlock_dir(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> None:
        """Own the directory: two engines in one directory would count each other's files
        against nothing, evict and delete them, and remove each other's writes in progress."""
        if self._lock_fd is not None:  # a retried open() keeps the lock it took
            return
        try:
            fd = disk_io.lock_dir(self.root, self.context.engine_id)
        except disk_io.DirectoryBusyError as exc:
            holder = exc.holder
            if holder.startswith(disk_io.owner_line() + ",") or holder == disk_io.owner_line():
                holder += ": this process, an engine not closed yet"
            raise BackendError(
                f"disk tier {self.root} is in use by another engine ({holder}); give each "
                "engine its own directory: another `path` for this tier, or another `salt`"
            ) from None
        except OSError as exc:
            raise BackendError(self._explain("locking the cache directory", exc)) from exc
        if fd is None:
            log.warning("disk tier %s: the filesystem cannot lock a directory (flock); nothing stops "
                        "another engine from using this directory too", self.root)
        self._lock_fd = fd

    def _prepare_root(self) -> None:
        """Create ``<path>/<namespace>/r<rank>``: every directory this creates is 0700 (makedirs
        gives its mode to the last one only); directories that existed keep theirs."""
        missing = []
        d = Path(self.root)
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            try:
                d.mkdir(mode=0o700)
            except FileExistsError:  # another rank made it meanwhile
                continue
            os.chmod(d, 0o700)  # whatever the umask
        os.chmod(self.root, 0o700)

    def _check_owner(self) -> None:
        """An observer serves a directory that is free or held for its own engine; one held
        for another engine (a second server configured with the same path) is not its to
        promise: its ranks cannot read it, and what they save never lands there."""
        mine = self.context.engine_id
        if not mine or disk_io.owner_of(self.root).endswith(f", engine {mine}"):
            return
        held, owner = disk_io.peek_owner(self.root)
        if held:
            raise BackendError(
                f"disk tier {self.root} is in use by another engine ({owner}), not by this "
                f"engine's ranks (engine {mine}); give each engine its own directory: another "
                "`path` for this tier, or another `salt`"
            )

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._pool is None:
            raise BackendError(f"disk tier {self.root} is not open; call open() first")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- paths -----------------------------------------------------------------------------
    def _parts(self, key: str) -> list[str]:
        if not _KEY_RE.match(key):
            raise BackendError(f"disk key {key!r} is not lowercase hex (1-128 characters)")
        padded = key.ljust(2 * self.options.shard_depth, "0")
        return [padded[2 * i : 2 * i + 2] for i in range(self.options.shard_depth)]

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *self._parts(key), key + disk_io.SUFFIX)

    def _explain(self, what: str, exc: OSError) -> str:
        cause = {
            errno.ENOSPC: "the disk is full",
            errno.EDQUOT: "the disk quota is exceeded",
            errno.EACCES: "permission denied",
            errno.EPERM: "permission denied",
            errno.ENOENT: "no such directory (it vanished, or was never created)",
            errno.EROFS: "read-only filesystem",
        }
        reason = cause.get(exc.errno or 0, exc.strerror or str(exc))
        return f"disk tier {self.root}: {what} failed: {reason} ({exc})"

    # -- protocol --------------------------------------------------------------------------
    async def put(self, key: str, data: memoryview | bytes | bytearray) -> None:
        if self.context.observer:
            raise BackendError(f"disk tier {self.root} is opened as an observer: it writes nothing")
        path, parts = self._path(key), self._parts(key)
        value = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        if self.options.compression != "none":
            value = memoryview(await self._run(self._compress, value))
        size = len(value)
        async with self._lock:
            if self._used + size > self.capacity:
                raise BackendFullError(
                    f"disk tier {self.root} full: {key} needs {size} bytes, "
                    f"{self.capacity - self._used} free of {self.capacity}; raise its capacity"
                )
            self._used += size  # reserved; settled by _write_and_settle
        # Shielded: a caller that times out stops waiting, but the write (already running on a
        # thread) still finishes and its accounting is settled; the checksum guards the bytes.
        await _shielded(self._write_and_settle(key, path, parts, value))

    async def _write_and_settle(
        self, key: str, path: str, parts: list[str], value: memoryview
    ) -> None:
        size = len(value)
        async with self._key_lock(key):  # one writer per key at a time: index == file on disk
            try:
                await self._run(self._write, path, parts, value)
            except OSError as exc:
                self._used -= size
                raise BackendError(self._explain(f"writing {key}", exc)) from exc
            except BaseException:
                self._used -= size
                raise
            self._used -= self._index.pop(key, 0)
            self._index[key] = size

    @contextlib.asynccontextmanager
    async def _key_lock(self, key: str) -> AsyncIterator[None]:
        entry = self._key_locks.setdefault(key, _KeyLock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._key_locks[key]

    def _compress(self, value: memoryview) -> memoryview | bytes | bytearray:
        try:
            return pl.compress_value(value, self.options.compression, self.options.compression_level)
        except PayloadError as exc:  # the caller's buffer changed under the codec: not our failure
            raise BadValueError(f"disk tier {self.root}: {exc}") from None

    def _write(self, path: str, parts: list[str], value: memoryview) -> None:
        folder = os.path.dirname(path)
        if folder not in self._dirs:
            disk_io.make_dirs(self.root, parts)
            self._dirs.add(folder)
        try:
            disk_io.write_atomic(path, value, fsync=self.options.fsync, direct=self._write_direct)
        except FileNotFoundError:
            self._dirs.discard(folder)  # shard directory removed underneath us
            raise

    async def get(self, key: str, out: memoryview) -> int | None:
        size = self._index.get(key)
        if size is None:
            return None
        path = self._path(key)
        view = out.cast("B") if out.format != "B" else out
        try:
            n = self._read_inline(path, view, size)
            if n is None:
                n = await self._run(self._read, path, view)
        except FileNotFoundError:
            await self._forget(key)
            return None
        except OSError as exc:
            raise BackendError(self._explain(f"reading {key}", exc)) from exc
        return n

    def _read_inline(self, path: str, view: memoryview, size: int) -> int | None:
        """A small value already in the page cache is copied on the loop: no thread hand-off.

        Measured: the hand-off costs ~0.1-0.2 ms, more than copying 1 MiB from the page cache.
        """
        if not self._inline_ok or size > INLINE_READ_MAX or self._read_direct:
            return None
        start = time.perf_counter()
        try:
            n = disk_io.read_cached(path, view)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL) or isinstance(exc, disk_io.NotRegularFileError):
                raise
            self._inline_ok = False  # this filesystem cannot do RWF_NOWAIT
            return None
        finally:
            # RWF_NOWAIT covers the data, not the open: a filesystem whose opens block (a network
            # mount, a stalled device) would stall every tier on the loop. Past the limit, every
            # later read goes through the I/O threads.
            took = time.perf_counter() - start
            if took > INLINE_OPEN_LIMIT_S and self._inline_ok:
                self._inline_ok = False
                log.warning("disk tier %s: a read on the event loop took %.1f ms; reads go through "
                            "the I/O threads from now on", self.root, took * 1e3)
        return None if n is None else self._finish_read(view, n)

    def _read(self, path: str, view: memoryview) -> int:
        return self._finish_read(view, disk_io.read_into(path, view, direct=self._read_direct))

    def _finish_read(self, view: memoryview, n: int) -> int:
        if n >= pl.HEADER_BYTES and bytes(view[:8]) == pl.MAGIC and view[12] != 0:
            return self._expand(view, n)
        return n

    @staticmethod
    def _expand(view: memoryview, n: int) -> int:
        """The file holds a compressed payload: expand it in place (through one temp copy).

        A value that does not expand (corrupt bytes, checksum mismatch) is returned as stored:
        the reader's verification rejects it as a bad payload (counted, deleted), while an
        error here would count as a failure of the whole tier and open its breaker.
        """
        try:
            raw = pl.raw_length(view[:n])
        except PayloadError:
            return n
        if raw > len(view):
            raise BufferTooSmallError(
                f"compressed disk value expands to {raw} bytes, buffer {len(view)}"
            )
        try:
            return pl.decompress_value(bytes(view[:n]), view)
        except PayloadError:
            return n  # untouched: decompress_value checks before it writes into view

    async def contains(self, keys: Sequence[str]) -> list[bool]:
        return [k in self._index for k in keys]

    def files_present(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key's file is in the directory now (a stat each, no read; any thread).

        For an observer (the vLLM scheduler's view): the ranks that own the directories evict
        from them, and its start-up scan does not see that. A key that is not hex is absent."""
        out = []
        for k in keys:
            try:
                out.append(stat.S_ISREG(os.stat(self._path(k)).st_mode))
            except (OSError, BackendError):
                out.append(False)
        return out

    async def delete(self, keys: Sequence[str]) -> int:
        # Shielded, like a write: a caller that times out stops waiting, but the files it took
        # out of the accounting are still unlinked (dropped from the I/O queue, they stayed on
        # disk, counted nowhere until the next start's scan: a red-team finding).
        return await _shielded(self._delete(keys))

    async def _delete(self, keys: Sequence[str]) -> int:
        async with contextlib.AsyncExitStack() as held:
            # ordered with writes of the same keys (one writer per key): a write that ran before
            # this delete is deleted, one that comes after lands (sorted: no lock-order deadlock)
            for k in sorted({k for k in keys if k in self._index or k in self._key_locks}):
                await held.enter_async_context(self._key_lock(k))
            present = [k for k in dict.fromkeys(keys) if k in self._index]
            for k in present:
                self._used -= self._index.pop(k)
            if present and not self.context.observer:  # an observer forgets; the owner deletes
                try:
                    await self._run(self._unlink_many, [self._path(k) for k in present])
                except OSError as exc:
                    raise BackendError(self._explain("deleting", exc)) from exc
        return len(present)

    @staticmethod
    def _unlink_many(paths: list[str]) -> None:
        for p in paths:
            disk_io.unlink(p)

    async def _forget(self, key: str) -> None:
        self._used -= self._index.pop(key, 0)

    async def usage(self) -> Usage:
        return Usage(capacity=self.capacity, used=self._used, items=len(self._index))

    async def health(self) -> Health:
        try:
            return await self._run(self._probe)
        except OSError as exc:
            return Health(ok=False, detail=self._explain("health probe", exc))

    def _probe(self) -> Health:
        if not os.path.isdir(self.root):
            return Health(ok=False, detail=f"disk tier {self.root}: the directory vanished")
        if not os.access(self.root, os.W_OK | os.X_OK):
            return Health(ok=False, detail=f"disk tier {self.root}: permission denied")
        st = os.statvfs(self.root)
        if st.f_bavail * st.f_frsize < pl.HEADER_BYTES:
            return Health(ok=False, detail=f"disk tier {self.root}: the disk is full")
        return Health(ok=True)

    async def scan(self) -> list[tuple[str, int]]:
        return list(self._index.items())

    # -- start-up scan ---------------------------------------------------------------------
    def _scan_files(self) -> list[tuple[str, int]]:
        self.scan_removed = {"temp": 0, "damaged": 0, "foreign": 0}
        found: list[tuple[str, int]] = []
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                if name == disk_io.OWNER_NAME and folder == self.root:
                    continue
                path = os.path.join(folder, name)
                try:
                    verdict, size = self._judge(path, name)
                except FileNotFoundError:  # removed meanwhile (by the owner, for an observer)
                    continue
                if verdict is None:
                    found.append((name[: -len(disk_io.SUFFIX)], size))
                    self._dirs.add(folder)
                elif not self.context.observer:
                    self.scan_removed[verdict] += 1
                    disk_io.unlink(path)
        return found

    def _judge(self, path: str, name: str) -> tuple[str | None, int]:
        """(None, size) when the file is a complete payload of this tier, else (why it goes, 0)."""
        if disk_io.TMP_MARK in name:
            return "temp", 0  # a writer died between create and rename
        key = name[: -len(disk_io.SUFFIX)] if name.endswith(disk_io.SUFFIX) else ""
        if not _KEY_RE.match(key) or path != self._path(key):
            return "foreign", 0
        try:
            head, size = disk_io.read_head(path, pl.HEADER_BYTES)
        except disk_io.NotRegularFileError:  # a FIFO or a device under a cache file's name
            return "foreign", 0
        try:
            header = pl.read_header(head)
        except PayloadError:
            return ("damaged" if head[:8] == pl.MAGIC else "foreign"), 0
        if header.key.hex() != key or (self._ns_hash and header.namespace_hash != self._ns_hash):
            return "foreign", 0
        return (None, size) if size == header.total_len else ("damaged", 0)


class _KeyLock:
    """A lock for the puts of one key and how many puts use it (dropped at zero)."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


def _namespace_hash(namespace: str) -> bytes:
    """The header namespace hash for a context namespace given as hex (the TierManager's)."""
    try:
        return pl.namespace_hash(bytes.fromhex(namespace)) if namespace else b""
    except ValueError:
        return b""


async def _shielded(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` as a task that outlives a caller who stops waiting (a timeout); its outcome
    is then still retrieved (no "Task exception was never retrieved" for a late failure)."""
    task = asyncio.ensure_future(coro)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)
