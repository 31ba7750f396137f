"""KV cache layouts: detect how an engine stores its paged KV, and view it one way.

Every supported layout is reduced to one *logical* per-layer view
``[num_blocks, kv_count, block_size, num_kv_heads, head_size]`` (a strided view,
never a copy), whatever the physical stride order. The transfer engine gathers
from and scatters into that view, and the stored payload of one chunk is always
the canonical ``[num_layers, kv_count, chunk_tokens, num_kv_heads, head_size]``,
so a chunk saved from one layout loads into any other with the same model shape.

Supported source layouts (the ``dims`` string names each source dimension:
B blocks, L layers, K key/value, N tokens in a block, H heads, D head size,
C key and value concatenated along the head dimension):

====================  ==================================  ===============
kind                  per tensor                           dims
====================  ==================================  ===============
``flash_attn``        per layer ``(2, B, N, H, D)``        ``KBNHD``
``flashinfer``        per layer ``(B, 2, N, H, D)``        ``BKNHD``
``mla``               per layer ``(B, N, D)``              ``BND``
``unified``           per layer ``[B, H, N, C]`` (vLLM>=0.30, any physical order)  ``BHNC``
``cross_layer``       one tensor ``(B, L, 2, N, H, D)``    ``BLKNHD``
``cross_layer_mla``   one tensor ``(B, L, N, D)``          ``BLND``
====================  ==================================  ===============

NHD versus HND (and vLLM 0.30+ ``LBNHC``/``LBHNC``/``BLNHC``...) are stride orders of
the same logical shape; they are recorded in ``KVLayout.stride_order`` and need no hint.
Hints (all optional): ``kind``, ``dims`` (any permutation of the letters above for
an unusual tensor), ``kv_count`` (1 for MLA under ``unified``), ``head_size_v``,
``block_size``, ``num_kv_heads``, ``head_size`` (checked against the tensors).
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvortex_core.errors import LayoutError

_FP8_NAMES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
#: One-byte storage types an engine may allocate quantized KV in: vLLM's ``--kv-cache-dtype
#: fp8`` caches are uint8 tensors (its kernels view them as fp8), its ``int8`` caches int8. The
#: ``dtype`` hint names what such bytes hold, for the key namespace and the payload header.
STORAGE_DTYPES: tuple[torch.dtype, ...] = (torch.uint8, torch.int8)
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16) + tuple(
    getattr(torch, n) for n in _FP8_NAMES if hasattr(torch, n)
) + STORAGE_DTYPES

#: Default ``dims`` per kind.
KIND_DIMS: dict[str, str] = {
    "flash_attn": "KBNHD",
    "flashinfer": "BKNHD",
    "mla": "BND",
    "unified": "BHNC",
    "cross_layer": "BLKNHD",
    "cross_layer_mla": "BLND",
}
_HINT_KEYS = frozenset({"kind", "dims", "kv_count", "head_size_v", "block_size", "num_kv_heads",
                        "head_size", "dtype"})
_DIGITS = re.compile(r"\d+")
#: Hints whose value is an integer.
_INT_HINTS = ("kv_count", "head_size_v", "block_size", "num_kv_heads", "head_size")


@dataclass(frozen=True)
class KVLayout:
    """What the engine's KV cache looks like, in the terms the transfer engine needs."""

    kind: str
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype
    kv_count: int = 2
    head_size_v: int | None = None
    dims: str = ""
    stride_order: str = ""
    cross_layer: bool = False

    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def is_fp8(self) -> bool:
        return str(self.dtype).removeprefix("torch.") in _FP8_NAMES

    @property
    def transfer_dtype(self) -> torch.dtype:
        """The dtype bytes are moved as: one-byte types (fp8, int8) move as uint8 (same bytes,
        every op supports it)."""
        return torch.uint8 if self.element_size == 1 else self.dtype

    @property
    def is_mla(self) -> bool:
        return self.kv_count == 1 and self.num_kv_heads == 1

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV for one token, all layers, this rank."""
        return self.num_layers * self.kv_count * self.num_kv_heads * self.head_size * self.element_size

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers."""
        return self.bytes_per_token * self.block_size

    def chunk_payload_shape(self, chunk_tokens: int) -> tuple[int, int, int, int, int]:
        """Canonical payload shape of one chunk: ``[layers, kv, tokens, heads, head_size]``."""
        return (self.num_layers, self.kv_count, chunk_tokens, self.num_kv_heads, self.head_size)

    def chunk_bytes(self, chunk_tokens: int) -> int:
        """Payload bytes of one chunk of ``chunk_tokens`` tokens."""
        return self.bytes_per_token * chunk_tokens

    def layer_bytes(self, chunk_tokens: int) -> int:
        """Bytes of one layer inside a chunk payload (layers are outermost: contiguous)."""
        return self.chunk_bytes(chunk_tokens) // self.num_layers

    def namespace_fields(self) -> dict[str, Any]:
        """Fields for ``KeyNamespace``: independent of the physical layout (the payload is canonical)."""
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "layout": self.canonical_tag,
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_size": self.head_size,
        }

    @property
    def canonical_tag(self) -> str:
        """Names the canonical payload family: ``LKTHD`` with kv_count, e.g. ``LKTHD-kv2``."""
        tag = f"LKTHD-kv{self.kv_count}"
        if self.head_size_v is not None and self.head_size_v != self.head_size:
            tag += f"-v{self.head_size_v}"
        return tag

    def check_block_ids(self, block_ids: Sequence[int], what: str = "block_ids") -> None:
        """LayoutError unless every id is in ``[0, num_blocks)``."""
        if not block_ids:
            return
        lo, hi = min(block_ids), max(block_ids)
        if lo < 0 or hi >= self.num_blocks:
            bad = lo if lo < 0 else hi
            raise LayoutError(
                f"{what} contains block id {bad}, outside [0, {self.num_blocks}) for this KV cache "
                f"of {self.num_blocks} blocks; pass ids the engine allocated"
            )


# ----------------------------------------------------------------------------- detection


def _as_tensor_list(kv_caches: Any) -> tuple[list[torch.Tensor], bool]:
    """Normalise to a list of tensors; second value: the input was one tensor."""
    if isinstance(kv_caches, torch.Tensor):
        return [kv_caches], True
    if isinstance(kv_caches, Mapping):
        tensors = [t for _, t in ordered_layers(kv_caches)]
    elif isinstance(kv_caches, Sequence) and not isinstance(kv_caches, (str, bytes)):
        tensors = list(kv_caches)
    else:
        raise LayoutError(
            f"kv_caches of type {type(kv_caches).__name__} is not supported; pass a list or a "
            "name->tensor dict of per-layer tensors, or one cross-layer tensor"
        )
    if not tensors:
        raise LayoutError("kv_caches is empty; pass at least one layer's KV tensor")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise LayoutError(f"kv_caches[{i}] is a {type(t).__name__}, expected a torch.Tensor")
    return tensors, False


def ordered_layers(kv_caches: Mapping[Any, Any]) -> list[tuple[Any, Any]]:
    """A name->tensor dict's layers in layer order: by the numbers in their names.

    vLLM names layers ``model.layers.<i>.self_attn.attn`` and builds its dict in that order;
    a dict built otherwise (sorted as strings: ``layers.10`` before ``layers.2``) must still
    map the same tensor to the same layer, or a load writes one layer's KV into another's.
    When some name holds no number, the dict's own order is kept.
    """
    items = list(kv_caches.items())
    numbers = [tuple(int(x) for x in _DIGITS.findall(str(name))) for name, _ in items]
    if not all(numbers):
        return items
    order = sorted(range(len(items)), key=lambda i: numbers[i])  # stable: equal numbers keep order
    return [items[i] for i in order]


def _check_consistent(tensors: list[torch.Tensor]) -> None:
    first = tensors[0]
    for i, t in enumerate(tensors):
        if t.layout != torch.strided or t.is_nested:
            kind = "a nested" if t.is_nested else f"a {str(t.layout).removeprefix('torch.')}"
            raise LayoutError(
                f"kv_caches[{i}] is {kind} tensor; a KV cache is a dense (strided) tensor: register "
                "the engine's KV cache tensors"
            )
    if first.device.type not in ("cpu", "cuda"):
        raise LayoutError(
            f"KV tensors on device {first.device} cannot be transferred; register the engine's "
            "CUDA (or CPU) KV cache tensors"
        )
    if any(n == 0 for n in first.shape):
        raise LayoutError(
            f"KV tensor shape {tuple(first.shape)} has a dimension of size 0; register the "
            "allocated KV cache (every dimension at least 1)"
        )
    if any(st == 0 and n > 1 for st, n in zip(first.stride(), first.shape, strict=True)):
        raise LayoutError(
            f"KV tensor of shape {tuple(first.shape)} has stride 0 in some dimension "
            f"(strides {first.stride()}: an expanded view, whose blocks share memory); "
            "register the engine's real KV cache tensors"
        )
    if _overlaps_itself(first):
        raise LayoutError(
            f"KV tensor of shape {tuple(first.shape)} with strides {first.stride()} has elements that "
            "share memory (a stride smaller than the extent of the dimensions inside it: two blocks, "
            "K and V, tokens or layers overlap), so a load into one block would rewrite another; "
            "register the engine's real KV cache tensors"
        )
    seen: dict[int, int] = {}
    for i, t in enumerate(tensors):
        j = seen.setdefault(t.data_ptr(), i)
        if j != i and t.shape == tensors[j].shape and t.stride() == tensors[j].stride():
            raise LayoutError(
                f"layers {j} and {i} are the same memory (one tensor registered twice); pass each "
                "layer's own KV tensor"
            )
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise LayoutError(
                f"layer {i} has shape {tuple(t.shape)} {t.dtype} on {t.device} but layer 0 has "
                f"{tuple(first.shape)} {first.dtype} on {first.device}; every layer must match "
                "(register one group of identical attention layers)"
            )
        if t.stride() != first.stride():
            raise LayoutError(
                f"layer {i} has strides {t.stride()} but layer 0 has {first.stride()}; "
                "every layer must use the same stride order"
            )
    if first.dtype not in SUPPORTED_DTYPES:
        raise LayoutError(
            f"KV dtype {first.dtype} is not supported; expected one of "
            f"{[str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES]}"
        )
    _check_disjoint(tensors)


#: Bound on the search of :func:`_shared_offset` (strides no engine uses could need more).
_OVERLAP_SEARCH_STEPS = 100_000


def _check_disjoint(tensors: list[torch.Tensor]) -> None:
    """Layers that share memory would load one layer's KV over another's: refused.

    Every layer has the same shape and strides (checked before), so two layers are the same
    set of offsets shifted by the distance of their data pointers; they share an element when
    that distance is a difference of two offsets of one layer. Views of one buffer that
    interleave (vLLM 0.30+ per-layer views, block outermost) do not share any.
    """
    if len(tensors) < 2:
        return
    es = tensors[0].element_size()
    dims = sorted(((st * es, n) for st, n in zip(tensors[0].stride(), tensors[0].shape, strict=True) if n > 1),
                  reverse=True)
    span = sum((n - 1) * st for st, n in dims) + es  # first byte to past the last one
    order = sorted(range(len(tensors)), key=lambda i: tensors[i].data_ptr())
    ptrs = [tensors[i].data_ptr() for i in order]
    verdicts: dict[int, bool] = {}
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            d = ptrs[b] - ptrs[a]
            if d >= span:
                break  # pointers sorted: every later layer is farther
            if d not in verdicts:
                verdicts[d] = _shared_offset(d, dims, es)
            if verdicts[d]:
                i, j = sorted((order[a], order[b]))
                raise LayoutError(
                    f"layers {i} and {j} overlap in memory (their data pointers are {d} bytes "
                    f"apart, less than one layer's {span} bytes, and some of their elements are "
                    "the same memory); pass each layer's own KV tensor"
                )


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` share a byte (stride 0 is refused before this)."""
    es = t.element_size()
    dims = sorted(((st * es, n) for st, n in zip(t.stride(), t.shape, strict=True) if n > 1), reverse=True)
    extent = es  # bytes spanned by the dimensions inside the current one (strides ascending)
    nested = True
    for st, n in reversed(dims):
        nested = nested and st >= extent
        extent += (n - 1) * st
    if nested:  # every dense layout, permuted or sliced: each stride clears what is inside it
        return False
    # Else: two elements overlap iff sum(m_i * stride_i) is within one element for some m != 0,
    # |m_i| < size_i; take the first nonzero m_i positive (the negated vector is the same pair).
    tries = 0
    for i, (st, n) in enumerate(dims):
        inner = dims[i + 1:]
        reach = sum((k - 1) * s for s, k in inner) + es - 1
        for m in range(1, n):
            tries += 1
            if m * st > reach or tries > _OVERLAP_SEARCH_STEPS // 100:
                break  # past the reach: no more candidates (or give up: not proven to overlap)
            if _shared_offset(m * st, inner, es):
                return True
    return False


def _shared_offset(d: int, dims: list[tuple[int, int]], es: int) -> bool:
    """Whether ``d`` bytes equals sum(m_i * stride_i) within one element, |m_i| < size_i."""
    rest = [0] * (len(dims) + 1)
    for i in range(len(dims) - 1, -1, -1):
        rest[i] = rest[i + 1] + (dims[i][1] - 1) * dims[i][0]
    steps = 0

    def search(i: int, r: int) -> bool:
        nonlocal steps
        steps += 1
        if steps > _OVERLAP_SEARCH_STEPS:
            return False  # give up (not proven to overlap)
        if i == len(dims):
            return abs(r) < es
        st, n = dims[i]
        reach = rest[i + 1] + es - 1
        lo = max(-(n - 1), -((reach - r) // st))  # ceil((r - reach) / st)
        hi = min(n - 1, (r + reach) // st)
        return any(search(i + 1, r - m * st) for m in range(lo, hi + 1))

    return search(0, d)


def _guess_dims(shape: tuple[int, ...], single: bool, hints: Mapping[str, Any]) -> tuple[str, str]:
    """(kind, dims) from hints or the tensor rank; ambiguous shapes ask for a hint."""
    if "dims" in hints:
        dims = str(hints["dims"]).upper()
        kind = str(hints.get("kind", "custom"))
        if kind != "custom" and (kind not in KIND_DIMS or set(KIND_DIMS[kind]) != set(dims)):
            raise LayoutError(
                f"hint kind={kind!r} does not match dims={dims!r} (a {kind} layout has dims "
                f"{KIND_DIMS.get(kind, '?')!r}, in any order); drop the kind hint or fix it"
            )
        return kind, dims
    if "kind" in hints:
        kind = str(hints["kind"])
        if kind not in KIND_DIMS:
            raise LayoutError(f"hint kind={kind!r} is unknown; expected one of {sorted(KIND_DIMS)}")
        return kind, KIND_DIMS[kind]
    rank = len(shape)
    if single:
        if rank == 6:
            return "cross_layer", KIND_DIMS["cross_layer"]
        if rank == 4:
            return "cross_layer_mla", KIND_DIMS["cross_layer_mla"]
        raise LayoutError(
            f"a single KV tensor of shape {shape} is not a known cross-layer layout; expected "
            "(blocks, layers, 2, block_size, heads, head) or (blocks, layers, block_size, head), "
            "or pass hints={'dims': ...}"
        )
    if rank == 5:
        if shape[0] == 2 and shape[1] != 2:
            return "flash_attn", KIND_DIMS["flash_attn"]
        if shape[1] == 2 and shape[0] != 2:
            return "flashinfer", KIND_DIMS["flashinfer"]
        if 2 not in shape[:2]:
            raise LayoutError(
                f"per-layer KV shape {shape} has no key/value dimension of size 2 first or second: "
                "it is neither FlashAttention (2, blocks, block_size, heads, head) nor FlashInfer "
                "(blocks, 2, block_size, heads, head); pass hints={'dims': ...} naming each dimension"
            )
        raise LayoutError(
            f"per-layer KV shape {shape} is ambiguous between FlashAttention (2, blocks, ...) and "
            "FlashInfer (blocks, 2, ...); pass hints={'kind': 'flash_attn'} or {'kind': 'flashinfer'}"
        )
    if rank == 3:
        return "mla", KIND_DIMS["mla"]
    if rank == 4:
        return "unified", KIND_DIMS["unified"]
    raise LayoutError(
        f"per-layer KV shape {shape} (rank {rank}) is not a supported layout; expected "
        "(2, blocks, block_size, heads, head), (blocks, 2, block_size, heads, head), "
        "(blocks, block_size, head) or vLLM 0.30+ [blocks, heads, block_size, head_k + head_v]"
    )


def _validate_dims(dims: str, shape: tuple[int, ...]) -> None:
    letters = set(dims)
    ok = len(dims) == len(shape) and len(letters) == len(dims) and letters <= set("BLKNHDC")
    ok = ok and {"B", "N"} <= letters and (("D" in letters) != ("C" in letters))
    ok = ok and not ("C" in letters and "K" in letters)
    if not ok:
        raise LayoutError(
            f"dims {dims!r} does not describe a tensor of shape {shape}: use one letter per "
            "dimension from B (blocks), L (layers), K (key/value), N (tokens), H (heads), "
            "D (head size) or C (key+value concatenated), with B, N and one of D/C"
        )


def _physical_order(t: torch.Tensor, dims: str) -> str:
    """Dims from outermost to innermost in memory (e.g. ``KBNHD`` vs ``KBHND`` for HND).

    A dimension of size 1 has no place in memory (its stride is arbitrary: one KV head viewed
    NHD or HND is the same memory): it goes at its logical place, before the first dimension
    sorted so far that follows it logically. Two views of one memory get one order."""
    real = sorted((i for i in range(t.dim()) if t.shape[i] > 1), key=lambda i: (-t.stride(i), i))
    for i in (i for i in range(t.dim()) if t.shape[i] == 1):
        at = next((k for k, j in enumerate(real) if j > i), len(real))
        real.insert(at, i)
    return "".join(dims[i] for i in real)


def detect_layout(kv_caches: Any, hints: Mapping[str, Any] | None = None) -> KVLayout:
    """Describe ``kv_caches`` (list / name->tensor dict / one cross-layer tensor) as a KVLayout."""
    hints = _check_hints(hints)
    tensors, single = _as_tensor_list(kv_caches)
    _check_consistent(tensors)
    shape = tuple(tensors[0].shape)
    kind, dims = _guess_dims(shape, single, hints)
    _validate_dims(dims, shape)
    if single != ("L" in dims):
        raise LayoutError(
            f"dims {dims!r} {'needs' if single else 'cannot have'} a layers dimension L for "
            f"{'one tensor' if single else 'a list of per-layer tensors'} of shape {shape}"
        )
    size = dict(zip(dims, shape, strict=True))
    num_layers = size.get("L", len(tensors))
    kv_count, head_size, head_size_v = _split_heads(size, hints, shape)
    layout = KVLayout(
        kind=kind,
        num_layers=num_layers,
        num_blocks=size["B"],
        block_size=size["N"],
        num_kv_heads=size.get("H", 1),
        head_size=head_size,
        head_size_v=head_size_v,
        dtype=_element_dtype(tensors[0].dtype, hints),
        kv_count=kv_count,
        dims=dims,
        stride_order=_physical_order(tensors[0], dims),
        cross_layer=single,
    )
    _check_hinted_sizes(layout, hints)
    return layout


def _check_hints(hints: Any) -> dict[str, Any]:
    """``hints`` as a dict, every key known and every size a positive integer."""
    if hints is None:
        return {}
    if not isinstance(hints, Mapping):
        raise LayoutError(
            f"hints must be a dict such as {{'kind': 'flash_attn'}}, got {type(hints).__name__} {hints!r}"
        )
    out = dict(hints)
    unknown = set(out) - _HINT_KEYS
    if unknown:
        raise LayoutError(f"unknown layout hints {sorted(unknown)}; known hints: {sorted(_HINT_KEYS)}")
    for name in _INT_HINTS:
        if name not in out:
            continue
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise LayoutError(f"hint {name}={value!r} must be a positive integer (e.g. {name}=16)")
        out[name] = int(value)
    return out


def _element_dtype(storage: torch.dtype, hints: Mapping[str, Any]) -> torch.dtype:
    """What the KV elements are: the tensors' dtype, or the ``dtype`` hint for one-byte storage."""
    if "dtype" not in hints:
        return storage
    value = hints["dtype"]
    name = str(value).removeprefix("torch.")
    dtype = getattr(torch, name, None) if isinstance(value, (str, torch.dtype)) else None
    supported = [str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES]
    if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
        raise LayoutError(f"hint dtype={value!r} is not a supported KV dtype; expected one of {supported}")
    if dtype == storage:
        return dtype
    if storage not in STORAGE_DTYPES or dtype.itemsize != storage.itemsize:
        raise LayoutError(
            f"hint dtype={name!r} does not fit KV tensors of dtype {str(storage).removeprefix('torch.')}: "
            "the hint names what one-byte storage (uint8 or int8 tensors, as vLLM allocates fp8 and "
            "int8 caches) holds, e.g. {'dtype': 'float8_e4m3fn'}; drop it for other tensors"
        )
    return dtype


def _split_heads(size: dict[str, int], hints: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[int, int, int | None]:
    """(kv_count, head_size, head_size_v) from the K/D/C dimensions and hints."""
    if "C" not in size:
        kv_count = size.get("K", 1)
        if kv_count not in (1, 2):
            raise LayoutError(f"the key/value dimension of shape {shape} has size {kv_count}; expected 2")
        if "head_size_v" in hints and int(hints["head_size_v"]) != size["D"]:
            raise LayoutError(
                f"hint head_size_v={hints['head_size_v']} disagrees with the tensors of shape {shape}: "
                + ("their keys and values are separate vectors of one width "
                   f"{size['D']}" if kv_count == 2 else f"they hold one latent vector of width {size['D']} (MLA)")
                + "; drop the hint or fix it"
            )
        return kv_count, size["D"], None
    c = size["C"]
    kv_count = int(hints.get("kv_count", 2))
    if kv_count == 1:
        if "head_size_v" in hints and int(hints["head_size_v"]) != c:
            raise LayoutError(
                f"hints kv_count=1 (one latent vector per token, MLA) and head_size_v="
                f"{hints['head_size_v']} contradict each other: an MLA cache has no value half; "
                "drop head_size_v, or drop kv_count=1 for keys and values concatenated"
            )
        return 1, c, None
    if c % 2 and "head_size_v" not in hints:
        raise LayoutError(
            f"the last dimension {c} of shape {shape} (key and value concatenated) is odd: it "
            "cannot hold two halves of one width. Pass hints={'head_size_v': <value width>} for "
            "keys and values of different widths, or hints={'kv_count': 1} for MLA"
        )
    hv = int(hints.get("head_size_v", c // 2))
    hk = c - hv
    if kv_count != 2 or hv <= 0 or hk <= 0:
        raise LayoutError(
            f"cannot split the last dimension {c} of shape {shape} into key and value "
            f"(kv_count={kv_count}, head_size_v={hv}); pass hints={{'kv_count': 1}} for MLA"
        )
    if hk != hv:
        # K and V differ in width: they travel together as one vector per head.
        return 1, c, hv
    return 2, hk, None


def _check_hinted_sizes(layout: KVLayout, hints: Mapping[str, Any]) -> None:
    # kv_count chooses how a key+value dimension C splits; where the tensors have a K dimension
    # (or none: MLA) their shape says it, and a hint that disagrees is a mistake, not a choice
    names = ("block_size", "num_kv_heads", "head_size") + (() if "C" in layout.dims else ("kv_count",))
    for name in names:
        if (name == "head_size" and layout.head_size_v is not None and name in hints
                and int(hints[name]) == layout.head_size - layout.head_size_v):
            continue  # keys and values of different widths travel as one vector: the hint names the key's
        if name in hints and int(hints[name]) != getattr(layout, name):
            raise LayoutError(
                f"hint {name}={hints[name]} disagrees with the tensors ({name}="
                f"{getattr(layout, name)} for a {layout.kind} layout with dims {layout.dims}); "
                "fix the hint or the tensors"
            )


# ----------------------------------------------------------------------------- views


def _logical_view(t: torch.Tensor, dims: str, layout: KVLayout) -> torch.Tensor:
    """View ``t`` as ``[(L,) B, K, N, H, D]`` in the transfer dtype, sharing storage."""
    t = t.view(layout.transfer_dtype) if t.dtype != layout.transfer_dtype else t
    if "C" in dims:
        return _split_c_view(t, dims, layout)
    for letter in "KH":
        if letter not in dims:
            t = t.unsqueeze(-1)
            dims += letter
    target = ("L" if "L" in dims else "") + "BKNHD"
    return t.permute(*[dims.index(c) for c in target])


def _split_c_view(t: torch.Tensor, dims: str, layout: KVLayout) -> torch.Tensor:
    """``[.., C]`` -> ``[.., K, .., D]``: K and V are adjacent runs of the C dimension."""
    target = ("L" if "L" in dims else "") + "BNH"
    if "H" not in dims:
        t = t.unsqueeze(-1)
        dims += "H"
    perm = [dims.index(c) for c in target]
    c_axis = dims.index("C")
    sizes = [t.shape[i] for i in perm]
    strides = [t.stride(i) for i in perm]
    c_stride = t.stride(c_axis)
    d = layout.head_size
    # insert K after B: [(L,) B, K, N, H, D]
    k_pos = len(sizes) - 2
    sizes.insert(k_pos, layout.kv_count)
    strides.insert(k_pos, d * c_stride)
    sizes.append(d)
    strides.append(c_stride)
    return t.as_strided(sizes, strides, t.storage_offset())


def layer_views(kv_caches: Any, layout: KVLayout) -> list[torch.Tensor]:
    """One ``[B, K, N, H, D]`` view per layer (transfer dtype), sharing the engine's storage."""
    tensors, single = _as_tensor_list(kv_caches)
    if single:
        whole = _logical_view(tensors[0], layout.dims, layout)
        return list(whole.unbind(0))
    if len(tensors) != layout.num_layers:
        raise LayoutError(f"got {len(tensors)} layer tensors for a layout of {layout.num_layers} layers")
    return [_logical_view(t, layout.dims, layout) for t in tensors]
