"""Chunk keys: chaining, namespace separation, input types, cross-process stability."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from kvortex_core.control.keys import (
    ALGORITHMS,
    FORMAT_VERSION,
    ChunkHasher,
    KeyNamespace,
    rank_keys,
    validate_chunk_tokens,
)
from kvortex_core.errors import ConfigError, KVortexError

NS = KeyNamespace("meta-llama/Llama-3.1-8B", "main", "bfloat16", "nhd", 32, 8, 128)


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 128_000, n).tolist()


def test_spec_sha256_chain() -> None:
    """The documented derivation, recomputed independently with hashlib."""
    toks = tokens(600)
    seed = hashlib.sha256(b"kvortex-seed\0sha256\0" + NS.digest()).digest()
    expected, prev = [], seed
    for i in range(2):
        chunk = np.asarray(toks[i * 256 : (i + 1) * 256], dtype="<u4").tobytes()
        prev = hashlib.sha256(prev + chunk).digest()
        expected.append(prev)
    assert ChunkHasher(NS, 256).keys(toks) == expected


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_prefix_chaining(algorithm: str) -> None:
    h = ChunkHasher(NS, 16, algorithm)
    toks = tokens(16 * 8)
    keys = h.keys(toks)
    assert len(keys) == 8 and len(set(keys)) == 8
    assert h.keys(toks[: 16 * 3]) == keys[:3]  # a prefix has the prefix's keys
    changed = list(toks)
    changed[16 * 5 + 3] += 1  # a token in chunk 5 changes keys 5.. and nothing before
    other = h.keys(changed)
    assert other[:5] == keys[:5]
    assert all(a != b for a, b in zip(other[5:], keys[5:], strict=True))


def test_same_chunk_after_different_prefix_differs() -> None:
    h = ChunkHasher(NS, 4)
    assert h.keys([1, 2, 3, 4, 9, 9, 9, 9])[1] != h.keys([5, 6, 7, 8, 9, 9, 9, 9])[1]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_input_types_agree(algorithm: str) -> None:
    h = ChunkHasher(NS, 32, algorithm)
    toks = tokens(32 * 4 + 5)
    expected = h.keys(toks)
    assert h.keys(tuple(toks)) == expected
    assert h.keys(np.asarray(toks, dtype=np.int64)) == expected
    assert h.keys(np.asarray(toks, dtype=np.int32)) == expected
    assert h.keys(torch.tensor(toks)) == expected
    assert h.keys(iter(toks)) == expected


def test_key_lengths() -> None:
    toks = tokens(64)
    assert {len(k) for k in ChunkHasher(NS, 32, "sha256").keys(toks)} == {32}
    assert {len(k) for k in ChunkHasher(NS, 32, "blake3").keys(toks)} == {32}
    assert {len(k) for k in ChunkHasher(NS, 32, "xxh3_128").keys(toks)} == {16}


def test_algorithms_give_different_keys() -> None:
    toks = tokens(64)
    sha, b3 = ChunkHasher(NS, 32, "sha256").keys(toks), ChunkHasher(NS, 32, "blake3").keys(toks)
    assert not set(sha) & set(b3)


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "other"}, {"revision": "v2"}, {"dtype": "float16"}, {"layout": "hnd"},
        {"num_layers": 33}, {"num_kv_heads": 4}, {"head_size": 64}, {"tp_size": 2},
        {"salt": "tenant-a"}, {"format_version": FORMAT_VERSION + 1},
    ],
)  # fmt: skip
def test_namespace_fields_separate_keys(change: dict[str, object]) -> None:
    toks = tokens(64)
    other = replace(NS, **change)
    assert other.digest() != NS.digest()
    assert not set(ChunkHasher(other, 32).keys(toks)) & set(ChunkHasher(NS, 32).keys(toks))


def test_namespace_bytes_seed_equals_namespace() -> None:
    toks = tokens(64)
    assert ChunkHasher(NS.digest(), 32).keys(toks) == ChunkHasher(NS, 32).keys(toks)


def test_partial_chunk() -> None:
    toks = tokens(100)
    plain, partial = ChunkHasher(NS, 32), ChunkHasher(NS, 32, store_partial=True)
    assert len(plain.keys(toks)) == 3 and plain.num_chunks(100) == 3
    keys = partial.keys(toks)
    assert len(keys) == 4 and partial.num_chunks(100) == 4 and partial.num_chunks(96) == 3
    assert keys[:3] == plain.keys(toks)
    assert keys[3] != partial.keys(toks[:99])[3]  # the partial key covers exactly its tokens
    assert plain.keys(toks[:31]) == [] and plain.num_chunks(0) == 0


def test_partial_chunk_key_names_its_padded_block_rows() -> None:
    """A partial chunk's payload covers whole blocks: 20 tokens are 32 rows with 16-token
    blocks, 64 with 64-token blocks. Different row counts must never share a key."""
    toks = tokens(84)
    by_bs = {bs: ChunkHasher(NS, 64, store_partial=True, block_size=bs).keys(toks) for bs in (1, 8, 16, 32, 64)}
    assert len({k[0] for k in by_bs.values()}) == 1, "whole chunks do not depend on the block size"
    assert by_bs[16][1] == by_bs[32][1], "20 tokens pad to 32 rows with both"
    assert len({by_bs[bs][1] for bs in (1, 8, 16, 64)}) == 4  # 20, 24, 32, 64 rows
    with pytest.raises(ConfigError, match="block_size=0"):
        ChunkHasher(NS, 64, block_size=0)


def test_partial_chunk_key_names_the_chunk_size() -> None:
    """A stored chunk's shape holds chunk_tokens: a 32-token prompt keyed by engines with 64- and
    128-token chunks must not share its partial key (they deleted each other's as corrupt)."""
    toks = tokens(32)
    by_ct = {ct: ChunkHasher(NS, ct, store_partial=True, block_size=16).keys(toks) for ct in (64, 128)}
    assert len(by_ct[64]) == len(by_ct[128]) == 1 and by_ct[64] != by_ct[128]
    whole = {ct: ChunkHasher(NS, ct, store_partial=True, block_size=16).keys(tokens(128))[0] for ct in (64, 128)}
    assert whole[64] != whole[128]  # whole chunks hash different token spans anyway


def test_resume_chain() -> None:
    h = ChunkHasher(NS, 16)
    toks = tokens(16 * 10)
    full = h.keys(toks)
    assert h.keys(toks, prefix=full[3], start_chunk=4) == full[4:]


def test_bad_tokens_and_settings() -> None:
    h = ChunkHasher(NS, 4)
    with pytest.raises(KVortexError, match="token ids"):
        h.keys([1, 2, -3, 4])
    with pytest.raises(KVortexError, match="range"):
        h.keys(np.array([1, 2, 2**33, 4]))
    with pytest.raises(KVortexError, match="integer"):
        h.keys(np.array([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ConfigError, match="md5"):
        ChunkHasher(NS, 4, "md5")
    with pytest.raises(ConfigError, match="chunk_tokens=0"):
        ChunkHasher(NS, 0)


def test_rank_keys() -> None:
    keys = ChunkHasher(NS, 16).keys(tokens(64))
    assert rank_keys(keys, 0) == keys
    r1, r2 = rank_keys(keys, 1), rank_keys(keys, 2)
    assert len(set(r1) | set(r2) | set(keys)) == 12
    assert rank_keys(keys, 1) == r1 and all(len(k) == 32 for k in r1)
    with pytest.raises(KVortexError):
        rank_keys(keys, -1)


def test_validate_chunk_tokens() -> None:
    validate_chunk_tokens(256, 16)
    with pytest.raises(ConfigError, match=r"chunk_tokens=250.*block_size=16.*256"):
        validate_chunk_tokens(250, 16)
    with pytest.raises(ConfigError):
        validate_chunk_tokens(256, 0)


_CHILD = """
import sys
from kvortex_core.control.keys import ChunkHasher, KeyNamespace, rank_keys
ns = KeyNamespace("m", "r", "bfloat16", "nhd", 2, 2, 8, tp_size=2, salt="s")
toks = [(i * 7919) % 50000 for i in range(1000)]
for alg in ("sha256", "blake3", "xxh3_128"):
    keys = ChunkHasher(ns, 64, alg, store_partial=True).keys(toks)
    print(alg, ns.digest().hex(), *[k.hex() for k in keys + rank_keys(keys, 1)])
"""


def test_keys_identical_across_processes() -> None:
    outs = []
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                              text=True, check=True, timeout=120)
        outs.append(done.stdout)
    assert outs[0] == outs[1] == outs[2] and outs[0].count("\n") == 3


def test_request_seed_and_chunk_extras_follow_the_documented_derivation() -> None:
    """A request seed (LoRA, cache salt) changes every key; a chunk's extra bytes (multimodal
    content) change that chunk's key and, through the chain, every later one; recomputed with
    hashlib from the documented bytes."""
    toks = tokens(3 * 256, seed=9)
    h = ChunkHasher(NS, 256)
    plain = h.keys(toks)
    seed = hashlib.sha256(b"kvortex-seed\0sha256\0" + NS.digest()).digest()
    req_seed = hashlib.sha256(seed + b"\0kvortex-request\0" + b"lora:x").digest()
    assert h.request_seed(b"lora:x") == req_seed
    expected, prev = [], req_seed
    for i in range(3):
        chunk = np.asarray(toks[i * 256:(i + 1) * 256], dtype="<u4").tobytes()
        if i == 1:
            chunk += b"\0kvortex-extra\0" + b"img-7"
        prev = hashlib.sha256(prev + chunk).digest()
        expected.append(prev)
    got = h.keys(toks, prefix=req_seed, extras={1: b"img-7"})
    assert got == expected
    only_extra = h.keys(toks, extras={1: b"img-7"})
    assert only_extra[0] == plain[0] and only_extra[1] != plain[1] and only_extra[2] != plain[2]
    assert h.keys(toks, extras={1: b"img-8"})[1:] != only_extra[1:]
    assert all(a != b for a, b in zip(h.keys(toks, prefix=h.request_seed(b"lora:y")), got, strict=True))


def test_a_namespace_variant_changes_the_digest_and_an_empty_one_is_not_encoded() -> None:
    assert b"variant" not in NS.canonical()
    with_variant = replace(NS, variant='{"weights":"float16"}')
    assert b'"variant":' in with_variant.canonical() and with_variant.digest() != NS.digest()
    assert replace(NS, variant="").digest() == NS.digest()
