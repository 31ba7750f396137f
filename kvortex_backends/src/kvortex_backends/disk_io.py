"""Blocking file primitives of the disk tier (run on its I/O threads, never on the event loop).

Writes are crash safe: a unique temporary name in the target directory, write, fsync, rename,
fsync the directory. A reader therefore sees either the old value, the new one or nothing.

O_DIRECT (used only when the tier's ``o_direct`` option asks for it): only the 4096-aligned head
of a 4096-aligned buffer goes direct, the tail through the page cache; a filesystem that refuses
O_DIRECT (tmpfs) silently gets buffered I/O. Measurements and the choice of the default are in
docs/backends.md.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
import time
import uuid

import numpy as np

from kvortex_core.errors import BufferTooSmallError

ALIGN = 4096
TMP_MARK = ".tmp."
SUFFIX = ".kv"
#: The file naming the process that holds a tier directory's lock (see :func:`lock_dir`).
OWNER_NAME = ".kvortex.owner"
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
HAS_NOWAIT = bool(_RWF_NOWAIT)


def address(view: memoryview) -> int:
    """The memory address of a buffer (read-only buffers too)."""
    if len(view) == 0:
        return 0
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def can_direct(view: memoryview) -> bool:
    """O_DIRECT needs an aligned address; only the aligned-length head goes direct."""
    return bool(_O_DIRECT) and len(view) >= ALIGN and address(view) % ALIGN == 0


def temp_name(final: str) -> str:
    """A name no other writer (thread or process) of the same key can pick."""
    return f"{final}{TMP_MARK}{os.getpid()}.{uuid.uuid4().hex[:12]}"


def _write_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_direct_head(tmp: str, view: memoryview) -> int:
    """Write the aligned head of ``view`` with O_DIRECT; returns bytes written (0 if refused)."""
    head = len(view) - len(view) % ALIGN
    try:
        dfd = os.open(tmp, os.O_WRONLY | _O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # the filesystem does not support O_DIRECT (tmpfs)
            return 0
        raise
    try:
        _write_all(dfd, view[:head], 0)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return 0  # rewritten below through the page cache
    finally:
        os.close(dfd)
    return head


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(final: str, data: memoryview, *, fsync: bool, direct: bool) -> bool:
    """Atomically replace ``final`` with ``data``; returns whether O_DIRECT was used."""
    tmp = temp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    used_direct = False
    try:
        done = _write_direct_head(tmp, data) if direct and can_direct(data) else 0
        used_direct = done > 0
        _write_all(fd, data[done:], done)
        if fsync:
            os.fsync(fd)
        os.close(fd)
        fd = -1
        os.rename(tmp, final)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        _unlink_quiet(tmp)
        raise
    if fsync:
        fsync_dir(os.path.dirname(final))
    return used_direct


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _read_all(fd: int, view: memoryview, offset: int) -> int:
    total = 0
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n == 0:
            break
        view, offset, total = view[n:], offset + n, total + n
    return total


class NotRegularFileError(OSError):
    """A cache path holds something other than a regular file (a FIFO, a device, a directory)."""


def _open_regular(path: str) -> tuple[int, int]:
    """``(fd, size)`` of the regular file at ``path``; O_NONBLOCK, so that something else put
    there (a FIFO, a device) never blocks the opener, and is refused as not a cache file."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(errno.EINVAL, f"{path} is not a regular file (not a KVortex cache file)")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_into(path: str, out: memoryview, *, direct: bool) -> int:
    """Read the whole file straight into ``out``; returns its length.

    Raises FileNotFoundError when absent and BufferTooSmallError when ``out`` is too short.
    """
    fd, size = _open_regular(path)
    try:
        if size > len(out):
            raise BufferTooSmallError(
                f"disk value {os.path.basename(path)} is {size} bytes, the buffer only {len(out)}"
            )
        target = out[:size]
        done = _read_direct_head(path, target) if direct and can_direct(target) else 0
        got = done + _read_all(fd, target[done:], done)
    finally:
        os.close(fd)
    if got != size:
        raise OSError(errno.EIO, f"short read: {got} of {size} bytes from {path}")
    return size


def read_cached(path: str, out: memoryview) -> int | None:
    """Read the whole file into ``out`` only if it is entirely in the page cache, else None.

    Uses ``preadv(RWF_NOWAIT)``, which never waits for the disk, so it is safe to call on the
    event loop: a warm read then costs no thread hand-off. Raises FileNotFoundError,
    BufferTooSmallError, or OSError(EOPNOTSUPP) where the filesystem lacks RWF_NOWAIT.
    """
    fd, size = _open_regular(path)
    try:
        if size > len(out):
            raise BufferTooSmallError(
                f"disk value {os.path.basename(path)} is {size} bytes, the buffer only {len(out)}"
            )
        done = 0
        while done < size:
            try:
                n = os.preadv(fd, [out[done:size]], done, _RWF_NOWAIT)
            except BlockingIOError:
                return None  # part of it is on disk only: read it on an I/O thread
            if n == 0:
                break
            done += n
    finally:
        os.close(fd)
    if done != size:
        raise OSError(errno.EIO, f"short read: {done} of {size} bytes from {path}")
    return size


def _read_direct_head(path: str, view: memoryview) -> int:
    head = len(view) - len(view) % ALIGN
    try:
        dfd = os.open(path, os.O_RDONLY | _O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return 0
        raise
    try:
        return _read_all(dfd, view[:head], 0)
    finally:
        os.close(dfd)


def read_head(path: str, nbytes: int) -> tuple[bytes, int]:
    """The first ``nbytes`` of a file and its size (for the start-up scan); a FIFO or a device
    there raises :class:`NotRegularFileError` instead of blocking the scan."""
    fd, size = _open_regular(path)
    try:
        return os.pread(fd, nbytes, 0), size
    finally:
        os.close(fd)


def unlink(path: str) -> bool:
    """Remove a file; False when it was already gone."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def make_dirs(root: str, parts: list[str]) -> str:
    """Create ``root/parts...`` (0700) below an existing root; never re-creates the root."""
    if not os.path.isdir(root):
        raise FileNotFoundError(errno.ENOENT, "disk tier directory vanished", root)
    path = root
    for part in parts:
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
    return path


class DirectoryBusyError(OSError):
    """Another open file (another process, or another engine in this one) holds the lock."""

    def __init__(self, holder: str) -> None:
        super().__init__(errno.EWOULDBLOCK, holder)
        self.holder = holder


#: Lock descriptors this process holds (a forked child closes its copies, see below).
_HELD: set[int] = set()


def _forget_locks_in_child() -> None:
    """A forked child shares its parent's locks (one open file): it closes its copies without
    unlocking, so the parent's death still frees them and the child cannot release them."""
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def owner_line(engine_id: str = "") -> str:
    """What :func:`lock_dir` writes into ``OWNER_NAME``: this process, host and engine."""
    line = f"pid {os.getpid()} on {socket.gethostname()}"
    return f"{line}, engine {engine_id}" if engine_id else line


def lock_dir(root: str, engine_id: str = "", *, attempts: int = 3) -> int | None:
    """Take the exclusive ``flock`` of the directory ``root`` itself and name the owner.

    The lock is on the directory, not on a file in it: a cleanup that deletes old files cannot
    remove it while the directory holds anything. Returns the lock's descriptor (closing it
    releases the lock, as does the death of the process), or None on a filesystem where a
    directory cannot be locked (NFS: nothing is enforced there). Raises
    :class:`DirectoryBusyError` naming the holder (from ``OWNER_NAME``) when another open file
    holds it: ``flock`` locks belong to an open file, so two engines in one process exclude each
    other too. ``attempts``: tries 20 ms apart (an observer's :func:`peek_owner` holds the lock
    for an instant).
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        taken = _flock(fd)
        for _ in range(attempts - 1):
            if taken is not False:
                break
            time.sleep(0.02)
            taken = _flock(fd)
    except OSError:
        os.close(fd)
        raise
    if not taken:
        os.close(fd)
        if taken is None:
            return None
        raise DirectoryBusyError(owner_of(root))
    _HELD.add(fd)
    try:
        _write_owner(os.path.join(root, OWNER_NAME), owner_line(engine_id))
    except BaseException:  # the lock is not kept by a directory this engine could not take
        unlock_dir(fd)
        raise
    return fd


def _write_owner(path: str, line: str) -> None:
    """Write the owner file; something else in its place (a FIFO, a device, a symlink) is
    removed first: opening a FIFO with no reader would block, and we hold the lock."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        owner = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.ENXIO, errno.ELOOP, errno.ENODEV, errno.ETXTBSY):
            raise
        _unlink_quiet(path)
        owner = os.open(path, flags | os.O_EXCL, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(owner).st_mode):  # a FIFO with a reader opened anyway
            os.close(owner)
            _unlink_quiet(path)
            owner = os.open(path, flags | os.O_EXCL, 0o600)
        os.write(owner, (line + "\n").encode())
    finally:
        os.close(owner)


def peek_owner(root: str) -> tuple[bool, str]:
    """(whether another open file holds ``root``'s lock now, the owner line last written).

    Held for an instant when free (an observer's check; :func:`lock_dir` retries meanwhile);
    a filesystem that cannot lock a directory reads as free.
    """
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False, owner_of(root)
    try:
        held = _flock(fd) is False
    except OSError:
        held = False
    finally:
        os.close(fd)  # releases the lock if taken
    return held, owner_of(root)


def _flock(fd: int) -> bool | None:
    """Try the exclusive lock once: True taken, False held by another open file, None when
    the filesystem cannot lock this file; other errors raise."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
            return None
        raise
    return True


def owner_of(root: str) -> str:
    """The owner line of ``root`` (``"unknown owner"`` when missing)."""
    try:
        fd, _ = _open_regular(os.path.join(root, OWNER_NAME))  # a FIFO there never blocks
        try:
            text = os.pread(fd, 256, 0).decode("utf-8", "replace").strip()
        finally:
            os.close(fd)
    except OSError:
        text = ""
    return text or "unknown owner"


def unlock_dir(fd: int) -> None:
    """Release a lock taken by :func:`lock_dir` (not one a fork left behind: already closed)."""
    if fd not in _HELD:
        return
    _HELD.discard(fd)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
