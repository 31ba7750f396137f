"""KVortexConnector against a real vLLM Scheduler on CPU (fake model, real KV tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from vllm_harness import BLOCK, Harness, build

pytestmark = pytest.mark.vllm

CHUNK = 32


def prompt(seed: int, n: int) -> list[int]:
    return [(seed * 131 + i * 7) % 900 + 10 for i in range(n)]


def first_step_of(h: Harness, req_id: str) -> int:
    return next(i for i, s in enumerate(h.history) if req_id in s.scheduled)


def assert_kv(h: Harness, req_id: str, tokens: list[int], upto: int) -> None:
    for w in h.workers:
        got = h.kv_of(req_id, range(upto), w)
        want = h.expected_of(tokens, range(upto), w)
        assert torch.equal(got, want), f"rank {w.rank}: KV of {req_id} differs from the model's"


def build_fp8(tmp_path: Path, cache_dtype: str) -> Harness:
    """``build`` with a one-byte KV cache dtype; skips where vLLM's CPU backend refuses it (0.15
    allows fp8 KV only without chunked prefill and prefix caching, which the harness uses)."""
    try:
        return build(tmp_path, cache_dtype=cache_dtype)
    except RuntimeError as exc:
        if "FP8 KV cache" in str(exc):
            pytest.skip(f"this vLLM's CPU backend: {exc}")
        raise


def save_a(h: Harness, a: list[int]) -> None:
    h.add("A", a)
    h.run()
    assert "A" in h.finished
    h.scrub()  # every block reused since: only a real load can bring A's KV back


def test_b_loads_a_prefix_byte_exact_and_skips_exactly_the_loaded_tokens(tmp_path: Path) -> None:
    h = build(tmp_path)
    a = prompt(1, 80)
    save_a(h, a)
    assert sum(s.saves for s in h.history) == 2  # two whole chunks; the 16-token tail is not stored
    b = a[:70] + prompt(2, 14)
    h.add("B", b)
    step = h.step()
    assert step.loads == 2
    assert step.computed_before["B"] == 2 * CHUNK
    assert step.scheduled["B"] == len(b) - 2 * CHUNK
    assert h.computed_positions["B"][0] == 2 * CHUNK
    assert_kv(h, "B", b, 2 * CHUNK)
    h.run()
    assert "B" in h.finished


@pytest.mark.parametrize("sampling", [{"prompt_logprobs": 1}, {"skip_reading_prefix_cache": True}],
                         ids=["prompt-logprobs", "explicit"])
def test_a_request_that_must_not_read_cached_kv_loads_nothing(tmp_path: Path, sampling: dict) -> None:
    """Prompt logprobs need a forward over every prompt token, so vLLM sets the request's
    skip_reading_prefix_cache. vLLM 0.33 zeroes the connector's answer for it; 0.15 and 0.26 do
    not, and the prefix was loaded: the prompt logprobs then began after it (a red-team finding)."""
    from vllm.sampling_params import SamplingParams

    try:
        SamplingParams(max_tokens=1, **sampling)
    except TypeError:
        pytest.skip(f"this vLLM's SamplingParams takes no {sampling}")
    h = build(tmp_path)
    a = prompt(4, 80)
    save_a(h, a)
    n = len(h.history)
    h.add("B", a[:70], sampling=sampling)
    h.run()
    assert "B" in h.finished
    assert not any(s.loads for s in h.history[n:]), "a request that skips cached KV got a load"
    assert h.computed_positions["B"][0] == 0, "the whole prompt must be computed"


def test_loaded_bytes_equal_the_saved_requests_bytes(tmp_path: Path) -> None:
    h = build(tmp_path)
    a = prompt(3, 70)
    h.add("A", a)
    h.step()
    a_bytes = h.kv_of("A", range(2 * CHUNK)).clone()
    h.run()
    h.scrub()
    h.add("B", a[:66])
    h.step()
    b_bytes = h.kv_of("B", range(2 * CHUNK))
    assert a_bytes.numpy().tobytes() == b_bytes.numpy().tobytes()


def test_full_hit_never_claims_the_last_prompt_token(tmp_path: Path) -> None:
    h = build(tmp_path)
    a = prompt(4, 2 * CHUNK)
    save_a(h, a)
    h.add("B", list(a))  # exactly the two stored chunks
    step = h.step()
    assert step.loads == 1, "the second chunk would cover the last token: vLLM must compute it"
    assert step.computed_before["B"] == CHUNK
    assert step.scheduled["B"] == CHUNK
    assert_kv(h, "B", a, len(a))


def test_only_whole_chunks_are_counted(tmp_path: Path) -> None:
    h = build(tmp_path)
    a = prompt(5, 80)
    save_a(h, a)
    b = a[:50] + prompt(6, 30)  # shares chunk 0 and 18 tokens of chunk 1
    h.add("B", b)
    step = h.step()
    assert step.loads == 1 and step.computed_before["B"] == CHUNK
    assert_kv(h, "B", b, len(b))


def test_no_match_loads_nothing(tmp_path: Path) -> None:
    h = build(tmp_path)
    save_a(h, prompt(7, 80))
    h.add("B", prompt(8, 80))
    step = h.step()
    assert step.loads == 0 and step.computed_before["B"] == 0


def test_local_prefix_hit_inside_a_chunk_loads_only_the_missing_blocks(tmp_path: Path) -> None:
    h = build(tmp_path, {"chunk_tokens": 64}, prefix_caching=True)
    p = prompt(9, 100)
    h.add("A", p[:80])
    h.run()
    assert h.scheduler.reset_prefix_cache()
    h.scrub()
    h.add("R", p[:40])  # vLLM's own prefix cache now holds blocks 0-1 (32 tokens)
    h.run()
    h.add("B", p[:90])
    step = h.step()
    assert step.loads == 1
    assert step.computed_before["B"] == 64
    assert_kv(h, "B", p, 64)


def test_save_keeps_blocks_until_workers_report_it_done(tmp_path: Path) -> None:
    h = build(tmp_path)
    h.add("A", prompt(10, 70))
    h.step()  # computes the whole prompt, saves two chunks, samples the only token
    assert "A" in h.finished
    before = h.free_blocks()
    step = h.step()  # the plan tells workers to report A's saves; only then are blocks freed
    assert step.finished_sending == {"A"}
    assert h.free_blocks() > before
    assert not h.scheduler.has_requests()


def test_request_without_saves_frees_its_blocks_at_once(tmp_path: Path) -> None:
    h = build(tmp_path)
    h.add("A", prompt(11, 20))  # shorter than a chunk: nothing to save
    h.run()
    assert all(not s.finished_sending for s in h.history)
    assert h.free_blocks() == h.scheduler.kv_cache_manager.block_pool.num_gpu_blocks - 1


def test_abort_releases_everything(tmp_path: Path) -> None:
    h = build(tmp_path, max_batched=32)  # chunked prefill: one chunk per step
    total = h.free_blocks()
    h.add("A", prompt(12, 100), max_tokens=20)
    h.step()
    h.step()
    h.abort("A")
    h.run()
    assert h.free_blocks() == total
    assert any(s.finished_sending == {"A"} for s in h.history), "A's started saves were awaited"
    assert_no_leaks(h)


def test_a_request_aborted_while_a_batch_of_it_is_in_flight_is_freed_once_its_saves_are_done(
    tmp_path: Path,
) -> None:
    """Asynchronous scheduling: A is aborted while its decode batch is in flight; vLLM 0.15
    finishes it again when that batch returns. The connector answered False the second time,
    vLLM freed A, and the workers' report of A's saves tripped vLLM's scheduler (an assertion:
    the engine died; found by fuzzing). Now every answer for A is True until its saves are done."""
    h = build(tmp_path, async_scheduling=True)
    total = h.free_blocks()
    h.add("A", prompt(31, 100), max_tokens=2)
    h.step()  # A's prefill in flight, its saves planned
    h.step()  # A's decode in flight; the prefill's output processed
    h.abort("A")
    h.run()
    assert h.free_blocks() == total
    assert any(s.finished_sending == {"A"} for s in h.history), "A's saves were awaited"
    assert not h.connector.scheduler_side._saving
    assert_no_leaks(h)


def assert_no_leaks(h: Harness) -> None:
    for _ in range(3):  # load pins outlive their step by design (async scheduling)
        h.step()
    side = h.connector.scheduler_side
    assert not side.index.open_pins()
    assert not side._requests
    for w in h.workers:
        assert not w.connector.worker_side._pending


def test_preemption_releases_and_the_request_resumes_from_the_cache(tmp_path: Path) -> None:
    h = build(tmp_path, num_blocks=14, max_batched=256)
    prompts = {"P": prompt(13, 96), "Q": prompt(14, 96)}
    for r, p in prompts.items():
        h.add(r, p, max_tokens=40)
    h.run(400)
    assert {"P", "Q"} <= h.finished
    victims = set().union(*(s.preempted for s in h.history))
    assert victims, "the test needs a preemption"
    after = next(i for i, s in enumerate(h.history) if s.preempted)
    assert any(s.loads for s in h.history[after:]), "a preempted request comes back through a load"
    assert h.free_blocks() == 13
    for r in victims:
        assert_kv(h, r, h.tokens[r], 2 * CHUNK)
    assert_no_leaks(h)


def test_eviction_under_capacity_pressure(tmp_path: Path) -> None:
    h = build(tmp_path, {"tiers": {"cpu": {"type": "cpu", "capacity": "64KiB"}}})
    side = h.connector.scheduler_side
    slots = side.geometry.num_slots
    assert 2 <= slots < 8
    prompts = [prompt(20 + i, 2 * CHUNK + 1) for i in range(slots + 2)]
    for i, p in enumerate(prompts):
        h.add(f"R{i}", p)
        h.run()
    assert side.index.used <= side.geometry.capacity_bytes
    old_keys = h.keys_of(prompts[0])
    assert not any(k in side.index for k in old_keys), "the oldest chunks must be evicted"
    h.scrub()
    h.add("again", prompts[-1])
    step = h.step()
    assert step.loads == 2
    assert_kv(h, "again", prompts[-1], 2 * CHUNK)
    h.add("old", prompts[0])
    assert h.step().loads == 0


def test_failed_load_is_reported_and_recomputed(tmp_path: Path) -> None:
    h = build(tmp_path)
    a = prompt(30, 80)
    save_a(h, a)
    key1 = h.keys_of(a)[1]
    slot = h.slot_of(key1)
    h.workers[0].connector.worker_side.pool.view(slot)[100] ^= 0xFF  # corrupt chunk 1's header
    h.add("B", a[:75])
    step = h.step()
    assert step.invalid_blocks, "the corrupted chunk's blocks must be reported"
    assert key1 not in h.connector.scheduler_side.index, "a failed chunk is forgotten"
    h.run()
    assert "B" in h.finished
    assert set(range(CHUNK, 2 * CHUNK)) <= set(h.computed_positions["B"]), "vLLM recomputed chunk 1"
    assert_kv(h, "B", a, 2 * CHUNK)
    assert key1 in h.connector.scheduler_side.index, "the recomputed chunk is saved again"


def test_tensor_parallel_two_ranks(tmp_path: Path) -> None:
    h = build(tmp_path, tp=2)
    assert [w.connector.worker_side.rank for w in h.workers] == [0, 1]
    a = prompt(40, 80)
    save_a(h, a)
    h.add("B", a[:70])
    assert h.step().loads == 2
    assert_kv(h, "B", a, 2 * CHUNK)  # each rank holds its own head shard


def test_tensor_parallel_chunk_missing_on_one_rank_is_not_loaded(tmp_path: Path) -> None:
    h = build(tmp_path, tp=2)
    a = prompt(41, 80)
    save_a(h, a)
    slot = h.slot_of(h.keys_of(a)[0])
    h.workers[1].connector.worker_side.pool.view(slot)[:8].zero_()  # rank 1 lost chunk 0
    h.add("B", a[:70])
    step = h.step()
    assert step.invalid_blocks
    h.run()
    assert_kv(h, "B", a, 2 * CHUNK)
    assert set(range(CHUNK)) <= set(h.computed_positions["B"])


def test_requires_kv_delivery_so_vllm_drops_a_preempted_requests_in_flight_output(tmp_path: Path) -> None:
    """vLLM 0.33 drops (rather than delivers) the in-flight output of a request it preempts
    under asynchronous scheduling only for connectors that require KV delivery; that output
    may have been computed over a load that failed (see test_lower_tiers)."""
    h = build(tmp_path, async_scheduling=True)
    assert h.connector.requires_kv_delivery is True
    if hasattr(h.scheduler, "requires_kv_delivery"):  # vLLM 0.33: what schedule() preempts with
        assert h.scheduler.requires_kv_delivery is True


def test_extra_config_wins_over_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVORTEX_CHUNK_TOKENS", "64")
    monkeypatch.setenv("KVORTEX_SALT", "tenant-a")
    h = build(tmp_path, {"chunk_tokens": 32})
    cfg = h.connector.kv_config
    assert cfg.chunk_tokens == 32 and cfg.salt == "tenant-a"


def test_piecewise_graphs_follow_layerwise_from_every_config_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM asks the connector class whether it needs piecewise CUDA graphs; only the extra
    config was read, so layerwise=false from the environment still asked for them (a red-team
    finding). The extra config still wins over the environment."""
    from kvortex_vllm.connector import KVortexConnector

    ask = KVortexConnector.requires_piecewise_for_cudagraph
    monkeypatch.delenv("KVORTEX_TRANSFER__LAYERWISE", raising=False)
    assert ask({}) is True
    assert ask({"transfer": {"layerwise": False}}) is False
    monkeypatch.setenv("KVORTEX_TRANSFER__LAYERWISE", "false")
    assert ask({}) is False
    assert ask({"transfer": {"layerwise": True}}) is True
    assert ask({"chunk_tokens": -1}) is True  # a bad config: the safe answer


def test_bad_chunk_tokens_is_a_clear_error(tmp_path: Path) -> None:
    from kvortex_core.errors import ConfigError

    with pytest.raises(ConfigError, match="multiple of the engine's block_size=16"):
        build(tmp_path, {"chunk_tokens": 40})


def test_metrics_show_hits_saves_and_loads(tmp_path: Path) -> None:
    import urllib.request

    h = build(tmp_path, {"metrics": {"enabled": True, "port": 0}})
    a = prompt(50, 80)
    save_a(h, a)
    h.add("B", a[:70])
    h.run()
    for conn in (h.connector, h.workers[0].connector):
        exporter = conn._metrics
        assert exporter is not None
        text = urllib.request.urlopen(exporter.url, timeout=10).read().decode()
        assert "kvortex" in text
    sched = h.connector.stats.snapshot()
    worker = h.workers[0].connector.stats.snapshot()
    assert sched.counter("hit_tokens") == 2 * CHUNK
    assert worker.counter("bytes_saved", "cpu") > 0 and worker.counter("bytes_loaded", "cpu") > 0
    for conn in (h.connector, *(w.connector for w in h.workers)):
        conn.shutdown()


def test_a_request_asked_about_again_counts_as_one_lookup(tmp_path: Path) -> None:
    """vLLM asks get_num_new_matched_tokens again each step a request waits for blocks."""
    h = build(tmp_path)
    a = prompt(51, 80)
    save_a(h, a)
    side = h.connector.scheduler_side
    before = h.connector.stats.snapshot()

    class Waiting:
        request_id = "waiting"
        prompt_token_ids = a[:70]

    for _ in range(5):
        assert side.get_num_new_matched_tokens(Waiting, 0) == (2 * CHUNK, False)
    after = h.connector.stats.snapshot()
    assert after.counter("lookups") - before.counter("lookups") == 1
    assert after.counter("hit_tokens") - before.counter("hit_tokens") == 2 * CHUNK
    side._forget("waiting")
    h.close()


def test_vllm_015_cross_layer_registration(tmp_path: Path) -> None:
    """0.15-era vLLM hands one cross-layer tensor to register_cross_layers_kv_cache."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    if not hasattr(KVConnectorBase_V1, "register_cross_layers_kv_cache"):
        pytest.skip("this vLLM has no cross-layer registration (0.30+ unified layouts instead)")
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    if tuple(FlashAttentionBackend.get_kv_cache_shape(4, BLOCK, 1, 8))[:2] != (2, 4):
        pytest.skip("vLLM 0.23+: its cross-layer tensor (allocated by vLLM) is what every harness test registers")
    from vllm_harness import DTYPE, H_TOTAL, D, L
    from vllm_kv_alloc import cross_layer_v015

    h = build(tmp_path)
    w = h.workers[0]
    with set_current_vllm_config(h.vllm_config):
        phys, order, write, read = cross_layer_v015(L, 64, BLOCK, H_TOTAL, D, DTYPE)
        assert tuple(FlashAttentionBackend.get_kv_cache_stride_order(include_num_layers_dimension=True)) == order
        assert w.connector.prefer_cross_layer_blocks
        w.connector.register_cross_layers_kv_cache(phys, FlashAttentionBackend)
    assert w.connector.worker_side.layout.num_layers == L
    w.write, w.read = write, read
    w.caches = dict(zip(w.connector.worker_side.layer_index, [phys] * L, strict=True))
    a = prompt(60, 80)
    h.add("A", a)
    h.run()
    phys.fill_(-7.0)  # every block reused since
    h.add("B", a[:70])
    assert h.step().loads == 2
    assert_kv(h, "B", a, 2 * CHUNK)


@pytest.mark.parametrize("cache_dtype", ["fp8", "fp8_e5m2"])
def test_fp8_kv_cache_allocated_as_bytes_saves_and_loads_byte_exact(tmp_path: Path, cache_dtype: str) -> None:
    """``--kv-cache-dtype fp8`` makes vLLM allocate uint8 KV tensors (its kernels view them as
    fp8): the connector registers them, keys them as fp8 of the right kind, and a later request
    loads the saved fp8 bytes exactly."""
    h = build_fp8(tmp_path, cache_dtype)
    w = h.workers[0]
    assert all(t.dtype == torch.uint8 for t in w.caches.values())
    want = torch.float8_e5m2 if cache_dtype == "fp8_e5m2" else torch.float8_e4m3fn
    assert w.connector.worker_side.layout.dtype == want
    a = prompt(21, 80)
    save_a(h, a)
    b = a[:70] + prompt(22, 14)
    h.add("B", b)
    step = h.step()
    assert step.loads == 2 and step.computed_before["B"] == 2 * CHUNK
    assert_kv(h, "B", b, 2 * CHUNK)


def test_fp8_kinds_and_the_model_dtype_never_share_keys(tmp_path: Path) -> None:
    """The same prompt under e4m3, e5m2 and the model's own dtype: three key spaces (the bytes
    mean different numbers), so one can never load another's KV."""
    keys = {}
    for cache_dtype in ("auto", "fp8", "fp8_e5m2"):
        h = build_fp8(tmp_path / cache_dtype, cache_dtype)
        keys[cache_dtype] = h.keys_of(prompt(5, 64))[0]
    assert len(set(keys.values())) == 3


@pytest.mark.parametrize("cache_dtype", ["fp8_ds_mla", "int8_per_token_head"])
def test_kv_cache_dtypes_that_pack_scales_are_a_clear_error(tmp_path: Path, cache_dtype: str) -> None:
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    from kvortex_core.errors import ConfigError

    if cache_dtype not in STR_DTYPE_TO_TORCH_DTYPE:
        pytest.skip(f"this vLLM has no --kv-cache-dtype {cache_dtype}")
    with pytest.raises(ConfigError, match=f"kv-cache-dtype '{cache_dtype}' is not supported by KVortex"):
        build_fp8(tmp_path, cache_dtype)


def test_a_cache_salt_keeps_requests_of_other_salts_from_loading(tmp_path: Path) -> None:
    """vLLM's per-request ``cache_salt`` isolates prefix caches between tenants: a request of one
    salt never loads chunks another salt saved; the same salt does, byte-exact."""
    h = build(tmp_path)
    a = prompt(31, 80)
    h.add("A", a, cache_salt="tenant-1")
    h.run()
    h.scrub()
    h.add("B", a[:70], cache_salt="tenant-2")
    assert h.step().loads == 0
    h.add("C", a[:70])  # no salt: another key space too
    assert h.step().loads == 0
    h.add("D", a[:70], cache_salt="tenant-1")
    step = h.step()
    assert step.loads == 2 and step.computed_before["D"] == 2 * CHUNK
    assert_kv(h, "D", a[:70], 2 * CHUNK)


def test_lora_adapters_and_multimodal_items_get_keys_of_their_own(tmp_path: Path) -> None:
    """The KV of a prompt depends on the LoRA adapter (name and weights path) and on the content
    behind multimodal placeholder tokens (the same token ids for any image): keys differ exactly
    where the KV does, on vLLM's own request objects."""
    from vllm.lora.request import LoRARequest
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
    from vllm_harness import make_request

    h = build(tmp_path)
    side = h.connector.scheduler_side
    toks = prompt(41, 4 * CHUNK)

    def keys(req_id: str, **extra: object) -> list[bytes]:
        return side._keys(make_request(req_id, toks, **extra), toks)

    def image(ident: str, offset: int, length: int = 20) -> list[MultiModalFeatureSpec]:
        return [MultiModalFeatureSpec(data=None, modality="image", identifier=ident,
                                      mm_position=PlaceholderRange(offset=offset, length=length))]

    plain = keys("p")
    assert plain == side.hasher.keys(toks)  # nothing extra: the plain chain
    lora_a = keys("a", lora_request=LoRARequest("sql", 1, "/adapters/sql"))
    assert lora_a == keys("a2", lora_request=LoRARequest("sql", 7, "/adapters/sql"))  # the id is a server's
    assert len({lora_a[0], plain[0], keys("b", lora_request=LoRARequest("sql", 1, "/adapters/sql-v2"))[0],
                keys("c", lora_request=LoRARequest("chat", 1, "/adapters/sql"))[0]}) == 4
    img1 = keys("i1", mm_features=image("img-1", CHUNK + 5))
    img2 = keys("i2", mm_features=image("img-2", CHUNK + 5))
    moved = keys("i3", mm_features=image("img-1", CHUNK + 6))
    assert img1[0] == img2[0] == plain[0]  # before the image: the same KV, the same key
    assert len({img1[1], img2[1], moved[1], plain[1]}) == 4  # the image's chunk, and every later one
    assert img1[3] != img2[3] and img1[3] != plain[3]
    spanning = keys("i4", mm_features=image("img-1", CHUNK - 4, 10))  # placeholders over two chunks
    assert spanning[0] != plain[0] and spanning[1] != plain[1]


def test_a_cache_reset_forgets_every_stored_chunk(tmp_path: Path) -> None:
    """vLLM resets the connector's cache after a weight update (pause with clear_cache, sleep,
    reset_prefix_cache with the connector): nothing stored before may be loaded again. A request
    preempted by the reset starts over (new weights: it loads nothing old, and saves again);
    later requests cache as usual, byte-exact."""
    h = build(tmp_path, max_batched=48)
    a = prompt(51, 80)
    save_a(h, a)
    h.add("W", prompt(52, 80))
    first = h.step()  # W is mid-prefill across the reset: its first chunk holds the old weights' KV
    assert first.scheduled["W"] == 48 and first.saves == 1
    # what a weight update does while requests run: preempt them (they recompute) and reset
    assert h.scheduler.reset_prefix_cache(reset_running_requests=True, reset_connector=True) is True
    assert len(h.connector.scheduler_side.index) <= 1  # W's chunk may still be pinned by its save
    resumed = h.step()
    assert resumed.loads == 0 and resumed.computed_before["W"] == 0  # not its own old chunk
    h.run()
    assert "W" in h.finished
    assert sum(s.saves for s in h.history) == 2 + 1 + 2  # A's two chunks, W's first, W's two again
    h.add("B", a[:70] + prompt(53, 14))
    step = h.step()
    assert step.loads == 0 and step.computed_before["B"] == 0
    h.run()
    h.scrub()
    h.add("C", a[:70] + prompt(54, 14))  # B saved the prefix again, after the reset
    step = h.step()
    assert step.loads == 2 and step.computed_before["C"] == 2 * CHUNK
    assert_kv(h, "C", a[:70], 2 * CHUNK)


def test_requests_with_prompt_embeddings_are_never_keyed(tmp_path: Path) -> None:
    """Positions fed from prompt embeddings carry one placeholder token id whatever the vectors
    (mixed prompts): such a request neither loads nor saves."""
    from vllm_harness import make_request

    h = build(tmp_path)
    import inspect

    from vllm.v1.request import Request

    params = inspect.signature(Request).parameters  # mixed prompts: vLLM 0.30+
    placeholder = 900
    ids = [11, 12, 13, 14] + [placeholder] * 60 + [20] * 16
    mask = [t != placeholder for t in ids]
    side = h.connector.scheduler_side
    for req_id in ("A", "B"):
        extra = {"prompt_is_token_ids": mask} if "prompt_is_token_ids" in params else {}
        req = make_request(req_id, ids, 1, prompt_embeds=torch.randn(len(ids), 64), **extra)
        assert side._keys(req, ids) == []
        h.tokens[req_id] = ids
        h.scheduler.add_request(req)
        h.run()
    assert sum(s.saves + s.loads for s in h.history) == 0
    assert len(side.index) == 0


def test_a_request_preempted_and_resumed_in_one_step_loads_its_chunks(tmp_path: Path) -> None:
    """``reset_prefix_cache(reset_running_requests=True)`` preempts running requests outside
    schedule(), and the next step both resumes them and reports them preempted: the resumed
    request's planned loads must ship (not be dropped with its old state), byte-exact."""
    h = build(tmp_path, max_batched=80)
    w = prompt(71, 120)
    h.add("W", w, max_tokens=4)
    h.step()
    h.step()  # three chunks of W saved by now
    assert h.scheduler.reset_prefix_cache(reset_running_requests=True) is True
    h.scrub()  # W's blocks were freed: only a load brings its KV back
    step = h.step()
    assert step.loads == 3 and step.computed_before["W"] == 3 * CHUNK
    assert_kv(h, "W", w, 3 * CHUNK)
    h.run()
    assert "W" in h.finished
    assert not h.connector.scheduler_side.index.open_pins()
