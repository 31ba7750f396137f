"""What KVortexConnector accepts and refuses when vLLM starts it, on vLLM's own config objects.

Each refusal is a case where storing or loading KV would go wrong (other layers, other blocks,
other numbers): start-up stops with a message naming the setting and what to do instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm_harness import (
    BLOCK,
    DTYPE,
    H_TOTAL,
    D,
    allocate_kv,
    make_kv_cache_config,
    make_request,
    make_vllm_config,
    write_model_dir,
)
from vllm_kv_alloc import layer_names

from kvortex_core.config import KVortexConfig
from kvortex_core.errors import ConfigError, LayoutError
from kvortex_vllm import compat
from kvortex_vllm.connector import KVortexConnector, build_namespace

pytestmark = pytest.mark.vllm

CHUNK = 32
ROLES = (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER)


def vllm_config(tmp_path: Path) -> Any:
    return make_vllm_config(write_model_dir(tmp_path / "model"), {"chunk_tokens": CHUNK})


def refused_by_both_roles(vc: Any, kcc: Any, match: str) -> None:
    for role in ROLES:
        with pytest.raises(ConfigError, match=match):
            KVortexConnector(vc, role, kcc)


def test_a_hybrid_kv_cache_with_several_groups_is_refused(tmp_path: Path) -> None:
    """Forced-on hybrid KV cache manager: each group of layers has its own block table, which one
    set of block ids would mix up."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=H_TOTAL, head_size=D, dtype=DTYPE)
    first, second = layer_names(2)
    kcc = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec([first], spec), KVCacheGroupSpec([second], spec)])
    refused_by_both_roles(vllm_config(tmp_path), kcc, "2 KV cache groups.*--disable-hybrid-kv-cache-manager")


def test_a_sliding_window_cache_is_refused(tmp_path: Path) -> None:
    """vLLM frees blocks that leave the window while a save may still read them (and gives a hit
    past the window the shared null block)."""
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

    spec = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=H_TOTAL, head_size=D, dtype=DTYPE, sliding_window=32)
    kcc = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layer_names(2), spec)])
    refused_by_both_roles(vllm_config(tmp_path), kcc, "SlidingWindowSpec.*--disable-sliding-window")


def test_a_cache_that_is_neither_full_attention_nor_windowed_is_refused_without_window_advice(
        tmp_path: Path) -> None:
    """An encoder-only or cross-attention cache (no prompt prefix to reuse): refused, naming what
    KVortex does store, without the sliding-window advice that would not apply."""
    from vllm.v1.kv_cache_interface import CrossAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    spec = CrossAttentionSpec(block_size=BLOCK, num_kv_heads=H_TOTAL, head_size=D, dtype=DTYPE)
    kcc = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layer_names(2), spec)])
    for role in ROLES:
        with pytest.raises(ConfigError, match="CrossAttentionSpec, which KVortex does not store") as err:
            KVortexConnector(vllm_config(tmp_path), role, kcc)
        assert "sliding-window" not in str(err.value) and "FullAttentionSpec" in str(err.value)


@pytest.mark.parametrize("setting", ["pipeline_parallel_size", "decode_context_parallel_size",
                                     "prefill_context_parallel_size"])
def test_pipeline_and_context_parallelism_are_refused(tmp_path: Path, setting: str) -> None:
    """Two pipeline stages of one TP rank would store different layers under the same keys;
    context parallelism puts a block's tokens on several ranks."""
    vc = vllm_config(tmp_path)
    if not hasattr(vc.parallel_config, setting):
        pytest.skip(f"this vLLM has no {setting}")
    setattr(vc.parallel_config, setting, 2)
    refused_by_both_roles(vc, make_kv_cache_config(64, H_TOTAL), f"{setting}=2 is not supported")


def test_layers_reusing_another_layers_kv_are_stored_once(tmp_path: Path) -> None:
    """Models with cross-layer KV sharing (Gemma 3n): vLLM's KV config lists only the layers that
    own a cache, and hands the connector the owner's tensor under the sharing layer's name too.
    The connector stores it once, and a wait for the sharing layer waits for its owner."""
    kcc = make_kv_cache_config(64, H_TOTAL, layers=1)
    conn = KVortexConnector(vllm_config(tmp_path), KVConnectorRole.WORKER, kcc)
    allocated, _, _, _ = allocate_kv(kcc, H_TOTAL, 64)
    first, second = layer_names(2)
    caches = {first: allocated[first]}  # vLLM 0.30+ allocates only the owning layer (0.15: the harness's own)
    caches[second] = caches[first]  # as vLLM's initialize_kv_cache_tensors aliases a sharing layer
    conn.register_kv_caches(caches)
    ws = conn.worker_side
    assert ws.layout is not None and ws.layout.num_layers == 1
    assert ws.layer_index == {first: 0, second: 0}
    conn.shutdown()


def test_caches_that_disagree_with_the_model_config_stop_start_up(tmp_path: Path) -> None:
    """A registered cache whose chunks differ from what the scheduler sizes slots and keys by
    (here: a layer missing) is a clear error at registration, not a refused plan every step."""
    kcc = make_kv_cache_config(64, H_TOTAL)
    conn = KVortexConnector(vllm_config(tmp_path), KVConnectorRole.WORKER, kcc)
    caches, _, _, _ = allocate_kv(kcc, H_TOTAL, 64)
    one = dict(list(caches.items())[:1])
    with pytest.raises(LayoutError, match=r"hold chunks of \(1, 2, 32, 2, 16\).*model config says \(2, 2, 32, 2, 16\)"):
        conn.register_kv_caches(one)
    assert conn.worker_side.pool is None  # refused before the pinned pool was allocated
    conn.shutdown()


def test_pooling_models_that_need_every_prompt_token_get_no_hits(tmp_path: Path) -> None:
    """A causal embedding model with MEAN pooling needs every prompt token's hidden state (vLLM
    gives it no prefix caching): a loaded prefix would fail its pooler, so nothing is keyed."""
    from vllm.config import ModelConfig, PoolerConfig

    vc = vllm_config(tmp_path)
    try:
        vc.model_config = ModelConfig(model=str(tmp_path / "model"), skip_tokenizer_init=True, dtype="float32",
                                      max_model_len=2048, runner="pooling",
                                      pooler_config=PoolerConfig(seq_pooling_type="MEAN"))
    except TypeError:
        pytest.skip("this vLLM's ModelConfig takes no runner/pooler_config like this")
    assert vc.model_config.is_prefix_caching_supported is False
    conn = KVortexConnector(vc, KVConnectorRole.SCHEDULER, make_kv_cache_config(64, H_TOTAL))
    toks = [(i * 7) % 900 + 10 for i in range(80)]
    assert conn.scheduler_side._keys(make_request("A", toks), toks) == []
    conn.shutdown()


def test_servers_whose_weights_or_rope_differ_never_share_keys(tmp_path: Path) -> None:
    """Same model files and tokens, other numerics: fp16 instead of fp32 weights, another RoPE
    theta. Their KV differs, so a shared lower tier must never hand one the other's chunks."""
    from vllm.config import ModelConfig

    model = str(write_model_dir(tmp_path / "model"))

    def digest(**kw: object) -> bytes:
        mc = ModelConfig(model=model, skip_tokenizer_init=True, max_model_len=2048, **kw)
        return build_namespace(KVortexConfig(), compat.ModelShape(
            model_id=model, revision="", dtype="float32", num_layers=2, num_kv_heads=2, head_size=16,
            kv_count=2, element_size=4, tp_size=1, block_size=16, variant=compat.numerics(mc))).digest()

    base = digest(dtype="float32")
    assert base == digest(dtype="float32")  # deterministic
    assert len({base, digest(dtype="float16"), digest(dtype="float32", hf_overrides={"rope_theta": 50000.0})}) == 3


def test_fp8_with_scales_each_process_computes_is_refused(tmp_path: Path) -> None:
    """``calculate_kv_scales`` (vLLM 0.15-era): each process derives its own k/v scales, so the
    same stored fp8 bytes would be read back as other numbers after a restart or elsewhere."""
    import torch

    vc = vllm_config(tmp_path)
    vc.cache_config.cache_dtype = "fp8"
    try:
        vc.cache_config.calculate_kv_scales = True
    except (AttributeError, TypeError, ValueError):
        pytest.skip("this vLLM has no calculate_kv_scales")
    refused_by_both_roles(vc, make_kv_cache_config(64, H_TOTAL, torch.uint8), "calculate_kv_scales=True")


def test_an_rswa_cache_is_accepted(tmp_path: Path) -> None:
    """R-SWA keeps every prompt block (only generated tokens' blocks are dropped), and KVortex
    stores prompt chunks only: accepted, unlike plain sliding windows."""
    try:
        from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, RSWASpec
    except ImportError:
        pytest.skip("this vLLM has no R-SWA")
    spec = RSWASpec(block_size=BLOCK, num_kv_heads=H_TOTAL, head_size=D, dtype=DTYPE, rswa_window=32)
    kcc = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layer_names(2), spec)])
    for role in ROLES:
        KVortexConnector(vllm_config(tmp_path), role, kcc).shutdown()


@pytest.mark.parametrize("packed", [{"tokens_per_state": 4}, {"num_head_slots": 2}, {"compress_ratio": 4}])
def test_a_cache_of_compressed_or_packed_states_is_refused(tmp_path: Path, packed: dict[str, Any]) -> None:
    """vLLM's sparse MLA (DeepSeek-V4) keeps one state per 4 tokens (0.33: tokens_per_state; 0.2x:
    compress_ratio); packed head slots are
    not KV heads: a block holds other than one vector per token and head, which every key,
    slot size and copy of KVortex assumes."""
    import dataclasses

    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec, MLAAttentionSpec

    if not {f.name for f in dataclasses.fields(MLAAttentionSpec)} >= set(packed):
        pytest.skip(f"this vLLM's MLAAttentionSpec has no {', '.join(packed)}")
    spec = MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=576, dtype=DTYPE, **packed)
    kcc = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(layer_names(2), spec)])
    refused_by_both_roles(vllm_config(tmp_path), kcc, f"MLAAttentionSpec\\) stores .*{next(iter(packed))}")
