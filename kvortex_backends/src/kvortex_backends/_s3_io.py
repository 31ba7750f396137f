"""Blocking S3 calls of the ``s3`` tier; each runs on the backend's dedicated thread pool.

Reads land directly in the caller's buffer (``StreamingBody.readinto``), large writes stream
from the caller's buffer through s3transfer's multipart upload, so a payload is copied at most
once on its way to or from the socket.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvortex_core.errors import BackendError, BufferTooSmallError

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_MISSING = {"404", "NoSuchKey", "NotFound"}


class ViewReader(io.RawIOBase):
    """A seekable read-only file over a memoryview, so uploads need no copy of the payload."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(buffer)]
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        chunk = bytes(self._view[self._pos : end])
        self._pos += len(chunk)
        return chunk


def error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def is_missing(exc: BaseException) -> bool:
    return error_code(exc) in _MISSING


def body_of(view: memoryview) -> bytes | bytearray:
    """A request body botocore accepts; reuses the view's own bytes object when it can."""
    owner = view.obj
    if isinstance(owner, (bytes, bytearray)) and len(owner) == view.nbytes:
        return owner
    return bytes(view)  # one copy; botocore needs bytes or a file to send in one piece


def put_small(client: Any, bucket: str, name: str, view: memoryview) -> None:
    client.put_object(Bucket=bucket, Key=name, Body=body_of(view))


def put_large(manager: Any, bucket: str, name: str, view: memoryview) -> None:
    manager.upload(ViewReader(view), bucket, name).result()


@dataclass(frozen=True)
class FirstRead:
    """The first (ranged) GET of a read: total size, version tag, bytes already in ``out``."""

    total: int
    etag: str
    got: int


def _read_body(body: Any, out: memoryview, name: str, deadline: float) -> int:
    """Read the whole body into ``out``, cut at ``deadline`` (``time.monotonic()``).

    botocore's ``read_timeout`` bounds each socket read, not the body: one byte a second would
    hold a pool thread (and the caller's buffer) for hours. A timer closes the body at the
    deadline; the blocked read then fails within ``read_timeout``.
    """
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        sock = _socket_of(body)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # a blocked recv returns at once (close would not)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    timer.daemon = True
    timer.start()
    got = 0
    try:
        while got < len(out) and not expired.is_set():
            n = body.readinto(out[got:])
            if not n:
                break
            got += n
        if not expired.is_set() and got == len(out):
            body.readinto(bytearray(1))  # reaching EOF makes botocore verify length and checksum
    except Exception as exc:
        if not expired.is_set():
            raise
        body.close()
        raise _expired(name, got, len(out)) from exc
    finally:
        timer.cancel()
    if expired.is_set():
        body.close()
        raise _expired(name, got, len(out))
    body.close()
    if got != len(out):
        raise BackendError(f"s3 object {name!r} ended after {got} of {len(out)} bytes; retry the read")
    return got


def _socket_of(body: Any) -> socket.socket | None:
    """The socket under a botocore ``StreamingBody`` (urllib3 response), if it can be found."""
    raw = getattr(body, "_raw_stream", None)
    sock = getattr(getattr(raw, "_connection", None), "sock", None)
    if sock is None:  # a response released from its connection: through the file object
        fp = getattr(getattr(raw, "_fp", None), "fp", None)
        sock = getattr(getattr(fp, "raw", None), "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def _expired(name: str, got: int, want: int) -> BackendError:
    return BackendError(f"s3 object {name!r}: {got} of {want} bytes arrived within request_timeout; "
                        "the endpoint is too slow (raise the option request_timeout if it is expected)")


def get_first(client: Any, bucket: str, name: str, out: memoryview, first: int | None,
              timeout: float) -> FirstRead | None:
    """GET the object (or only bytes ``[0, first)``) into ``out``; None when it does not exist.

    A plain GET is cheaper than a ranged one for servers that slice the object to serve a range.
    ``timeout``: seconds the request may take in all (see :func:`_read_body`).
    """
    deadline = time.monotonic() + timeout
    try:
        if first is None:
            resp = client.get_object(Bucket=bucket, Key=name)
        else:
            resp = client.get_object(Bucket=bucket, Key=name, Range=f"bytes=0-{first - 1}")
    except Exception as exc:
        if is_missing(exc):
            return None
        if error_code(exc) != "InvalidRange":
            raise
        resp = client.get_object(Bucket=bucket, Key=name)  # an empty object has no byte 0
    body, length = resp["Body"], int(resp["ContentLength"])
    match = _CONTENT_RANGE.match(resp.get("ContentRange") or "")
    total = int(match.group(3)) if match else length
    if total > len(out):
        body.close()
        raise BufferTooSmallError(
            f"s3 object {name!r} is {total} bytes but the buffer holds {len(out)}; "
            "pass a buffer of at least the payload size"
        )
    _read_body(body, out[:length], name, deadline)
    return FirstRead(total=total, etag=resp.get("ETag", ""), got=length)


def get_range(client: Any, bucket: str, name: str, out: memoryview, start: int, etag: str,
              timeout: float) -> None:
    """GET ``[start, start+len(out))`` of the same object version (If-Match its ETag)."""
    deadline = time.monotonic() + timeout
    resp = client.get_object(Bucket=bucket, Key=name, IfMatch=etag,
                             Range=f"bytes={start}-{start + len(out) - 1}")
    _read_body(resp["Body"], out, name, deadline)


def head(client: Any, bucket: str, name: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=name)
    except Exception as exc:
        if is_missing(exc):
            return False
        raise
    return True


def list_names(client: Any, bucket: str, prefix: str, limit: int) -> set[str] | None:
    """Key names under ``prefix`` (prefix stripped), or None when there are more than ``limit``."""
    names: set[str] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        names.update(obj["Key"][len(prefix):] for obj in page.get("Contents", ()))
        if len(names) > limit:
            return None
    return names


def delete_names(client: Any, bucket: str, names: list[str]) -> None:
    for start in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
        batch = [{"Key": n} for n in names[start : start + 1000]]
        resp = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        errors = resp.get("Errors") or []
        if errors:
            first = errors[0]
            raise BackendError(f"s3 delete of {first.get('Key')!r} failed: {first.get('Code')} "
                               f"{first.get('Message')} ({len(errors)} keys not deleted)")
