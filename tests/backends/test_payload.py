"""The payload format: round trips, and every kind of damage refused with PayloadError."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvortex_core.data import payload as pl
from kvortex_core.errors import PayloadError

NS = b"namespace-digest-0123456789abcdef"
KEY = bytes(range(32))
SHAPE = (2, 2, 16, 4, 8)
DTYPE = torch.bfloat16


def _kv() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(DTYPE)


def _slot(kv: torch.Tensor) -> torch.Tensor:
    nbytes = kv.numel() * kv.element_size()
    slot = torch.zeros(pl.HEADER_BYTES + nbytes, dtype=torch.uint8)
    slot[pl.HEADER_BYTES :] = kv.contiguous().view(torch.uint8).flatten()
    pl.seal(slot, key=KEY, namespace=NS, shape=SHAPE, dtype=DTYPE, payload_len=nbytes)
    return slot


def _parse(buf: object, **over: object) -> memoryview:
    args = {"key": KEY, "namespace": NS, "shape": SHAPE, "dtype": DTYPE, **over}
    return pl.parse(buf, **args)  # type: ignore[arg-type]


def test_slot_round_trip_is_zero_copy_and_bytes_equal() -> None:
    kv = _kv()
    slot = _slot(kv)
    view = _parse(slot)
    back = torch.frombuffer(view, dtype=torch.uint8).view(DTYPE).view(SHAPE)
    assert torch.equal(back, kv)
    assert back.data_ptr() == slot.data_ptr() + pl.HEADER_BYTES  # a view, no copy


def test_header_fields_decode() -> None:
    slot = _slot(_kv())
    header = pl.read_header(slot)
    assert header.key == KEY and header.shape == SHAPE and header.dtype == "bfloat16"
    assert header.stored_len == header.raw_len == slot.numel() - pl.HEADER_BYTES
    assert header.compression == "none" and header.total_len == slot.numel()


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ({"key": b"\x01" * 32}, "key"),
        ({"namespace": b"other-model"}, "namespace"),
        ({"shape": (2, 2, 16, 4, 4)}, "shape"),
        ({"dtype": torch.float16}, "dtype"),
    ],
)
def test_wrong_identity_refused(override: dict[str, object], match: str) -> None:
    with pytest.raises(PayloadError, match=match):
        _parse(_slot(_kv()), **override)


def test_truncated_refused() -> None:
    data = bytes(_slot(_kv()).numpy())
    for cut in (0, 100, pl.HEADER_BYTES, len(data) - 1):
        with pytest.raises(PayloadError, match="truncated|not a KVortex"):
            _parse(data[:cut])


def test_foreign_bytes_refused() -> None:
    with pytest.raises(PayloadError, match="not a KVortex payload"):
        _parse(b"GIF89a" + bytes(8000))


def test_future_version_refused() -> None:
    buf = bytearray(_slot(_kv()).numpy().tobytes())
    fixed = bytearray(buf[:264])
    struct.pack_into("<H", fixed, 8, pl.PAYLOAD_VERSION + 1)
    buf[:264] = fixed
    import xxhash

    buf[264:272] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(fixed)))
    with pytest.raises(PayloadError, match="version"):
        _parse(buf)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_bit_flip_in_header_or_payload_is_detected(data: st.DataObject) -> None:
    buf = bytearray(_slot(_kv()).numpy().tobytes())
    checked = list(range(272)) + list(range(pl.HEADER_BYTES, len(buf)))
    pos = data.draw(st.sampled_from(checked))
    bit = data.draw(st.integers(0, 7))
    buf[pos] ^= 1 << bit
    with pytest.raises(PayloadError):
        _parse(buf)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_compression_round_trip(codec: str) -> None:
    kv = torch.zeros(SHAPE, dtype=DTYPE)  # highly compressible
    kv[0, 0, :4] = 1.5
    slot = _slot(kv)
    packed = pl.compress_value(slot, codec)  # type: ignore[arg-type]
    assert len(packed) < slot.numel()
    assert pl.read_header(packed).compression == codec
    assert pl.raw_length(packed) == slot.numel()
    # parse expands straight into a caller buffer
    out = bytearray(slot.numel())
    view = _parse(packed, out=out)
    assert bytes(view) == bytes(slot[pl.HEADER_BYTES :].numpy())
    # decompress_value restores the exact stored value, header included
    restored = bytearray(slot.numel() + 10)
    n = pl.decompress_value(packed, restored)
    assert n == slot.numel() and bytes(restored[:n]) == bytes(slot.numpy())


def test_incompressible_or_opaque_values_pass_through() -> None:
    kv = torch.randint(-(2**15), 2**15, SHAPE, dtype=torch.int16).view(DTYPE)
    slot = _slot(kv)
    assert pl.compress_value(slot, "lz4") is slot
    opaque = b"not a payload" * 10
    assert pl.compress_value(opaque, "zstd") is opaque
    out = bytearray(len(opaque))
    assert pl.decompress_value(opaque, out) == len(opaque) and bytes(out) == opaque


def test_corrupt_compressed_payload_refused() -> None:
    slot = _slot(torch.zeros(SHAPE, dtype=DTYPE))
    packed = bytearray(pl.compress_value(slot, "zstd"))  # type: ignore[arg-type]
    packed[pl.HEADER_BYTES + 3] ^= 0xFF
    with pytest.raises(PayloadError, match="checksum"):
        pl.decompress_value(packed, bytearray(slot.numel()))
    with pytest.raises(PayloadError, match="checksum"):
        _parse(packed)


def test_header_limits() -> None:
    buf = bytearray(pl.HEADER_BYTES)
    with pytest.raises(PayloadError, match="too large"):
        pl.write_header(
            buf, key=b"k" * 200, namespace=NS, shape=SHAPE, dtype=DTYPE, payload_len=0, checksum=0
        )
    with pytest.raises(PayloadError, match="needs 4096"):
        pl.write_header(
            bytearray(10),
            key=KEY,
            namespace=NS,
            shape=SHAPE,
            dtype=DTYPE,
            payload_len=0,
            checksum=0,
        )


def test_large_incompressible_value_skipped_after_probe() -> None:
    n = 2 * 1024 * 1024
    buf = bytearray(pl.HEADER_BYTES + n)
    buf[pl.HEADER_BYTES :] = torch.randn(n // 2).to(DTYPE).view(torch.uint8).numpy().tobytes()
    pl.seal(buf, key=KEY, namespace=NS, shape=(n // 2,), dtype=DTYPE, payload_len=n)
    assert pl.compress_value(buf, "lz4") is buf  # bf16 noise: lz4 gains nothing
    packed = pl.compress_value(buf, "zstd")  # zstd still finds the exponent bytes
    assert len(packed) < 0.9 * len(buf)
    out = bytearray(len(buf))
    assert pl.decompress_value(packed, out) == len(buf) and out == buf


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_a_value_that_changes_while_it_is_compressed_is_refused(codec: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A buffer rewritten under the codec (a caller reusing it too early) must not be stored with
    a fresh checksum over mixed bytes: no later check could tell them from the real ones."""
    slot = _slot(torch.zeros(SHAPE, dtype=DTYPE))
    real = pl._compress_bytes

    def racing(data: memoryview, name: str, level: int | None) -> bytes:
        packed = real(data, name, level)
        slot[pl.HEADER_BYTES + 100] = 7  # another chunk lands in the slot meanwhile
        return packed

    monkeypatch.setattr(pl, "_compress_bytes", racing)
    with pytest.raises(PayloadError, match="changed while it was compressed"):
        pl.compress_value(slot, codec)  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_expanded_bytes_are_checked_against_the_checksum_they_were_sealed_with(codec: str) -> None:
    """A compressed value carries its raw payload's checksum: bytes that decompress cleanly but
    are not the ones sealed (a damaged raw checksum stands in for any such fault) are refused,
    and nothing is written into the caller's buffer."""
    slot = _slot(torch.zeros(SHAPE, dtype=DTYPE))
    packed = bytearray(pl.compress_value(slot, codec))  # type: ignore[arg-type]
    header = pl.read_header(packed)
    assert header.raw_checksum == pl.read_header(slot).checksum != 0
    packed[272] ^= 0x01  # the raw checksum, outside the header checksum's range
    out = bytearray(b"\xee" * slot.numel())
    with pytest.raises(PayloadError, match="raw checksum mismatch"):
        pl.decompress_value(packed, out)
    assert out == b"\xee" * slot.numel()
    with pytest.raises(PayloadError, match="raw checksum mismatch"):
        _parse(packed)
    # a compressed value of an earlier writer (no raw checksum recorded) still expands
    packed[272:280] = bytes(8)
    restored = bytearray(slot.numel())
    assert pl.decompress_value(packed, restored) == slot.numel() and restored == bytes(slot.numpy())
    assert pl.read_header(slot).raw_checksum == 0  # uncompressed values record none
