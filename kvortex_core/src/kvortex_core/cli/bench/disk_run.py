"""The measuring rig of ``kvortex bench disk``: one disk tier and its raw-I/O twin."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self


class DiskRig:
    """``conc`` payloads of ``size`` bytes in 4096-aligned slots, a DiskBackend and raw paths."""

    def __init__(self, work: Path, size: int, conc: int, opts: dict[str, Any]) -> None:
        self.work, self.size, self.conc = work, size, conc
        self.opts = {k: v for k, v in opts.items() if not k.startswith("_")}
        self.aiofiles = bool(opts.get("_aiofiles"))
        self.loop = asyncio.new_event_loop()
        self.threads = ThreadPoolExecutor(max(conc, 1), thread_name_prefix="raw-io")

    def __enter__(self) -> Self:
        from kvortex_backends.disk import DiskBackend
        from kvortex_core.data import payload as pl
        from kvortex_core.data.pool import PinnedPool
        from kvortex_core.storage.protocol import BackendContext

        self.value_bytes = pl.HEADER_BYTES + self.size
        self.pool = PinnedPool(
            self.value_bytes,
            self.value_bytes * self.conc * 2,
            pin=False,
            alignment=4096,
            name="bench",
        )
        self.src = [self.pool.allocate() for _ in range(self.conc)]
        self.dst = [self.pool.allocate() for _ in range(self.conc)]
        self.keys = [f"{i:02x}" * 32 for i in range(self.conc)]
        for i, slot in enumerate(self.src):
            body = self.pool.buffer(slot)[pl.HEADER_BYTES : self.value_bytes]
            body[:] = os.urandom(self.size)
            pl.seal(
                self.pool.buffer(slot),
                key=bytes.fromhex(self.keys[i]),
                namespace=b"bench",
                shape=(self.size,),
                dtype="uint8",
                payload_len=self.size,
            )
        root = self.work / "tier"
        self.raw_dir = self.work / "raw"
        self.raw_dir.mkdir(parents=True, exist_ok=True)
        self.backend = DiskBackend(
            DiskBackend.Options(path=root, **self.opts),
            capacity=1 << 50,
            context=BackendContext(tier="bench"),
        )
        self.loop.run_until_complete(self.backend.open())
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.loop.run_until_complete(self.backend.delete(self.keys))
        self.loop.run_until_complete(self.backend.close())
        self.loop.close()
        self.threads.shutdown()
        self.pool.free_many(self.src + self.dst)
        self.pool.close()

    def _view(self, slot: int) -> memoryview:
        return self.pool.buffer(slot)[: self.value_bytes]

    # -- ours -------------------------------------------------------------------------------
    def put(self) -> None:
        b = self.backend
        self.loop.run_until_complete(
            _all(b.put(k, self._view(s)) for k, s in zip(self.keys, self.src, strict=True))
        )

    def get(self) -> None:
        b = self.backend
        got = self.loop.run_until_complete(
            _all(b.get(k, self.pool.buffer(s)) for k, s in zip(self.keys, self.dst, strict=True))
        )
        assert all(n == self.value_bytes for n in got)

    # -- raw --------------------------------------------------------------------------------
    def _raw_path(self, i: int) -> str:
        return str(self.raw_dir / f"{self.keys[i]}.bin")

    def _raw_put_one(self, i: int) -> None:
        final = self._raw_path(i)
        tmp = final + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self._view(self.src[i]))
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, final)
        _fsync_dir(str(self.raw_dir))

    async def _aiofiles_put_one(self, i: int) -> None:
        import aiofiles
        import aiofiles.os

        final = self._raw_path(i)
        tmp = final + ".tmp"
        async with aiofiles.open(tmp, "wb") as f:
            await f.write(self._view(self.src[i]))
            await f.flush()
            await aiofiles.os.wrap(os.fsync)(f.fileno())
        await aiofiles.os.rename(tmp, final)
        await aiofiles.os.wrap(_fsync_dir)(str(self.raw_dir))

    def _raw_get_one(self, i: int) -> None:
        with open(self._raw_path(i), "rb", buffering=0) as f:
            n = f.readinto(self.pool.buffer(self.dst[i]))
        assert n == self.value_bytes

    def raw_put(self) -> None:
        if self.aiofiles:  # the variant compares aiofiles with the tier's own thread pool
            self.loop.run_until_complete(_all(self._aiofiles_put_one(i) for i in range(self.conc)))
            return
        list(self.threads.map(self._raw_put_one, range(self.conc)))

    def raw_get(self) -> None:
        list(self.threads.map(self._raw_get_one, range(self.conc)))

    def drop_cache(self) -> None:
        """Evict both sides' files from the page cache, so a get reads the disk."""
        paths = [self.backend._path(k) for k in self.keys]
        paths += [self._raw_path(i) for i in range(self.conc)]
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _all(aws: Iterable[Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*aws))
