"""The transfer engine on CPU tensors: byte-exact save/load for every layout, batching, layer-wise,
skips, cross-layout payloads and input checks. (tests/gpu/ runs the CUDA paths.)"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvortex_core.data import kv_samples as ks
from kvortex_core.data.layouts import detect_layout
from kvortex_core.data.transfer import TransferEngine
from kvortex_core.errors import LayoutError

L, B, N, H, D = 3, 24, 4, 2, 8
CHUNK = 16  # 4 blocks per chunk


def _buffers(layout, n: int, tokens: int = CHUNK) -> list[torch.Tensor]:
    return [torch.full((layout.chunk_bytes(tokens),), 0xAB, dtype=torch.uint8) for _ in range(n)]


def _reference_payload(caches, block, ids: list[int], layout) -> torch.Tensor:
    """The canonical payload built straight from the physical tensors."""
    per_layer = [torch.cat([block(caches, layer, b) for b in ids], dim=1) for layer in range(layout.num_layers)]
    payload = torch.stack(per_layer)  # [L, K, T, H, D]
    return payload.view(torch.uint8) if layout.is_fp8 else payload


def _zeroed(name: str, dtype: torch.dtype = torch.float16):
    caches, hints, block = ks.all_layouts(L, B, N, H, D, dtype, seed=99)[name]
    for t in (caches.values() if isinstance(caches, dict) else caches if isinstance(caches, list) else [caches]):
        t.view(torch.uint8).zero_() if t.element_size() == 1 else t.zero_()
    return caches, hints, block


@pytest.mark.parametrize("name", sorted(ks.all_layouts(L, B, N, H, D, torch.float16)))
@pytest.mark.parametrize("staging", [1 << 20, 600], ids=["one-batch", "many-batches"])
def test_save_then_load_roundtrip_every_layout(name: str, staging: int) -> None:
    caches, hints, block = ks.all_layouts(L, B, N, H, D, torch.float16)[name]
    layout = detect_layout(caches, hints)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=staging)
    chunks = [[5, 1, 19, 7], [0, 23, 2]]  # second chunk is partial (3 blocks)
    dst = [torch.zeros(layout.chunk_bytes(CHUNK), dtype=torch.uint8) for _ in chunks]
    handle = te.save(chunks, dst)
    handle.wait(timeout=5)
    assert handle.done()
    for ids, buf in zip(chunks, dst, strict=True):
        ref = _reference_payload(caches, block, ids, layout).reshape(-1).view(torch.uint8)
        assert torch.equal(buf[:ref.numel()], ref)
    # load into other blocks of a zeroed cache of the same layout
    target, _, tblock = _zeroed(name)
    te2 = TransferEngine(target, detect_layout(target, hints), chunk_tokens=CHUNK, staging_bytes=staging)
    new_ids = [[3, 4, 8, 9], [10, 11, 12]]
    te2.load(dst, new_ids).wait()
    for old, new in zip(chunks, new_ids, strict=True):
        for o, n in zip(old, new, strict=True):
            for layer in range(L):
                assert torch.equal(tblock(target, layer, n), block(caches, layer, o))
    untouched = [b for b in range(B) if b not in {x for ids in new_ids for x in ids}]
    assert all(not tblock(target, 0, b).to(torch.float32).any() for b in untouched)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_dtypes_roundtrip(dtype: torch.dtype) -> None:
    caches, _, block = ks.flash_attn(L, B, N, H, D, dtype)
    layout = detect_layout(caches)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=1000)
    dst = _buffers(layout, 1)
    te.save([[2, 9, 4, 1]], dst).wait()
    ref = _reference_payload(caches, block, [2, 9, 4, 1], layout).reshape(-1).view(torch.uint8)
    assert torch.equal(dst[0], ref)


@pytest.mark.parametrize("src_name", ["flash_attn_nhd", "cross_layer", "unified_BLNHC"])
@pytest.mark.parametrize("dst_name", ["flash_attn_hnd", "flashinfer_nhd", "unified_LBHNC", "unified_BHLNC"])
def test_payload_saved_from_one_layout_loads_into_another(src_name: str, dst_name: str) -> None:
    caches, _, block = ks.all_layouts(L, B, N, H, D, torch.bfloat16)[src_name]
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK)
    dst = _buffers(te.layout, 2)
    te.save([[1, 2, 3, 4], [20, 21, 22, 23]], dst).wait()
    target, _, tblock = _zeroed(dst_name, torch.bfloat16)
    te2 = TransferEngine(target, detect_layout(target), chunk_tokens=CHUNK)
    assert te2.layout.namespace_fields() == te.layout.namespace_fields()
    te2.load(dst, [[7, 6, 5, 4], [0, 1, 2, 3]]).wait()
    for o, n in zip([1, 2, 3, 4, 20, 21, 22, 23], [7, 6, 5, 4, 0, 1, 2, 3], strict=True):
        for layer in range(L):
            assert torch.equal(tblock(target, layer, n), block(caches, layer, o))


def test_layerwise_load_and_skip_blocks() -> None:
    caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.float16)
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, staging_bytes=700)
    dst = _buffers(te.layout, 2)
    te.save([[1, 2, 3, 4], [5, 6, 7, 8]], dst).wait()
    target, _, _ = _zeroed("flash_attn_nhd")
    te2 = TransferEngine(target, detect_layout(target), chunk_tokens=CHUNK, staging_bytes=700)
    handle = te2.load(dst, [[10, 11, 12, 13], [14, 15, 16, 17]], layerwise=True, skip_blocks=5)
    for layer in range(L):
        handle.wait_layer(layer)  # no-op on CPU, must not raise
    handle.wait()
    # the first 5 blocks (10..14) stay zero, 15..17 hold source blocks 6..8
    for b in range(10, 15):
        assert not target[0][:, b].to(torch.float32).any()
    for o, n in zip([6, 7, 8], [15, 16, 17], strict=True):
        assert all(torch.equal(target[layer][:, n], caches[layer][:, o]) for layer in range(L))


def test_save_layer_fills_only_that_layers_bytes() -> None:
    caches, _, block = ks.flashinfer(L, B, N, H, D, torch.float16)
    layout = detect_layout(caches)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK)
    dst = _buffers(layout, 1)
    te.save_layer(1, [[3, 2, 1, 0]], dst).wait()
    lb = layout.layer_bytes(CHUNK)
    ref = _reference_payload(caches, block, [3, 2, 1, 0], layout).reshape(-1).view(torch.uint8)
    assert torch.equal(dst[0][lb:2 * lb], ref[lb:2 * lb])
    assert bool((dst[0][:lb] == 0xAB).all()) and bool((dst[0][2 * lb:] == 0xAB).all())
    for layer in (0, 2):
        te.save_layer(layer, [[3, 2, 1, 0]], dst).wait()
    assert torch.equal(dst[0], ref)


@settings(max_examples=25, deadline=None)
@given(
    perm=st.permutations(list(range(B))),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    staging=st.integers(200, 5000),
    layerwise=st.booleans(),
)
def test_roundtrip_property(perm: list[int], sizes: list[int], staging: int, layerwise: bool) -> None:
    caches, _, _ = ks.cross_layer(L, B, N, H, D, torch.float32, seed=3)
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, staging_bytes=staging)
    it = iter(perm)
    chunks = [[next(it) for _ in range(s)] for s in sizes]
    dst = _buffers(te.layout, len(chunks))
    te.save(chunks, dst).wait()
    target = torch.zeros_like(caches)
    te2 = TransferEngine(target, detect_layout(target), chunk_tokens=CHUNK, staging_bytes=staging)
    dest = list(range(B))
    random.Random(len(perm)).shuffle(dest)
    it2 = iter(dest)
    new = [[next(it2) for _ in range(s)] for s in sizes]
    te2.load(dst, new, layerwise=layerwise).wait()
    for ids, nids in zip(chunks, new, strict=True):
        assert torch.equal(target[nids], caches[ids])


def test_staging_grows_to_hold_one_layer_of_a_chunk() -> None:
    caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.float16)
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, staging_bytes=2)
    assert te.half_bytes == te.layout.layer_bytes(CHUNK)


@pytest.mark.parametrize(
    ("chunks", "nbuf", "nbytes", "match"),
    [
        ([[1, 2]], 2, None, "1 chunks of block ids but 2 buffers"),
        ([[1, 2, 3, 4, 5]], 1, None, "has 5 block ids; expected 1..4"),
        ([[]], 1, None, "has 0 block ids"),
        ([[1, B]], 1, None, f"block id {B}"),
        ([[1, 2]], 1, 10, "at least"),
        ([[1, True]], 1, None, "chunk 0 block ids must be integers, got True \\(bool\\)"),
        ([[1, 2], [3, 4.0]], 2, None, "chunk 1 block ids must be integers, got 4.0 \\(float\\)"),
        ([torch.tensor([1.0, 2.0])], 1, None, "got 1.0 \\(float\\)"),
    ],
)
def test_bad_requests_raise_before_touching_anything(chunks, nbuf, nbytes, match) -> None:
    caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.float16)
    before = [c.clone() for c in caches]
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK)
    bufs = [torch.zeros(nbytes or te.layout.chunk_bytes(CHUNK), dtype=torch.uint8) for _ in range(nbuf)]
    with pytest.raises(LayoutError, match=match):
        te.save(chunks, bufs)
    with pytest.raises(LayoutError, match=match):
        te.load(bufs, chunks)
    assert all(torch.equal(a, b) for a, b in zip(before, caches, strict=True))


def test_bad_construction() -> None:
    caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.float16)
    with pytest.raises(LayoutError, match="multiple of the KV block size"):
        TransferEngine(caches, detect_layout(caches), chunk_tokens=6)
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK)
    with pytest.raises(LayoutError, match="layer 7 is out of range"):
        te.save_layer(7, [[1]], _buffers(te.layout, 1))
    with pytest.raises(LayoutError, match="skip_blocks=-1"):
        te.load(_buffers(te.layout, 1), [[1]], skip_blocks=-1)


@pytest.mark.parametrize("name", sorted(ks.all_layouts(L, B, N, H, D, torch.float16)))
@pytest.mark.parametrize("gather", ["strided", "rows", "layers"])
def test_every_gather_mode_moves_the_same_bytes(name: str, gather: str) -> None:
    """Strided views, row tables and one kernel per layer: the same payload bytes, the same loads."""
    caches, hints, block = ks.all_layouts(L, B, N, H, D, torch.float16)[name]
    layout = detect_layout(caches, hints)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=700, gather=gather)
    assert te.gather_mode == gather
    chunks = [[4, 2, 9, 1], [7, 8]]
    bufs = _buffers(layout, 2)
    te.save(chunks, bufs).wait()
    for buf, ids in zip(bufs, chunks, strict=True):
        want = _reference_payload(caches, block, ids, layout).reshape(-1).view(torch.uint8)
        assert torch.equal(buf[:want.numel()], want)
    target, _, tblock = _zeroed(name)
    te2 = TransferEngine(target, detect_layout(target, hints), chunk_tokens=CHUNK, gather=gather)
    te2.load(bufs, [[0, 1, 2, 3], [5, 6]], skip_blocks=1).wait()
    for o, n in zip([2, 9, 1, 7, 8], [1, 2, 3, 5, 6], strict=True):
        assert all(torch.equal(tblock(target, layer, n), block(caches, layer, o)) for layer in range(L))
    zero = torch.zeros_like(tblock(target, 0, 0))
    assert all(torch.equal(tblock(target, layer, 0), zero) for layer in range(L))  # skipped: untouched


def _assert_saved(caches: list[torch.Tensor], chunks: list[list[int]], bufs: list[torch.Tensor]) -> None:
    """Each buffer holds its chunk's blocks of every per-layer ``(2, B, N, H, D)`` cache, layer 0 first."""
    for buf, ids in zip(bufs, chunks, strict=True):
        want = torch.stack([torch.cat([c[:, b] for b in ids], dim=1) for c in caches])
        assert torch.equal(buf[:want.numel() * 2], want.reshape(-1).view(torch.uint8))


def _spaced_layers(gaps: list[int]) -> list[torch.Tensor]:
    """Per-layer ``[B, N, H, D]`` tensors carved from one buffer with ``gaps[i]`` spare elements
    after layer i (so the layers are not evenly spaced)."""
    size = 2 * B * N * H * D
    flat = torch.randn(len(gaps) * size + sum(gaps), dtype=torch.float16)
    out, at = [], 0
    for gap in gaps:
        out.append(flat[at:at + size].view(2, B, N, H, D))
        at += size + gap
    return out


def test_strided_plan_splits_unevenly_spaced_layers_into_runs() -> None:
    """Layers 0-2 and 3-5 evenly spaced, with an odd gap between: two strided views, units split there."""
    from kvortex_core.data.rows import build_strided_plan

    caches = _spaced_layers([0, 0, 40, 0, 0, 0])
    layout = detect_layout(caches)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=1 << 20, gather="strided")
    assert te.gather_mode == "strided" and te._strided.starts == [0, 3]
    assert all(u.l1 <= 3 or u.l0 >= 3 for batch in te._units([[1, 2, 3, 4]], range(6), layer_major=False)
               for u in batch)
    chunks = [[5, 3, 11, 0], [23, 7]]
    bufs = _buffers(layout, 2)
    te.save(chunks, bufs).wait()
    _assert_saved(caches, chunks, bufs)
    target = _spaced_layers([0, 8, 0, 0, 16, 0])
    for t in target:
        t.zero_()
    back = TransferEngine(target, detect_layout(target), chunk_tokens=CHUNK, gather="strided")
    assert back._strided.starts == [0, 2, 5]
    back.load(bufs, [[1, 2, 3, 4], [9, 10]], layerwise=True).wait()
    for o, n in zip([5, 3, 11, 0, 23, 7], [1, 2, 3, 4, 9, 10], strict=True):
        assert all(torch.equal(target[layer][:, n], caches[layer][:, o]) for layer in range(6))
    # every layer at its own distance: more runs than a strided plan takes
    assert build_strided_plan(te.views, max_runs=8) is not None
    scattered = _spaced_layers([8 * (i + 1) for i in range(20)])  # pairs: 10 runs
    assert build_strided_plan(TransferEngine(scattered, detect_layout(scattered), chunk_tokens=CHUNK,
                                             gather="rows").views, max_runs=8) is None
    assert TransferEngine(scattered, detect_layout(scattered), chunk_tokens=CHUNK).gather_mode == "rows"


def _placed_layers(slots: list[int], shape: tuple[int, ...] = (2, B, N, H, D)) -> list[torch.Tensor]:
    """Per-layer tensors of one buffer, layer i in slot ``slots[i]`` (falling slots: falling addresses,
    as consecutive cudaMalloc calls place separate per-layer caches on an H100)."""
    size = 1
    for x in shape:
        size *= x
    flat = torch.randn((max(slots) + 1) * size, dtype=torch.float16)
    return [flat[s * size:(s + 1) * size].view(shape) for s in slots]


@pytest.mark.parametrize("slots", [[5, 4, 3, 2, 1, 0], [0, 1, 2, 9, 7, 5], [8, 6, 4, 0, 1, 2]],
                         ids=["falling", "rising-then-falling", "falling-then-rising"])
@pytest.mark.parametrize("layerwise", [False, True])
def test_strided_plan_gathers_layers_at_falling_addresses_in_layer_order(slots: list[int], layerwise: bool) -> None:
    """A run of layers each below the one before it is one strided view read backwards: the
    payload still lists layer 0 first, and loads (with skipped blocks) write each layer's own blocks."""
    caches = _placed_layers(slots)
    layout = detect_layout(caches)
    te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=3 * layout.chunk_bytes(CHUNK) // 2,
                        gather="strided")
    assert [(r.first, r.end, r.reversed) for r in te._strided.runs] == (
        [(0, 6, True)] if slots[0] == 5 else [(0, 3, False), (3, 6, True)] if slots[0] == 0
        else [(0, 3, True), (3, 6, False)])
    chunks = [[5, 3, 11, 0], [23, 7]]
    bufs = _buffers(layout, 2)
    te.save(chunks, bufs).wait()
    _assert_saved(caches, chunks, bufs)
    for target in (_placed_layers(slots), _placed_layers(list(range(6)))):  # same placement, one rising run
        for t in target:
            t.zero_()
        back = TransferEngine(target, detect_layout(target), chunk_tokens=CHUNK, staging_bytes=1 << 12,
                              gather="strided")
        back.load(bufs, [[1, 2, 3, 4], [9, 10]], layerwise=layerwise, skip_blocks=1).wait()
        for o, n in zip([3, 11, 0, 23, 7], [2, 3, 4, 9, 10], strict=True):
            assert all(torch.equal(target[layer][:, n], caches[layer][:, o]) for layer in range(6))
        untouched = [b for b in range(B) if b not in (2, 3, 4, 9, 10)]
        assert all(int(torch.count_nonzero(target[layer][:, untouched])) == 0 for layer in range(6))


def test_auto_gather_takes_the_row_plan_for_layers_at_falling_addresses() -> None:
    """Separate per-layer caches at falling addresses (one strided run read backwards) take the
    row plan under "auto" (level with the falling run on an H100: one plan for every irregular
    placement); the same tensors in layer order (one rising run) take the strided plan, as does
    "strided" forced on the falling run, and all three write the same payload; an MLA-like
    ``[B, N, D]`` cache too."""
    for shape in ((2, B, N, H, D), (B, N, 2 * D)):
        caches = _placed_layers([5, 4, 3, 2, 1, 0], shape)
        layout = detect_layout(caches)
        staging = 4 * layout.chunk_bytes(CHUNK)
        te = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=staging)
        assert te.gather_mode == "rows", shape
        forced = TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=staging, gather="strided")
        assert forced.gather_mode == "strided" and forced._strided.runs[0].reversed
        rising = _placed_layers(list(range(6)), shape)
        for a, b in zip(rising, caches, strict=True):
            a.copy_(b)
        up = TransferEngine(rising, detect_layout(rising), chunk_tokens=CHUNK, staging_bytes=staging)
        assert up.gather_mode == "strided" and not up._strided.runs[0].reversed
        payloads = []
        for engine in (te, forced, up):
            bufs = _buffers(layout, 1)
            engine.save([[6, 2, 9, 1]], bufs).wait()
            payloads.append(bufs[0])
        if len(shape) == 5:
            _assert_saved(caches, [[6, 2, 9, 1]], [payloads[0]])
        else:  # MLA: [layers, 1, blocks, N, D]
            want = torch.stack([torch.cat([c[b] for b in (6, 2, 9, 1)]) for c in caches])
            assert torch.equal(payloads[0][:want.numel() * 2], want.reshape(-1).view(torch.uint8))
        assert torch.equal(payloads[0], payloads[1]) and torch.equal(payloads[0], payloads[2])


def test_auto_gather_takes_the_strided_plan_only_where_it_was_measured_to_pay() -> None:
    """One group of evenly spaced layers, tokens outside heads, few chunks per batch: strided;
    several groups, an HND view, or many small chunks per batch: the row plan."""
    caches, _, _ = ks.cross_layer(L, B, N, H, D, torch.float16)
    layout = detect_layout(caches)
    chunk = layout.chunk_bytes(CHUNK)
    assert TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=4 * chunk).gather_mode == "strided"
    assert TransferEngine(caches, layout, chunk_tokens=CHUNK, staging_bytes=64 * chunk).gather_mode == "rows"
    uneven = _spaced_layers([0, 0, 40, 0, 0, 0])
    assert TransferEngine(uneven, detect_layout(uneven), chunk_tokens=CHUNK,
                          staging_bytes=4 * chunk).gather_mode == "rows"
    flat = torch.randn(L, 2, B, H, N, D, dtype=torch.float16)  # one buffer, HND pages
    hnd = [flat[i].transpose(2, 3) for i in range(L)]
    assert TransferEngine(hnd, detect_layout(hnd), chunk_tokens=CHUNK, staging_bytes=4 * chunk).gather_mode == "rows"
    assert TransferEngine(hnd, detect_layout(hnd), chunk_tokens=CHUNK, gather="strided").gather_mode == "strided"
    with pytest.raises(LayoutError, match="gather='fast' is not one of auto, strided, rows, layers"):
        TransferEngine(caches, layout, chunk_tokens=CHUNK, gather="fast")


def test_row_plan_keeps_whole_pages_as_rows_when_layers_are_misaligned() -> None:
    """Layers 24 elements apart (not a multiple of a page or of D=48): rows start every step that
    divides the offsets, overlap, and each is still a whole page, so a chunk is one row per block
    and layer; saved and loaded bytes are exact, and blocks not named stay untouched."""
    L2, B2, N2, D2 = 3, 8, 4, 48
    flat = torch.randn(L2 * (B2 * N2 * D2 + 24))
    caches = [flat[i * (B2 * N2 * D2 + 24):][: B2 * N2 * D2].view(B2, N2, D2) for i in range(L2)]
    layout = detect_layout(caches)
    te = TransferEngine(caches, layout, chunk_tokens=8, staging_bytes=500, gather="rows")
    plan = te._rows
    assert te.row_gather and plan.row_elems == N2 * D2 and plan.alias.stride(0) < plan.row_elems  # overlapping
    assert plan.block_offsets(4, 1, 1).shape == (L2, 1)  # one row per (layer, block)
    bufs = [torch.zeros(layout.chunk_bytes(8), dtype=torch.uint8) for _ in range(2)]
    te.save([[5, 2], [7]], bufs).wait()
    payload = bufs[0].view(torch.float32).view(layout.chunk_payload_shape(8))
    for layer in range(L2):
        assert torch.equal(payload[layer, 0, :, 0], torch.cat([caches[layer][5], caches[layer][2]]))
    target = [torch.zeros_like(c) for c in caches]
    te2 = TransferEngine(target, detect_layout(target), chunk_tokens=8, gather="rows")
    te2.load(bufs, [[0, 1], [3]]).wait()
    assert all(torch.equal(target[layer][[0, 1, 3]], caches[layer][[5, 2, 7]]) for layer in range(L2))
    assert all(int(torch.count_nonzero(target[layer][[2, 4, 5, 6, 7]])) == 0 for layer in range(L2))


def test_forced_row_gather_on_a_strided_head_dimension_names_the_reason() -> None:
    """The error named a 16-byte rule that does not exist (a red-team finding); the reason is
    the head dimension's stride."""
    caches = [torch.randn(2, B, N, D, H, dtype=torch.float16).transpose(3, 4) for _ in range(2)]
    with pytest.raises(LayoutError, match=r"head dimension's stride is 2, not 1.*gather='auto'"):
        TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, gather="rows")
    assert TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK).gather_mode == "layers"


def test_layerwise_load_enqueues_ahead_of_the_reader() -> None:
    """On CPU the copies run when enqueued: after load() only the first layer groups are in."""
    caches, _, _ = ks.flash_attn(8, B, N, H, D, torch.float16)
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK)
    dst = _buffers(te.layout, 1)
    te.save([[1, 2, 3, 4]], dst).wait()
    target = [torch.zeros_like(c) for c in caches]
    unit = 2 * te.layout.layer_bytes(CHUNK)  # staging halves of one unit: one batch per unit
    te2 = TransferEngine(target, detect_layout(target), chunk_tokens=CHUNK, staging_bytes=2 * unit)
    handle = te2.load(dst, [[5, 6, 7, 8]], layerwise=True)  # groups of 2 layers, 1 group ahead
    filled = [bool(target[layer][:, 5:9].any()) for layer in range(8)]
    assert filled == [True] * 4 + [False] * 4
    handle.wait_layer(4)
    assert all(bool(target[layer][:, 5:9].any()) for layer in range(8))
    handle.wait()
    assert handle.done()
    assert all(torch.equal(target[layer][:, 5:9], caches[layer][:, 1:5]) for layer in range(8))


def test_enqueue_errors_reach_every_waiter(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure inside the enqueuer thread is raised by wait(), done() and wait_chunk()."""
    caches, _, _ = ks.flash_attn(L, B, N, H, D, torch.float16)
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK)

    def boom(*args: object) -> None:
        raise RuntimeError("gather failed")

    monkeypatch.setattr(te, "_gather", boom)
    handle = te.save([[1, 2, 3, 4]], _buffers(te.layout, 1))
    with pytest.raises(RuntimeError, match="gather failed"):
        handle.wait(timeout=10)
    with pytest.raises(RuntimeError, match="gather failed"):
        handle.wait_chunk(0, timeout=10)
    with pytest.raises(RuntimeError, match="gather failed"):
        handle.done()
    monkeypatch.undo()
    handle = te.save([[1, 2, 3, 4]], _buffers(te.layout, 1))  # the engine still works
    handle.wait(timeout=10)
    te.close()


def test_saves_and_loads_from_many_threads() -> None:
    caches, _, _ = ks.cross_layer(L, B, N, H, D, torch.float32, seed=5)
    te = TransferEngine(caches, detect_layout(caches), chunk_tokens=CHUNK, staging_bytes=900)
    target = torch.zeros_like(caches)
    te2 = TransferEngine(target, detect_layout(target), chunk_tokens=CHUNK, staging_bytes=900)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            ids = [[4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3]]
            bufs = _buffers(te.layout, 1)
            h = te.save(ids, bufs)
            h.wait_chunk(0, timeout=10)
            te2.load(bufs, ids).wait(timeout=10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(B // 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert torch.equal(target, caches)
    te.close()
    te2.close()


class _StalledEvent:
    """A CUDA event stand-in for a device that stalls (no CPU tensor can produce one)."""

    def __init__(self, error: Exception | None = None) -> None:
        self.finished = threading.Event()
        self.error = error
        self.asked = False

    def query(self) -> bool:
        if self.error is not None and self.asked:  # as CUDA: the failure shows at the next call
            raise self.error
        self.asked = True
        return self.finished.is_set()

    def synchronize(self) -> None:
        if self.error is not None:
            raise self.error
        self.finished.wait()


def test_event_wait_times_out_on_a_stalled_device_then_returns_once_done() -> None:
    from kvortex_core.data.streams import TransferTimeoutError, event_wait

    event = _StalledEvent()
    with pytest.raises(TransferTimeoutError, match=r"save did not finish within timeout=0.05s"):
        event_wait(event, 0.05, "save")
    # more stalled waiters than waiter threads: every one still times out on its own
    for _ in range(10):
        with pytest.raises(TransferTimeoutError):
            event_wait(event, 0.01, "load")
    threading.Timer(0.05, event.finished.set).start()
    event_wait(event, 5.0, "save")
    assert event.query()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        event_wait(_StalledEvent(RuntimeError("CUDA error: an illegal memory access")), 5.0, "load")


def test_a_handle_waits_its_last_stretch_in_the_driver_after_a_timed_wait_for_the_rest() -> None:
    """wait() blocks on the batches before the last stretch through the waiter, with the
    timeout (a stall there raises TransferTimeoutError), then on the last stretch in the
    driver (synchronize: no hand-off), which returns once the device finishes it and re-raises
    a device error."""
    from kvortex_core.data.streams import TransferTimeoutError
    from kvortex_core.data.transfer import TransferHandle

    head, last = _StalledEvent(), _StalledEvent()
    handle = TransferHandle(torch.device("cpu"), "load", done_event=last, other_events=[None, head, last])
    with pytest.raises(TransferTimeoutError, match="load did not finish within timeout=0.05s"):
        handle.wait(0.05)  # stalled before the last batch
    assert not handle.done()
    head.finished.set()
    threading.Timer(0.1, last.finished.set).start()
    handle.wait(0.05)  # the last batch: the driver's wait, however long it takes
    assert last.finished.is_set() and handle.done() and handle.done_event is None  # retired

    # a load ending with a drain batch leaves its last two batches to the driver
    head, big, drain = _StalledEvent(), _StalledEvent(), _StalledEvent()
    handle = TransferHandle(torch.device("cpu"), "load", done_event=drain, other_events=[None, head, big, drain],
                            tail_batches=2)
    with pytest.raises(TransferTimeoutError):
        handle.wait(0.05)
    head.finished.set()
    threading.Timer(0.05, big.finished.set).start()
    threading.Timer(0.1, drain.finished.set).start()
    handle.wait(0.05)
    assert drain.finished.is_set() and handle.done()

    failed = _StalledEvent(RuntimeError("CUDA error: an illegal memory access"))
    handle = TransferHandle(torch.device("cpu"), "save", done_event=failed,
                            other_events=[None, _StalledEvent(), failed])
    handle.other_events[1].finished.set()
    with pytest.raises(RuntimeError, match="illegal memory access"):
        handle.wait(1.0)


def test_a_completed_transfer_frees_its_buffers_while_the_next_one_waits() -> None:
    """wait() hands the finished transfer's buffers to its direction, which frees them while a
    later transfer waits (off the return path); polled-only handles keep a bounded number."""
    import weakref

    caches, hints, _ = ks.all_layouts(L, B, N, H, D, torch.float16)["flash_attn_nhd"]
    te = TransferEngine(caches, detect_layout(caches, hints), chunk_tokens=CHUNK)
    dst = _buffers(te.layout, 2)
    first = te.save([[5, 1, 19, 7], [0, 23, 2]], dst)
    first.wait(timeout=5)
    assert first.keepalive == []  # the handle itself keeps nothing alive
    kept = weakref.ref(te._save.streams._deferred[-1][-1])  # the row-index tensor of that save
    assert kept() is not None
    te.save([[2, 3, 4, 6]], dst[:1]).wait(timeout=5)
    assert kept() is None  # freed while the second save waited
    for _ in range(50):  # handles only polled: at most a few transfers' buffers stay
        h = te.save([[2, 3, 4, 6]], dst[:1])
        while not h.done():
            pass
    assert len(te._save.streams._deferred) <= 8
    te.close()
    assert not te._save.streams._deferred
