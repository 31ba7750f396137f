"""Chunk keys: prefix-chained content hashes seeded with a namespace digest.

``h_0 = H(seed, tokens_0)``, ``h_i = H(h_{i-1}, tokens_i)`` where ``seed`` is the digest of
everything that makes KV incompatible (model, revision, dtype, layout, shape, TP size, format
version, salt) and the algorithm name. Tokens are hashed as little-endian uint32 bytes, never as
text, and nothing depends on process state (``hash()``, ``PYTHONHASHSEED``, random seeds): two
processes on two machines compute the same keys for the same tokens.

The namespace is rank-independent so the scheduler indexes *logical* keys; each tensor-parallel
rank stores its shard under :func:`rank_keys`.
"""

from __future__ import annotations

import array
import hashlib
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import blake3
import xxhash

from kvortex_core.errors import ConfigError, KVortexError

#: Version of the key derivation and payload format; bump it when either changes.
FORMAT_VERSION = 1

#: Supported hash algorithms (the config field ``hash_algorithm`` accepts exactly these).
ALGORITHMS = ("sha256", "blake3", "xxh3_128")

#: Token ids are stored as uint32 in the hashed bytes.
MAX_TOKEN_ID = _MAX_TOKEN = 0xFFFFFFFF
_Digest = Callable[[bytes], bytes]


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _blake3(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


_DIGESTS: dict[str, _Digest] = {
    "sha256": _sha256,
    "blake3": _blake3,
    "xxh3_128": xxhash.xxh3_128_digest,
}


def digest_function(algorithm: str) -> _Digest:
    """The one-shot ``bytes -> digest`` function of ``algorithm``."""
    try:
        return _DIGESTS[algorithm]
    except KeyError:
        raise ConfigError(
            f"hash_algorithm={algorithm!r} is not supported; use one of {', '.join(ALGORITHMS)}"
        ) from None


@dataclass(frozen=True)
class KeyNamespace:
    """Everything that makes two KV caches incompatible; folded into every key."""

    model_id: str
    revision: str
    dtype: str
    layout: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    tp_size: int = 1
    salt: str = ""
    format_version: int = FORMAT_VERSION
    #: What else makes the KV numbers differ for the same model, layout and tokens: the weights'
    #: dtype and quantization, RoPE settings (the vLLM connector fills it). Left out of the
    #: encoding when empty, so namespaces without it keep their digests.
    variant: str = ""

    def canonical(self) -> bytes:
        """A canonical byte encoding: sorted-key JSON, independent of Python's hash seed."""
        fields = asdict(self)
        if not fields["variant"]:
            del fields["variant"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> bytes:
        """sha256 of :meth:`canonical` (32 bytes)."""
        return hashlib.sha256(b"kvortex-namespace\0" + self.canonical()).digest()


def tokens_to_bytes(token_ids: Any) -> bytes | memoryview:
    """Token ids (list, tuple, numpy array, torch tensor, ``array("I")``) as little-endian uint32 bytes."""
    if type(token_ids) is array.array and token_ids.typecode == "I" and token_ids.itemsize == 4 \
            and sys.byteorder == "little":  # range-checked when it was filled; no numpy on this path
        return memoryview(token_ids).cast("B")
    if isinstance(token_ids, (list, tuple, range)):
        return _sequence_bytes(token_ids)
    if hasattr(token_ids, "detach"):  # torch tensor: no torch import needed here
        token_ids = token_ids.detach().cpu().numpy()
    if hasattr(token_ids, "dtype") and hasattr(token_ids, "astype"):
        return _ndarray_bytes(token_ids)
    return _sequence_bytes(list(token_ids))


def _sequence_bytes(seq: Sequence[int]) -> bytes | memoryview:
    try:  # C-speed conversion that also range-checks every id; fromlist beats the constructor
        if isinstance(seq, list):
            arr = array.array("I")
            arr.fromlist(seq)
        else:
            arr = array.array("I", seq)
    except (OverflowError, TypeError) as exc:
        raise KVortexError(
            f"token ids must be integers in [0, {_MAX_TOKEN}]: {exc}; pass the engine's token ids"
        ) from None
    if arr.itemsize != 4:  # pragma: no cover - exotic ABI
        import numpy as np

        return _ndarray_bytes(np.asarray(seq, dtype=np.int64))
    if sys.byteorder == "big":  # pragma: no cover - keys are little-endian everywhere
        arr.byteswap()
    return memoryview(arr).cast("B")


def _ndarray_bytes(arr: Any) -> bytes | memoryview:
    import numpy as np

    arr = np.ravel(arr)
    if arr.dtype.kind not in "iu":
        raise KVortexError(f"token ids must be an integer array, got dtype {arr.dtype}")
    if arr.dtype != np.dtype("<u4") and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > _MAX_TOKEN:
            raise KVortexError(
                f"token ids must be in [0, {_MAX_TOKEN}], got range [{lo}, {hi}]"
            )
    return memoryview(np.ascontiguousarray(arr, dtype="<u4")).cast("B")


#: Ends the hashed bytes of a partial chunk, before its padded token count.
_PARTIAL_TAG = b"\0kvortex-partial\0"
#: Precedes a chunk's extra bytes (see ``ChunkHasher.keys``).
_EXTRA_TAG = b"\0kvortex-extra\0"


class ChunkHasher:
    """Cuts token ids into chunks and returns one prefix-chained key per chunk."""

    def __init__(
        self,
        namespace: KeyNamespace | bytes,
        chunk_tokens: int,
        algorithm: str = "sha256",
        store_partial: bool = False,
        block_size: int = 1,
    ) -> None:
        if chunk_tokens <= 0:
            raise ConfigError(f"chunk_tokens={chunk_tokens} must be a positive integer such as 256")
        if block_size <= 0:
            raise ConfigError(f"block_size={block_size} must be a positive integer such as 16")
        self._digest = digest_function(algorithm)
        ns = namespace.digest() if isinstance(namespace, KeyNamespace) else bytes(namespace)
        self.algorithm = algorithm
        self.chunk_tokens = chunk_tokens
        self.store_partial = store_partial
        #: The engine's block size: a partial chunk's payload holds whole blocks
        #: (``ceil(tokens / block_size) * block_size`` token rows), so its key names that count.
        self.block_size = block_size
        self.seed = self._digest(b"kvortex-seed\0" + algorithm.encode() + b"\0" + ns)

    def num_chunks(self, n_tokens: int) -> int:
        """How many keys :meth:`keys` returns for ``n_tokens`` tokens."""
        whole, rest = divmod(max(n_tokens, 0), self.chunk_tokens)
        return whole + (1 if rest and self.store_partial else 0)

    def request_seed(self, extra: bytes) -> bytes:
        """The chain seed of a request whose KV depends on more than its tokens and the namespace
        (a LoRA adapter, a per-request cache salt): pass it as ``keys(..., prefix=...)``. Every
        key of such a request differs from the plain request's and from another ``extra``'s."""
        return self._digest(self.seed + b"\0kvortex-request\0" + extra)

    def keys(self, token_ids: Any, *, prefix: bytes | None = None,
             start_chunk: int = 0, extras: Mapping[int, bytes] | None = None) -> list[bytes]:
        """One key per whole chunk (plus the trailing partial one when ``store_partial``).

        ``prefix``/``start_chunk`` resume a chain: pass the key of chunk ``start_chunk - 1`` and
        only chunks from ``start_chunk`` on are hashed (for a request that grew).

        ``extras``: chunk index -> bytes that also decide that chunk's KV beyond its token ids
        (the content behind multimodal placeholder tokens); hashed into that chunk's key, and so,
        through the chain, into every later one.

        A partial chunk's payload is laid out over its whole blocks, so its key also names their
        token count: engines whose block sizes pad it differently never share it (one with
        16-token blocks stores 20 tokens as 32 rows per layer, one with 64-token blocks as 64).
        It names ``chunk_tokens`` too: a stored chunk's shape holds it, and engines of two chunk
        sizes on one store took each other's partial chunk as corrupt and deleted it.
        """
        data = tokens_to_bytes(token_ids)
        step = self.chunk_tokens * 4
        n = self.num_chunks(len(data) // 4)
        digest, prev = self._digest, self.seed if prefix is None else prefix
        out: list[bytes] = []
        for i in range(start_chunk, n):
            part = data[i * step : (i + 1) * step]
            if len(part) < step:  # the trailing partial chunk
                rows = -(-(len(part) // 4) // self.block_size) * self.block_size
                part = (bytes(part) + _PARTIAL_TAG + rows.to_bytes(4, "little")
                        + self.chunk_tokens.to_bytes(4, "little"))
            if extras and i in extras:
                part = bytes(part) + _EXTRA_TAG + extras[i]
            prev = digest(prev + part)
            out.append(prev)
        return out


def rank_keys(keys: Sequence[bytes], rank: int) -> list[bytes]:
    """The storage key of each chunk on TP rank ``rank``.

    Rank 0 stores under the logical key itself (no extra hashing on a single GPU); every other
    rank under ``sha256("rank", rank, key)`` truncated to the key length. The namespace already
    holds ``tp_size``, so shards of different TP sizes never collide.
    """
    if rank < 0:
        raise KVortexError(f"rank={rank} must be >= 0")
    if rank == 0:
        return list(keys)
    tag = b"kvortex-rank\0" + rank.to_bytes(4, "little")
    return [hashlib.sha256(tag + k).digest()[: len(k)] for k in keys]


def validate_chunk_tokens(chunk_tokens: int, block_size: int) -> None:
    """:class:`ConfigError` unless ``chunk_tokens`` is a positive multiple of ``block_size``."""
    if block_size <= 0:
        raise ConfigError(f"engine block_size={block_size} must be positive")
    if chunk_tokens <= 0 or chunk_tokens % block_size:
        fix = max(block_size, round(max(chunk_tokens, 1) / block_size) * block_size)
        raise ConfigError(
            f"chunk_tokens={chunk_tokens} must be a positive multiple of the engine's "
            f"block_size={block_size}; set chunk_tokens (KVORTEX_CHUNK_TOKENS) to e.g. {fix}"
        )
