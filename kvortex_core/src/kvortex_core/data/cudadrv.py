"""The transfer path's stream calls (event record, stream wait, DMA) straight to the CUDA driver,
through ctypes without releasing the GIL.

Every torch CUDA call (``Event.record``, ``Stream.wait_event``, ``Tensor.copy_``) releases the
GIL around the driver call and takes it back afterwards. One thread alone pays little for that;
two threads enqueueing at once (a save beside a load, the engine's both-directions case) can
hand the GIL to each other at every such call, and on a VM each hand-over costs tens of
microseconds: a load's batch took 0.4-1.2 ms to enqueue beside a save against ~0.1 ms alone
(``tests/gpu/bidir_timeline.py``). These calls take ~1 us in the driver and never block, so
holding the GIL through them is cheaper than letting it go: ``ctypes.PyDLL`` calls keep it.

Used only where it is safe: the calling thread's current CUDA context is the stream's (else
the caller falls back to torch, which switches devices itself), events torch has already
created (their first record goes through torch), and host memory that is page-locked (a DMA to
pageable memory blocks the host until it is done, which must not happen with the GIL held).
The config's ``transfer.driver_calls: false`` turns it off for an engine, :func:`set_enabled`
for the process (``kvortex bench transfer --no-driver-calls``); without libcuda it is off.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

import torch

_c_void_p = ctypes.c_void_p


class CudaDriver:
    """A handful of libcuda entry points; every method returns False where the caller must use torch."""

    def __init__(self, lib: ctypes.PyDLL) -> None:
        self._record = lib.cuEventRecord
        self._record.argtypes = [_c_void_p, _c_void_p]
        self._wait = lib.cuStreamWaitEvent
        self._wait.argtypes = [_c_void_p, _c_void_p, ctypes.c_uint]
        self._d2h = lib.cuMemcpyDtoHAsync_v2
        self._d2h.argtypes = [_c_void_p, ctypes.c_uint64, ctypes.c_size_t, _c_void_p]
        self._h2d = lib.cuMemcpyHtoDAsync_v2
        self._h2d.argtypes = [ctypes.c_uint64, _c_void_p, ctypes.c_size_t, _c_void_p]
        self._ctx_current = lib.cuCtxGetCurrent
        self._ctx_current.argtypes = [ctypes.POINTER(_c_void_p)]
        self._stream_ctx = lib.cuStreamGetCtx
        self._stream_ctx.argtypes = [_c_void_p, ctypes.POINTER(_c_void_p)]
        for fn in (self._record, self._wait, self._d2h, self._h2d, self._ctx_current, self._stream_ctx):
            fn.restype = ctypes.c_int
        self._local = threading.local()
        self._pinned: dict[int, bool] = {}

    def ready(self, stream: Any) -> bool:
        """Whether this thread's current context is ``stream``'s (cached per thread and stream)."""
        seen = getattr(self._local, "streams", None)
        if seen is None:
            seen = self._local.streams = {}
        handle = stream.cuda_stream
        ok = seen.get(handle)
        if ok is None:
            cur, ctx = _c_void_p(), _c_void_p()
            ok = (self._ctx_current(ctypes.byref(cur)) == 0 and self._stream_ctx(handle, ctypes.byref(ctx)) == 0
                  and cur.value is not None and cur.value == ctx.value)
            if len(seen) < 64:
                seen[handle] = ok
        return ok

    def record(self, event: Any, stream: Any) -> bool:
        handle = event.cuda_event
        if not handle or not self.ready(stream):
            return False  # an event torch has not created yet: its first record goes through torch
        _check(self._record(handle, stream.cuda_stream), "cuEventRecord")
        return True

    def wait(self, stream: Any, event: Any) -> bool:
        handle = event.cuda_event
        if not handle or not self.ready(stream):
            return False
        _check(self._wait(stream.cuda_stream, handle, 0), "cuStreamWaitEvent")
        return True

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: Any) -> bool:
        """One DMA of ``src`` into ``dst`` (contiguous, same size; one on the device, one in
        page-locked host memory) on ``stream``; False where torch must do it."""
        nbytes = dst.numel() * dst.element_size()
        if (nbytes != src.numel() * src.element_size() or not dst.is_contiguous() or not src.is_contiguous()
                or not self.ready(stream)):
            return False
        if dst.is_cuda and not src.is_cuda:
            if not self.pinned(src):
                return False
            _check(self._h2d(dst.data_ptr(), src.data_ptr(), nbytes, stream.cuda_stream), "cuMemcpyHtoDAsync")
            return True
        if src.is_cuda and not dst.is_cuda:
            if not self.pinned(dst):
                return False
            _check(self._d2h(dst.data_ptr(), src.data_ptr(), nbytes, stream.cuda_stream), "cuMemcpyDtoHAsync")
            return True
        return False

    def pinned(self, host: torch.Tensor) -> bool:
        """Whether ``host``'s memory is page-locked, asked once per storage (the pool's slots
        share one); a DMA to pageable memory would block the host with the GIL held."""
        key = host.untyped_storage().data_ptr()
        known = self._pinned.get(key)
        if known is None:
            known = bool(host.is_pinned())
            if len(self._pinned) >= 4096:
                self._pinned.clear()
            self._pinned[key] = known
        return known


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise RuntimeError(f"{what} failed with CUDA driver error {rc}")


def _load() -> CudaDriver | None:
    if not torch.cuda.is_available():
        return None
    try:
        return CudaDriver(ctypes.PyDLL("libcuda.so.1"))
    except (OSError, AttributeError):
        return None


_DRIVER: CudaDriver | None = None
_LOADED = False
_ENABLED = True
_LOAD_LOCK = threading.Lock()


def set_enabled(enabled: bool) -> None:
    """Whether transfer engines made from now on in this process use driver calls at all."""
    global _ENABLED
    _ENABLED = bool(enabled)


def driver() -> CudaDriver | None:
    """The process's driver calls, or None (no CUDA, no libcuda, or turned off)."""
    global _DRIVER, _LOADED
    if not _ENABLED:
        return None
    if not _LOADED:
        with _LOAD_LOCK:
            if not _LOADED:
                _DRIVER = _load()
                _LOADED = True
    return _DRIVER
