"""KV layout detection: every supported layout, dtypes, hints and clear errors."""

from __future__ import annotations

import pytest
import torch

from kvortex_core.data import kv_samples as ks
from kvortex_core.data.layouts import KVLayout, detect_layout, layer_views
from kvortex_core.errors import LayoutError

L, B, N, H, D = 3, 10, 4, 2, 8
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("name", sorted(ks.all_layouts(L, B, N, H, D, torch.float16)))
def test_every_layout_detected_and_views_match_blocks(name: str) -> None:
    caches, hints, block = ks.all_layouts(L, B, N, H, D, torch.float16)[name]
    layout = detect_layout(caches, hints)
    mla = "mla" in name
    assert (layout.num_layers, layout.num_blocks, layout.block_size) == (L, B, N)
    assert (layout.kv_count, layout.num_kv_heads, layout.head_size) == ((1, 1, 2 * D) if mla else (2, H, D))
    views = layer_views(caches, layout)
    for layer in range(L):
        for b in (0, 3, B - 1):
            assert torch.equal(views[layer][b], block(caches, layer, b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(dtype: torch.dtype) -> None:
    caches, _, block = ks.flash_attn(L, B, N, H, D, dtype)
    layout = detect_layout(caches)
    assert layout.dtype == dtype
    views = layer_views(caches, layout)
    if layout.is_fp8:
        assert views[0].dtype == torch.uint8  # fp8 moves as raw bytes
        assert torch.equal(views[1][2], block(caches, 1, 2).view(torch.uint8))
    else:
        assert torch.equal(views[1][2], block(caches, 1, 2))
    assert layout.chunk_bytes(16) == L * 2 * 16 * H * D * layout.element_size


def test_stride_order_distinguishes_nhd_and_hnd() -> None:
    nhd = detect_layout(ks.flash_attn(L, B, N, H, D, torch.float16)[0])
    hnd = detect_layout(ks.flash_attn(L, B, N, H, D, torch.float16, hnd=True)[0])
    assert nhd.stride_order == "KBNHD" and hnd.stride_order == "KBHND"
    assert nhd.kind == hnd.kind == "flash_attn"
    # The payload is canonical, so both produce the same key namespace.
    assert nhd.namespace_fields() == hnd.namespace_fields()


def test_namespace_fields_are_layout_independent_but_shape_dependent() -> None:
    fa = detect_layout(ks.flash_attn(L, B, N, H, D, torch.bfloat16)[0])
    uni = detect_layout(ks.unified(L, B, N, H, D, torch.bfloat16, order="BLNHC")[0])
    fi = detect_layout(ks.flashinfer(L, B, N, H, D, torch.bfloat16)[0])
    assert fa.namespace_fields() == uni.namespace_fields() == fi.namespace_fields()
    assert fa.namespace_fields()["dtype"] == "bfloat16"
    mla = detect_layout(ks.mla(L, B, N, 2 * D, torch.bfloat16)[0])
    assert mla.namespace_fields() != fa.namespace_fields()


def test_payload_shape_and_bytes() -> None:
    layout = detect_layout(ks.flash_attn(32, 4, 16, 8, 128, torch.bfloat16)[0])
    assert layout.chunk_payload_shape(256) == (32, 2, 256, 8, 128)
    assert layout.chunk_bytes(256) == 32 * 1024**2  # Llama-3.1-8B: 128 KiB per token
    assert layout.bytes_per_token == 128 * 1024


def test_unified_unequal_k_and_v_travel_as_one_vector() -> None:
    caches = [torch.randn(B, H, N, 24) for _ in range(L)]
    layout = detect_layout(caches, {"head_size_v": 8})
    assert (layout.kv_count, layout.head_size, layout.head_size_v) == (1, 24, 8)
    assert layout.canonical_tag == "LKTHD-kv1-v8"


def test_ambiguous_5d_shape_needs_a_hint() -> None:
    caches = [torch.zeros(2, 2, N, H, D) for _ in range(L)]
    with pytest.raises(LayoutError, match="ambiguous.*hints"):
        detect_layout(caches)
    assert detect_layout(caches, {"kind": "flashinfer"}).kind == "flashinfer"


def test_dims_hint_for_custom_cross_layer_order() -> None:
    # vLLM HND cross-layer FlashAttention: physical (B, H, L, 2, N, D)
    t = torch.randn(B, H, L, 2, N, D)
    layout = detect_layout(t, {"dims": "BHLKND"})
    assert (layout.num_layers, layout.num_kv_heads, layout.cross_layer) == (L, H, True)
    assert torch.equal(layer_views(t, layout)[1][4, 0], t[4, :, 1, 0].transpose(0, 1))


@pytest.mark.parametrize(
    ("caches", "hints", "match"),
    [
        ([torch.zeros(2, B, N, H, D), torch.zeros(2, B + 1, N, H, D)], None, "layer 1 has shape"),
        ([torch.zeros(2, B, N, H, D), torch.zeros(2, B, N, H, D, dtype=torch.float16)], None, "layer 1"),
        ([torch.zeros(2, B, N, H, D, dtype=torch.int32)], None, "dtype torch.int32 is not supported"),
        ([torch.zeros(B, N)], None, "rank 2"),
        (torch.zeros(B, N, H, D, 2), None, "not a known cross-layer"),
        ([], None, "empty"),
        ("tensor", None, "not supported"),
        ([torch.zeros(3, B, N, H, D)], {"kind": "flash_attn"}, "expected 2"),
        ([torch.zeros(2, B, N, H, D)], {"block_size": 32}, "block_size=32 disagrees"),
        ([torch.zeros(2, B, N, H, D)], {"colour": 1}, "unknown layout hints"),
        ([torch.zeros(2, B, N, H, D)], {"kind": "paged"}, "unknown"),
        ([torch.zeros(2, B, N, H, D)], {"dims": "KBNHQ"}, "does not describe"),
        ([torch.zeros(B, L, N, D)], {"dims": "BLND"}, "cannot have a layers dimension"),
        ([torch.zeros(2, B, N, 0, D)], None, "dimension of size 0"),
        ([torch.zeros(2, B, N, H, 0)], None, "dimension of size 0"),
        ([torch.zeros(2, B, N, H, D, device="meta")], None, "device meta"),
        ([torch.zeros(2, 1, N, H, D).expand(2, B, N, H, D)], None, "stride 0"),
        ([torch.zeros(B, H, N, 2 * D + 1)], None, "is odd.*head_size_v"),
        ([torch.zeros(2, B, N, H, D)], {"block_size": "sixteen"}, "block_size='sixteen' must be a positive"),
        ([torch.zeros(2, B, N, H, D)], {"head_size": True}, "must be a positive integer"),
        ([torch.zeros(2, B, N, H, D)], ["kind"], "hints must be a dict"),
        ([torch.zeros(2, B, N, H, D)], {"layer_names": ["a"]}, "unknown layout hints"),
        ([torch.zeros(3, B, N, H, D)], None, "neither FlashAttention.*nor FlashInfer"),
        ([torch.zeros(1, B, N, H, D)], None, "neither FlashAttention.*nor FlashInfer"),
    ],
)
def test_bad_layouts_raise_clear_errors(caches: object, hints: dict | None, match: str) -> None:
    with pytest.raises(LayoutError, match=match):
        detect_layout(caches, hints)


_PAGE = N * H * D


@pytest.mark.parametrize(("shape", "stride"), [
    ((2, B, N, H, D), (B * _PAGE, _PAGE // 2, H * D, D, 1)),  # blocks half a block apart
    ((2, B, N, H, D), (1, _PAGE, H * D, D, 1)),  # K and V one element apart
    ((2, B, N, H, D), (B * _PAGE, _PAGE, 1, D, 1)),  # tokens one element apart
    ((B, 3, 2, N, H, D), (3 * 2 * _PAGE, _PAGE, _PAGE, H * D, D, 1)),  # cross-layer: layers overlap K/V
], ids=["blocks", "k-and-v", "tokens", "cross-layer-layers"])
def test_a_tensor_whose_own_elements_overlap_is_refused(shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
    """Only stride 0 and overlap between layers were refused: a block stride of half a block
    registered, and a load into block 5 rewrote half of block 6 (a red-team finding)."""
    buf = torch.zeros(4 * 3 * B * _PAGE)
    with pytest.raises(LayoutError, match="share memory"):
        detect_layout([buf.as_strided(shape, stride)] if len(shape) == 5 else buf.as_strided(shape, stride))


def test_strides_that_interleave_without_overlap_are_accepted() -> None:
    """Not nested (the K/V stride is less than a block's extent) yet no two elements meet: the
    exact search, not the nested-strides shortcut, decides."""
    buf = torch.zeros(8 * _PAGE)
    # 3 blocks 2 pages apart, V 3 pages after K: pages K 0, 2, 4 and V 3, 5, 7, all distinct
    t = buf.as_strided((2, 3, N, H, D), (3 * _PAGE, 2 * _PAGE, H * D, D, 1))
    assert detect_layout([t]).num_blocks == 3
    from kvortex_core.data.layouts import _overlaps_itself
    # V 4 pages after K: V of block 0 is K of block 2
    assert _overlaps_itself(torch.zeros(9 * _PAGE).as_strided((2, 3, N, H, D), (4 * _PAGE, 2 * _PAGE, H * D, D, 1)))


def test_one_tensor_registered_for_two_layers_is_refused() -> None:
    t = torch.zeros(2, B, N, H, D)
    with pytest.raises(LayoutError, match="layers 0 and 2 are the same memory"):
        detect_layout([t, torch.zeros(2, B, N, H, D), t])


@pytest.mark.parametrize("shift", [1, B * N * H * D - 1, B * N * H * D + N * H * D])
def test_layers_that_overlap_in_memory_are_refused(shift: int) -> None:
    """Same shape and strides, pointers closer than a layer: one layer's load would land in the
    other's blocks. Shifted by one element, by one K half minus one, by a K half and a block."""
    shape, stride = (2, B, N, H, D), (B * N * H * D, N * H * D, H * D, D, 1)
    base = torch.zeros(2 * B * N * H * D + 2 * shift)
    layers = [torch.zeros(shape), base.as_strided(shape, stride, 0), base.as_strided(shape, stride, shift)]
    with pytest.raises(LayoutError, match=r"layers 1 and 2 overlap in memory .*pass each layer's own"):
        detect_layout(layers)


@pytest.mark.parametrize("dims", ["BLKNHD", "KBLNHD", "LBKNHD"])
def test_interleaved_views_of_one_buffer_share_no_memory_and_are_accepted(dims: str) -> None:
    """Per-layer views of one buffer whose address ranges interleave are not an overlap."""
    from kvortex_core.data.layouts import layer_views

    sizes = {"B": B, "L": L, "K": 2, "N": N, "H": H, "D": D}
    buf = torch.arange(torch.Size(sizes[c] for c in dims).numel(), dtype=torch.float32)
    buf = buf.reshape([sizes[c] for c in dims])
    layers = [t.permute(*[dims.replace("L", "").index(c) for c in "KBNHD"]) for t in
              (buf.select(dims.index("L"), i) for i in range(L))]
    layout = detect_layout(layers)
    assert layout.num_layers == L and layout.num_blocks == B
    views = layer_views(layers, layout)
    seen = torch.cat([v.reshape(-1) for v in views])
    assert seen.unique().numel() == buf.numel()  # every element belongs to exactly one layer


def test_unified_odd_width_with_the_value_width_hint_is_accepted() -> None:
    layout = detect_layout([torch.zeros(B, H, N, 2 * D + 1)], {"head_size_v": D})
    assert (layout.kv_count, layout.head_size, layout.head_size_v) == (1, 2 * D + 1, D)


def test_a_dict_of_layers_is_taken_in_layer_order_whatever_its_insertion_order() -> None:
    """Names sorted as strings put layers.10 before layers.2: the numbers decide the order."""
    names = [f"model.layers.{i}.self_attn.attn" for i in range(12)]
    tensors = {name: torch.full((2, B, N, H, D), float(i)) for i, name in enumerate(names)}
    for order in (sorted(names), names[::-1], names):
        caches = {name: tensors[name] for name in order}
        views = layer_views(caches, detect_layout(caches))
        assert [int(v[0, 0, 0, 0, 0]) for v in views] == list(range(12))
    odd = {"k": tensors[names[1]], "q": tensors[names[0]]}  # no numbers: the dict's own order
    assert [int(v[0, 0, 0, 0, 0]) for v in layer_views(odd, detect_layout(odd))] == [1, 0]


def test_inconsistent_strides_rejected() -> None:
    a = torch.zeros(2, B, N, H, D)
    b = torch.zeros(2, B, H, N, D).transpose(2, 3)
    with pytest.raises(LayoutError, match="strides"):
        detect_layout([a, b])


def test_check_block_ids() -> None:
    layout = KVLayout("flash_attn", L, B, N, H, D, torch.float16)
    layout.check_block_ids([0, B - 1])
    with pytest.raises(LayoutError, match=f"block id {B}, outside"):
        layout.check_block_ids([1, B])
    with pytest.raises(LayoutError, match="block id -1"):
        layout.check_block_ids([-1])


def test_a_kind_hint_that_contradicts_the_dims_hint_is_refused() -> None:
    caches = [torch.zeros(2, B, N, H, D)]
    with pytest.raises(LayoutError, match="kind='mla' does not match dims='KBNHD'"):
        detect_layout(caches, {"dims": "KBNHD", "kind": "mla"})
    assert detect_layout(caches, {"dims": "KBNHD", "kind": "flash_attn"}).kind == "flash_attn"
    assert detect_layout(caches, {"dims": "KBNHD"}).kind == "custom"


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
@pytest.mark.parametrize("name", ["flash_attn_nhd", "unified_LBNHC", "mla"])
def test_fp8_kept_in_uint8_tensors_with_a_dtype_hint_is_the_same_cache(name: str, fp8: torch.dtype) -> None:
    """vLLM allocates ``--kv-cache-dtype fp8`` caches as uint8 tensors. With ``{"dtype": ...}``
    they are that fp8 cache: same layout, namespace and payload bytes as fp8 tensors, so the two
    share stored chunks; without it they are opaque bytes of their own namespace."""
    from kvortex_core.data.transfer import TransferEngine

    caches, hints, _ = ks.all_layouts(L, B, N, H, D, fp8, seed=4)[name]
    as_bytes = [t.view(torch.uint8) for t in caches] if isinstance(caches, list) else caches.view(torch.uint8)
    real = detect_layout(caches, hints)
    hinted = detect_layout(as_bytes, {**(hints or {}), "dtype": str(fp8).removeprefix("torch.")})
    plain = detect_layout(as_bytes, hints)
    assert hinted == real and hinted.dtype == fp8
    assert plain.dtype == torch.uint8 and plain.namespace_fields() != real.namespace_fields()
    ids = [[1, 7, 3, 9]]
    out = [[torch.zeros(real.chunk_bytes(4 * N), dtype=torch.uint8)] for _ in range(3)]
    for cache, layout, buf in zip((caches, as_bytes, as_bytes), (real, hinted, plain), out, strict=True):
        TransferEngine(cache, layout, chunk_tokens=4 * N).save(ids, buf).wait()
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][0], out[2][0])


def test_int8_caches_and_the_dtype_hint_checks() -> None:
    caches, _, block = ks.flash_attn(L, B, N, H, D, torch.float16)
    i8 = [t.view(torch.int8) for t in caches]  # twice as many one-byte elements per head
    layout = detect_layout(i8)
    assert layout.dtype == torch.int8 and layout.head_size == 2 * D and layout.transfer_dtype == torch.uint8
    assert torch.equal(layer_views(i8, layout)[1][2], block(caches, 1, 2).contiguous().view(torch.uint8))
    assert detect_layout(i8, {"dtype": torch.float8_e5m2}).dtype == torch.float8_e5m2
    assert detect_layout(caches, {"dtype": "float16"}).dtype == torch.float16  # the tensors' own: fine
    for hints, match in (({"dtype": "bfloat16"}, "does not fit KV tensors of dtype int8"),
                         ({"dtype": "fp9"}, "not a supported KV dtype"),
                         ({"dtype": torch.int32}, "not a supported KV dtype")):
        with pytest.raises(LayoutError, match=match):
            detect_layout(i8, hints)
    with pytest.raises(LayoutError, match="does not fit KV tensors of dtype float16"):
        detect_layout(caches, {"dtype": "float8_e4m3fn"})


def test_a_kv_count_hint_that_disagrees_with_the_shape_is_refused() -> None:
    """A (2, B, N, H, D) cache has keys and values: hints={'kv_count': 1} (meant for MLA) was
    silently ignored; it is refused now. Where it chooses (a K+V dimension C), it still decides."""
    with pytest.raises(LayoutError, match=r"hint kv_count=1 disagrees with the tensors \(kv_count=2"):
        detect_layout([torch.zeros(2, 8, 16, 2, 8)], {"kv_count": 1})
    assert detect_layout([torch.zeros(2, 8, 16, 2, 8)], {"kv_count": 2}).kv_count == 2
    assert detect_layout([torch.zeros(8, 16, 576)], {"kv_count": 1}).kind == "mla"


def test_value_width_hints_are_checked_against_the_tensors() -> None:
    """head_size_v: with K and V of different widths concatenated, a head_size hint naming the
    key's width (or the whole vector) is consistent; with kv_count=1 (MLA) or on layouts whose
    K and V are separate vectors, a head_size_v that the tensors contradict is refused (it was
    dropped silently: a cache then got another namespace than its twin with the hint)."""
    unified = [torch.zeros(B, H, N, 16) for _ in range(L)]
    for head_size in (12, 16):
        layout = detect_layout(unified, {"head_size_v": 4, "head_size": head_size})
        assert (layout.kv_count, layout.head_size, layout.head_size_v) == (1, 16, 4)
    with pytest.raises(LayoutError, match="hint head_size=10 disagrees"):
        detect_layout(unified, {"head_size_v": 4, "head_size": 10})
    with pytest.raises(LayoutError, match="kv_count=1 .*head_size_v=4 contradict"):
        detect_layout(unified, {"kv_count": 1, "head_size_v": 4})
    assert detect_layout(unified, {"kv_count": 1, "head_size_v": 16}).kv_count == 1
    flash = [torch.zeros(2, B, N, H, D)]
    with pytest.raises(LayoutError, match=f"head_size_v=4 disagrees.*separate vectors of one width {D}"):
        detect_layout(flash, {"head_size_v": 4})
    assert detect_layout(flash, {"head_size_v": D}).head_size == D
    with pytest.raises(LayoutError, match="head_size_v=4 disagrees.*one latent vector of width 576"):
        detect_layout([torch.zeros(B, N, 576)], {"head_size_v": 4})


def test_sparse_and_nested_tensors_are_refused_as_kv_caches() -> None:
    dense = torch.zeros(2, B, N, H, D)
    with pytest.raises(LayoutError, match=r"kv_caches\[1\] is a sparse_coo tensor; a KV cache is a dense"):
        detect_layout([dense, dense.clone().to_sparse()])
    nested = torch.nested.nested_tensor([torch.zeros(N, D), torch.zeros(N + 1, D)])
    with pytest.raises(LayoutError, match=r"kv_caches\[0\] is a nested tensor"):
        detect_layout([nested])
