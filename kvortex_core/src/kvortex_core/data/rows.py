"""Row gather: every layer's KV as rows of one 2-D alias, so one kernel moves many layers.

Python pays ~10-20 us per kernel launch; one ``index_select`` per (layer, chunk) made the
host, not PCIe, the bottleneck (1024 launches per GiB for Llama-8B). Instead the whole
address span of the registered KV tensors is aliased once as ``[rows, row_elems]`` where a
row is the longest run that is contiguous in both the engine layout and the canonical
payload (a whole ``[N, H, D]`` page for NHD, one head vector ``D`` for HND or vLLM 0.30+
unified layouts). A chunk's canonical payload is then a list of row numbers, and one
``index_select`` (save) or ``index_copy_`` (load) moves any number of layers at once.

The alias spans the gaps between separate per-layer allocations; only rows that belong to
the registered tensors are ever addressed. A row starts at any multiple of a step that divides
every layer offset and stride, so rows may overlap: an MLA block page (72 KiB) is one row even
where separate allocations sit only 2 MiB aligned to each other (rows of 128 bytes before: a
row table 576 times longer). When the head dimension is not contiguous (an exotic layout),
:func:`build_row_plan` returns None and the caller falls back to one kernel per layer.

When the layers sit at a uniform distance from each other (one buffer, as vLLM 0.30+ and
cross-layer caches allocate them, or per-layer allocations that landed evenly spaced), a
:class:`StridedPlan` does better: all layers are one strided ``[L, K, B, N, H, D]`` view, and
``index_select`` along ``B`` with the chunk's block ids writes the canonical payload
``[L, K, n, N, H, D]`` directly. No row table is built per call (on an H100 that table and
its gather cost 70-130 us of host time cold against 16-33 us for the strided gather, and the
strided kernel is faster on the GPU too: 33 us against 83 + 18 us for a Llama-8B chunk of the
unified layout, ``tests/gpu/gather_probe.py``). Layers spaced unevenly split into a few such
views (runs), past ``max_runs`` of them there is no strided plan; the transfer engine's "auto"
mode takes it only for a single run (see ``transfer._strided_pays``). Layers at falling addresses
(separate ``cudaMalloc`` calls place each below the previous one) are a run too: its view starts
at the last layer, and one advanced-indexing kernel over (layer, kv, block) still writes the
payload in layer order ("auto" gives such caches the row plan instead: measured level, and one
plan for every irregular placement).
"""

from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RowPlan:
    """The alias and the row arithmetic of one registered KV cache."""

    alias: torch.Tensor  # [rows, row_elems], transfer dtype, on the KV device
    row_elems: int
    base_rows: torch.Tensor  # [L] first row of each layer's view (int64, on device)
    k_rows: int
    block_rows: int
    token_rows: int  # 0 when the token dimension is folded into the row
    head_rows: int  # 0 when the head dimension is folded into the row
    tokens_in_row: bool
    heads_in_row: bool
    #: The same rows in the widest element type that divides them (fewer, wider loads per row).
    wide: torch.Tensor | None = None
    #: Row numbers of block 0 in payload order, ``[L*K, N'*H'*R']`` (built on first use).
    _offsets: torch.Tensor | None = None

    @property
    def row_bytes(self) -> int:
        return self.row_elems * self.alias.element_size()

    @property
    def wide_rows(self) -> torch.Tensor:
        """``[rows, row_bytes / w]`` in the widest dtype ``w`` that divides rows and alignment."""
        if self.wide is None:
            with torch.inference_mode(False):  # written by threads in and out of inference mode
                self.wide = _widen(self.alias)
        return self.wide

    def block_offsets(self, block_size: int, kv_count: int, heads: int) -> torch.Tensor:
        """Row numbers of block 0, every layer, in payload order (computed once, kept on device)."""
        if self._offsets is None:
            with torch.inference_mode(False):
                self._offsets = self._block_offsets(block_size, kv_count, heads)
        return self._offsets

    def _block_offsets(self, block_size: int, kv_count: int, heads: int) -> torch.Tensor:
        dev = self.base_rows.device

        def ax(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = [1] * 6
            shape[dim] = -1
            return t.view(shape)

        rows = ax(self.base_rows, 0) + ax(torch.arange(kv_count, device=dev) * self.k_rows, 1)
        n_tok = 1 if self.tokens_in_row else block_size
        n_head = 1 if self.heads_in_row else heads
        if n_tok > 1:
            rows = rows + ax(torch.arange(n_tok, device=dev) * self.token_rows, 3)
        if n_head > 1:
            rows = rows + ax(torch.arange(n_head, device=dev) * self.head_rows, 4)
        return rows.reshape(rows.shape[0] * rows.shape[1], -1).contiguous()  # [L*K, N'H'R']

    def call_rows(self, block_ids: torch.Tensor, block_size: int, kv_count: int, heads: int) -> torch.Tensor:
        """Row numbers of whole chunks in payload order: ``[C, L, K, n, N'*H'*R']``.

        ``block_ids`` is ``[C, n]`` (pad short chunks; their tail is sliced off per unit).
        One kernel per call: the per-block offsets are precomputed, so each unit costs a slice.
        The add is 4-D (a 7-D broadcast cost ~100 us of host time to set up).
        """
        offsets = self.block_offsets(block_size, kv_count, heads)
        c, n = block_ids.shape
        lk, inner = offsets.shape
        # int64: index_copy_ takes no int32 (8 bytes per row: 3% of 256-byte rows)
        rows = torch.add(offsets.view(1, lk, 1, inner), block_ids.view(c, 1, n, 1), alpha=self.block_rows)
        return rows.view(c, lk // kv_count, kv_count, n, inner)

    @staticmethod
    def unit_rows(rows: torch.Tensor, chunk: int, l0: int, l1: int, blocks: int, skip: int = 0) -> torch.Tensor:
        """Row numbers of layers ``[l0, l1)`` of one chunk (``blocks`` valid, ``skip`` skipped)."""
        if l0 == 0 and l1 == rows.shape[1] and skip == 0 and blocks == rows.shape[3]:
            return rows[chunk].view(-1)  # a whole chunk: one view op, not four
        return rows[chunk, l0:l1, :, skip:blocks].reshape(-1)


#: Element types tried for the row copies, widest first (complex128: 16-byte loads and stores).
_WIDE = (torch.complex128, torch.int64, torch.int32, torch.int16)


def _widen(alias: torch.Tensor) -> torch.Tensor:
    """``alias`` viewed with the widest element type dividing its rows and address.

    index_select / index_copy_ cost per element: 256-byte rows of bf16 are 128 elements,
    of complex128 16, so the same bytes move with 8x fewer index computations. Each type
    is probed once on the device (a backend without complex index kernels falls back).
    """
    row_bytes = alias.shape[1] * alias.element_size()
    for dtype in _WIDE:
        size = torch.empty((), dtype=dtype).element_size()
        if (size <= alias.element_size() or row_bytes % size or alias.data_ptr() % size
                or alias.stride(0) * alias.element_size() % size):
            continue
        if _index_ops_work(dtype, alias.device):
            return alias.view(torch.uint8).view(dtype)
    return alias


def alias_bytes(ptr: int, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over ``[ptr, ptr + nbytes)`` without owning it (the caller keeps owners alive)."""
    if device.type == "cuda":
        holder = _CudaSpan(ptr, nbytes)
        with torch.cuda.device(device):
            return torch.as_tensor(holder, device=device)
    import numpy as np

    array = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(ptr))
    return torch.from_numpy(array)


def raw_alias(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements (same shape, strides, dtype) through an alias that owns nothing and carries
    no autograd or inference-mode state (the caller keeps ``t`` alive)."""
    extent = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1
    flat = alias_bytes(t.data_ptr(), extent * t.element_size(), t.device).view(t.dtype)
    return torch.as_strided(flat, tuple(t.shape), tuple(t.stride()))


class _CudaSpan:
    """Exposes a device address range through ``__cuda_array_interface__`` (zero-copy)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2, "strides": None,
        }


def _row_shape(view: torch.Tensor) -> tuple[int, bool, bool] | None:
    """The longest canonical suffix of ``[B, K, N, H, D]`` contiguous in memory, as
    ``(row_elems, tokens_in_row, heads_in_row)``: a page N*H*D, the heads of a token H*D, or one
    head vector D; None when D itself is strided."""
    _, _, n, h, d = view.shape
    s = _strides(view)
    if s[4] not in (0, 1):
        return None
    if h == 1 or s[3] == d:
        if n == 1 or s[2] == h * d:
            return n * h * d, True, True
        return h * d, False, True
    return d, False, False


def build_row_plan(views: list[torch.Tensor], keep: Any) -> RowPlan | None:
    """A RowPlan for per-layer ``[B, K, N, H, D]`` views with identical strides, or None.

    Rows are the longest runs contiguous in both layouts (they may overlap, see :func:`_plan`).
    ``keep`` (the engine's tensors) must outlive the plan: the alias owns nothing.
    """
    shape = _row_shape(views[0])
    return None if shape is None else _plan(views, *shape)


def _plan(views: list[torch.Tensor], row: int, tokens_in: bool, heads_in: bool) -> RowPlan | None:
    """Rows of ``row`` elements starting every ``step`` bytes: the largest step dividing every
    layer offset, every stride a row number is built from, and the row itself. Rows overlap when
    the step is shorter than a row (separate allocations are only 2 MiB aligned to each other,
    an MLA block page is 72 KiB): a page is still one row, so a chunk is a few hundred row numbers,
    not one per 128 bytes. Only whole pages are ever addressed, so no two rows a transfer writes overlap."""
    first = views[0]
    es = first.element_size()
    start, end = _span(views)
    rel = [(v.data_ptr() - start) for v in views]
    strides = _strides(first)
    needed = [strides[1], strides[0]] + ([] if tokens_in else [strides[2]]) + ([] if heads_in else [strides[3]])
    step = math.gcd(row * es, *rel, *(x * es for x in needed))  # bytes; gcd(a, 0) = a
    if step % es or end - start < row * es:
        return None
    nrows = (end - start - row * es) // step + 1
    flat = alias_bytes(start, end - start, first.device).view(first.dtype)
    alias = torch.as_strided(flat, (nrows, row), (step // es, 1))
    base = torch.tensor([r // step for r in rel], dtype=torch.int64, device=first.device)
    return RowPlan(
        alias=alias, row_elems=row, base_rows=base,
        k_rows=strides[1] * es // step, block_rows=strides[0] * es // step,
        token_rows=0 if tokens_in else strides[2] * es // step,
        head_rows=0 if heads_in else strides[3] * es // step,
        tokens_in_row=tokens_in, heads_in_row=heads_in,
    )


def _strides(view: torch.Tensor) -> tuple[int, ...]:
    """Strides with size-1 dimensions zeroed (their stride is arbitrary and never used)."""
    return tuple(0 if size == 1 else stride for size, stride in zip(view.shape, view.stride(), strict=True))


def _span(views: list[torch.Tensor]) -> tuple[int, int]:
    """[first byte, one past the last byte] touched by any of the views."""
    es = views[0].element_size()
    lo, hi = None, None
    for v in views:
        extent = sum((size - 1) * stride for size, stride in zip(v.shape, v.stride(), strict=True))
        a, b = v.data_ptr(), v.data_ptr() + (extent + 1) * es
        lo = a if lo is None else min(lo, a)
        hi = b if hi is None else max(hi, b)
    assert lo is not None and hi is not None
    return lo, hi


@dataclass
class _Run:
    """Layers ``[first, end)`` at one constant address step, as one ``[end - first, K, B, N, H, D']``
    view in address order. ``reversed``: each layer lies below the one before it (a negative
    step; consecutive ``cudaMalloc`` calls hand out falling addresses on the H100 VMs, see
    ``tests/gpu/runs_probe.py``), so the view's index 0 is layer ``end - 1``."""

    first: int
    end: int
    view: torch.Tensor
    reversed: bool = False
    #: For a reversed run: view positions of layers ``first, first + 1, ...`` as ``[n, 1, 1]``,
    #: and ``arange(K)`` as ``[1, K, 1]`` (device constants, the gather's index tensors).
    layer_index: torch.Tensor | None = None
    kv_index: torch.Tensor | None = None


@dataclass
class StridedPlan:
    """Every layer's ``[B, K, N, H, D]`` view as slices of a few ``[L', K, B, N, H, D']`` strided views.

    ``runs``: groups of evenly spaced layers, their views in ``dtype`` (the widest element type
    dividing the rows, like :attr:`RowPlan.wide_rows`). A unit of layers ``[l0, l1)`` inside one
    run gathers with ``index_select(view[l0:l1], 2, block_ids)``; in a reversed run (layers at
    falling addresses: strides cannot be negative) with one advanced-indexing kernel over
    (layer, kv, block), which writes the same canonical ``[l1 - l0, K, n, N, H, D']`` order.
    """

    runs: list[_Run]
    dtype: torch.dtype
    _units: dict[tuple[int, int], tuple[torch.Tensor, Any]] = field(default_factory=dict)

    @property
    def starts(self) -> list[int]:
        """First layer of each run (units never cross these)."""
        return [r.first for r in self.runs]

    def unit(self, l0: int, l1: int) -> tuple[torch.Tensor, Any]:
        """``(view, index)`` of layers ``[l0, l1)`` (inside one run), cached: ``index`` is None
        for ``view`` = those layers as ``[l1 - l0, K, B, N, H, D']``, else ``(layer_index,
        kv_index)`` into the whole reversed run's view."""
        unit = self._units.get((l0, l1))
        if unit is None:
            for r in self.runs:
                if r.first <= l0 < r.end:
                    if l1 > r.end:
                        raise ValueError(f"layers [{l0}, {l1}) cross the run boundary at layer {r.end}")
                    if r.reversed:
                        assert r.layer_index is not None
                        unit = (r.view, (r.layer_index[l0 - r.first:l1 - r.first], r.kv_index))
                    else:
                        unit = (r.view if (l0, l1) == (r.first, r.end) else r.view[l0 - r.first:l1 - r.first], None)
                    break
            else:
                raise ValueError(f"layer {l0} is in no run")
            self._units[(l0, l1)] = unit
        return unit

    def gather(self, l0: int, l1: int, ids: torch.Tensor, out: torch.Tensor) -> None:
        """``out[l, k, i] = layer (l0 + l), kv k, block ids[i]`` (``out``: ``[l1 - l0, K, n, N, H, D']``)."""
        view, index = self.unit(l0, l1)
        if index is None:
            torch.index_select(view, 2, ids, out=out)
        else:
            torch.ops.aten.index.Tensor_out(view, [index[0], index[1], ids.view(1, 1, -1)], out=out)

    def scatter(self, l0: int, l1: int, ids: torch.Tensor, src: torch.Tensor) -> None:
        """The reverse of :meth:`gather`: ``src`` into blocks ``ids`` of layers ``[l0, l1)``."""
        view, index = self.unit(l0, l1)
        if index is None:
            view.index_copy_(2, ids, src)
        else:
            view.index_put_((index[0], index[1], ids.view(1, 1, -1)), src)


def build_strided_plan(views: list[torch.Tensor], max_runs: int = 8) -> StridedPlan | None:
    """A StridedPlan for per-layer ``[B, K, N, H, D]`` views, or None.

    Needs identical shapes and strides, a contiguous last dimension, and at most ``max_runs``
    groups of evenly spaced layers (rising or falling addresses). Like :func:`build_row_plan`
    the views own nothing: the engine's tensors must outlive the plan.
    """
    first = views[0]
    strides = _strides(first)
    if strides[4] not in (0, 1) or any(v.shape != first.shape or _strides(v) != strides for v in views):
        return None
    ptrs = [v.data_ptr() for v in views]
    runs = _runs(ptrs)
    if len(runs) > max_runs:
        return None
    es = first.element_size()
    row_bytes = first.shape[4] * es
    for dtype in (*_WIDE, first.dtype):
        w = torch.empty((), dtype=dtype).element_size()
        if (w < es or row_bytes % w or any(s * es % w for s in strides[:4]) or any(p % w for p in ptrs)
                or any(step % w for _, _, step in runs) or not _index_ops_work(dtype, first.device)
                or (any(step < 0 for _, _, step in runs) and not _advanced_index_works(dtype, first.device))):
            continue
        return StridedPlan([_make_run(views, a, b, step, dtype) for a, b, step in runs], dtype)
    return None


def _runs(ptrs: list[int]) -> list[tuple[int, int, int]]:
    """``(first, end, step)`` of maximal groups of layers at a constant nonzero address step
    (negative: each layer below the one before it); a group of one layer has step 0."""
    runs, a = [], 0
    while a < len(ptrs):
        step = ptrs[a + 1] - ptrs[a] if a + 1 < len(ptrs) else 0
        b = a + 1
        if step:
            while b < len(ptrs) and ptrs[b] - ptrs[b - 1] == step:
                b += 1
        runs.append((a, b, step if b > a + 1 else 0))
        a = b
    return runs


def _make_run(views: list[torch.Tensor], a: int, b: int, step: int, dtype: torch.dtype) -> _Run:
    if step >= 0:
        return _Run(a, b, _run_view(views, a, b, step, dtype, low=a))
    view = _run_view(views, a, b, -step, dtype, low=b - 1)  # index 0: layer b - 1
    dev = view.device
    # built once at registration, then synchronized: the transfers read them from other streams
    layer_index = torch.arange(b - 1 - a, -1, -1, device=dev).view(-1, 1, 1)
    kv_index = torch.arange(view.shape[1], device=dev).view(1, -1, 1)
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()
    return _Run(a, b, view, True, layer_index, kv_index)


def _run_view(views: list[torch.Tensor], a: int, b: int, step: int, dtype: torch.dtype, *, low: int) -> torch.Tensor:
    """Layers ``[a, b)`` as one ``[b - a, K, B, N, H, D']`` view in ``dtype`` from the lowest
    address, layer ``low`` (``step`` bytes apart, in address order)."""
    first, last = views[low], views[a + b - 1 - low]
    es = first.element_size()
    w = torch.empty((), dtype=dtype).element_size()
    extent = sum((size - 1) * stride for size, stride in zip(last.shape, last.stride(), strict=True)) + 1
    start = first.data_ptr()
    alias = alias_bytes(start, last.data_ptr() + extent * es - start, first.device).view(dtype)
    nb, k, n, h, d = first.shape
    sb, sk, sn, sh, _ = (s * es // w for s in _strides(first))
    return torch.as_strided(alias, (b - a, k, nb, n, h, d * es // w), (step // w, sk, sb, sn, sh, 1))


_INDEX_OPS: dict[tuple[torch.dtype, str], bool] = {}


def _index_ops_work(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``index_select`` and ``index_copy_`` run for ``dtype`` on ``device`` (probed once)."""
    key = (dtype, str(device))
    ok = _INDEX_OPS.get(key)
    if ok is None:
        try:
            probe = torch.zeros((2, 2), dtype=dtype, device=device)
            index = torch.tensor([1, 0], device=device)
            probe.index_copy_(0, index, torch.index_select(probe, 0, index))
            ok = True
        except (RuntimeError, NotImplementedError):
            ok = False
        _INDEX_OPS[key] = ok
    return ok


def _advanced_index_works(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``index.Tensor_out`` and ``index_put_`` run for ``dtype`` on ``device`` (probed once)."""
    key = (dtype, f"advanced {device}")
    ok = _INDEX_OPS.get(key)
    if ok is None:
        try:
            probe = torch.zeros((2, 2), dtype=dtype, device=device)
            index = torch.tensor([1, 0], device=device)
            out = torch.empty_like(probe)
            torch.ops.aten.index.Tensor_out(probe, [index], out=out)
            probe.index_put_((index,), out)
            ok = True
        except (RuntimeError, NotImplementedError):
            ok = False
        _INDEX_OPS[key] = ok
    return ok
