"""The worker side without vLLM: plans executed on KV tensors allocated as vLLM 0.15 / 0.33 do.

Runs on CPU everywhere and on CUDA where present (``gpu`` marker), so the GPU box, which has
no vLLM, checks the same code paths: saves and loads byte-exact in every allocation vLLM uses.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from vllm_kv_alloc import Reader, Writer, cross_layer_v015, flash_attn_v015, token_kv, unified_v033

from kvortex_core.config import KVortexConfig
from kvortex_core.control.keys import ChunkHasher, KeyNamespace
from kvortex_vllm.compat import cross_layer_views
from kvortex_vllm.metadata import LoadSpec, SaveSpec, StepPlan, slot_geometry
from kvortex_vllm.worker import WorkerSide

L, H, D, N = 2, 2, 16, 16
CHUNK = 32
BPC = CHUNK // N
NUM_BLOCKS = 24

Alloc = Callable[..., tuple[dict[str, torch.Tensor], Writer, Reader]]


def _cross(hnd: bool) -> Alloc:
    def make(dt: torch.dtype, dev: str) -> tuple[dict[str, torch.Tensor], Writer, Reader]:
        phys, order, write, read = cross_layer_v015(L, NUM_BLOCKS, N, H, D, dt, dev, hnd=hnd)
        views = cross_layer_views(phys, order)  # what register_cross_layers_kv_cache registers
        return {f"layer.{i}": v for i, v in enumerate(views)}, write, read

    return make


ALLOCS: dict[str, Alloc] = {
    "v015_cross_layer_nhd": _cross(False),
    "v015_cross_layer_hnd": _cross(True),
    "v015_flash_attn_nhd": lambda dt, dev: flash_attn_v015(L, NUM_BLOCKS, N, H, D, dt, dev),
    "v015_flash_attn_hnd": lambda dt, dev: flash_attn_v015(L, NUM_BLOCKS, N, H, D, dt, dev, hnd=True),
    "v033_unified_LBNHC": lambda dt, dev: unified_v033(L, NUM_BLOCKS, N, H, D, dt, dev, order="LBNHC"),
    "v033_unified_LBHNC": lambda dt, dev: unified_v033(L, NUM_BLOCKS, N, H, D, dt, dev, order="LBHNC"),
    "v033_unified_BLNHC": lambda dt, dev: unified_v033(L, NUM_BLOCKS, N, H, D, dt, dev, order="BLNHC"),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def config(**kw: Any) -> KVortexConfig:
    return KVortexConfig(chunk_tokens=CHUNK, tiers={"cpu": {"type": "cpu", "capacity": "1MiB"}}, **kw)


def namespace(dtype: torch.dtype) -> KeyNamespace:
    return KeyNamespace("tiny", "", str(dtype).removeprefix("torch."), "LKTHD-kv2", L, H, D)


class Rank:
    """One worker rank with its KV tensors and a tiny fake model that writes known KV."""

    def __init__(self, kind: str, device: str, dtype: torch.dtype = torch.bfloat16,
                 hints: dict[str, Any] | None = None, **cfg: Any) -> None:
        self.caches, self.write, self.read = ALLOCS[kind](dtype, device)
        self.dtype, self.device = dtype, device
        self.ns = namespace(getattr(torch, hints["dtype"]) if hints and "dtype" in hints else dtype)
        self.worker = WorkerSide(config(**cfg), self.ns.digest())
        self.worker.register_kv_caches(self.caches, hints)
        self.step = 0

    def compute(self, tokens: list[int], blocks: list[int]) -> None:
        for pos, tok in enumerate(tokens):
            for layer in range(L):
                if self.dtype == torch.uint8:  # fp8 values in byte tensors, as vLLM keeps --kv-cache-dtype fp8
                    k, v = (x.to(torch.float8_e4m3fn).view(torch.uint8)
                            for x in token_kv(tok, pos, layer, H, D, torch.float32, self.device))
                else:
                    k, v = token_kv(tok, pos, layer, H, D, self.dtype, self.device)
                self.write(layer, blocks[pos // N], pos % N, k, v)

    def kv(self, n: int, blocks: list[int]) -> torch.Tensor:
        out = []
        for pos in range(n):
            for layer in range(L):
                k, v = self.read(layer, blocks[pos // N], pos % N)
                out += [k, v]
        return torch.stack(out)

    def run(self, plan: StepPlan, finished: set[str] | None = None) -> set[str]:
        w = self.worker
        w.bind(plan)
        w.start_load()
        for name in self.caches:
            w.wait_for_layer(name)
        if self.device == "cuda":
            torch.cuda.current_stream().synchronize()
        w.start_save()
        done, _ = w.get_finished(finished or set())
        w.clear()
        return done

    def await_saves(self, req_id: str) -> None:
        """Step until the worker reports ``req_id``'s saves done, as the scheduler waits for it.

        Only then may the saved blocks be reused (on a GPU the copy runs on a side stream).
        """
        done = self.run(self.plan(await_saves=frozenset({req_id})), {req_id})
        for _ in range(10_000):
            if req_id in done:
                return
            time.sleep(0.001)
            done = self.run(self.plan())
        raise AssertionError(f"the saves of {req_id} never completed")

    def close(self) -> None:
        self.worker.shutdown()  # unregisters the pinned pool (CUDA refuses a second registration)

    def plan(self, **kw: Any) -> StepPlan:
        self.step += 1
        return StepPlan(self.step, self.worker.geometry.num_slots, **kw)  # type: ignore[union-attr]


@pytest.fixture
def ranks() -> Iterator[list[Rank]]:
    made: list[Rank] = []
    yield made
    for r in made:
        r.close()


def make(ranks: list[Rank], kind: str, device: str, **cfg: Any) -> Rank:
    ranks.append(Rank(kind, device, **cfg))
    return ranks[-1]


def _roundtrip(r: Rank) -> None:
    """Save three chunks of known KV, zero the cache, load them into other blocks: same bytes."""
    tokens = list(range(100, 100 + 3 * CHUNK))
    keys = ChunkHasher(r.ns, CHUNK).keys(tokens)
    a_blocks = list(range(1, 1 + 3 * BPC))
    r.compute(tokens, a_blocks)
    want = r.kv(3 * CHUNK, a_blocks).clone()
    saves = [SaveSpec("A", slot, keys[slot], tuple(a_blocks[slot * BPC:(slot + 1) * BPC])) for slot in range(3)]
    r.run(r.plan(saves=saves))
    r.await_saves("A")
    for t in r.caches.values():
        t.zero_()
    b_blocks = list(range(NUM_BLOCKS - 3 * BPC, NUM_BLOCKS))
    loads = [LoadSpec("B", slot, keys[slot], tuple(b_blocks[slot * BPC:(slot + 1) * BPC])) for slot in range(3)]
    r.run(r.plan(loads=loads))
    assert not r.worker.take_load_errors()
    got = r.kv(3 * CHUNK, b_blocks)
    assert got.cpu().view(torch.uint8).numpy().tobytes() == want.cpu().view(torch.uint8).numpy().tobytes()
    assert r.worker.counters.saved_chunks == 3 and r.worker.counters.loaded_chunks == 3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", list(ALLOCS))
@pytest.mark.parametrize("layerwise", [True, False])
def test_save_then_load_is_byte_exact(ranks: list[Rank], kind: str, device: str, layerwise: bool) -> None:
    _roundtrip(make(ranks, kind, device, transfer={"layerwise": layerwise}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["v015_flash_attn_nhd", "v015_cross_layer_hnd", "v033_unified_LBNHC"])
def test_fp8_values_in_byte_tensors_save_and_load_byte_exact(ranks: list[Rank], kind: str, device: str) -> None:
    """``--kv-cache-dtype fp8``: vLLM hands uint8 tensors, the connector hints their fp8 kind."""
    r = make(ranks, kind, device, dtype=torch.uint8, hints={"dtype": "float8_e4m3fn"})
    assert r.worker.layout is not None and r.worker.layout.dtype == torch.float8_e4m3fn
    _roundtrip(r)


@pytest.mark.parametrize("device", DEVICES)
def test_skip_blocks_leave_local_blocks_untouched(ranks: list[Rank], device: str) -> None:
    r = make(ranks, "v033_unified_LBNHC", device)
    tokens = list(range(7, 7 + CHUNK))
    key = ChunkHasher(r.ns, CHUNK).keys(tokens)[0]
    r.compute(tokens, [1, 2])
    want = r.kv(CHUNK, [1, 2]).clone()
    r.run(r.plan(saves=[SaveSpec("A", 0, key, (1, 2))]))
    r.compute([999] * N, [5])  # block 5 holds "local" KV the load must not overwrite
    local = r.kv(N, [5]).clone()
    r.run(r.plan(loads=[LoadSpec("B", 0, key, (5, 6), skip_blocks=1)]))
    assert torch.equal(r.kv(N, [5]), local)
    half = L * 2 * N  # entries per block in kv(): positions x layers x (k, v)
    assert torch.equal(r.kv(CHUNK, [5, 6])[half:], want[half:])


def test_finished_requests_are_reported_only_when_awaited_and_saved(ranks: list[Rank]) -> None:
    r = make(ranks, "v015_flash_attn_nhd", "cpu")
    tokens = list(range(CHUNK))
    key = ChunkHasher(r.ns, CHUNK).keys(tokens)[0]
    r.compute(tokens, [1, 2])
    assert r.run(r.plan(saves=[SaveSpec("A", 0, key, (1, 2))]), {"A"}) == set(), "not awaited yet"
    r.await_saves("A")
    assert r.run(r.plan()) == set(), "reported once"


def test_reused_or_foreign_slot_is_a_load_error(ranks: list[Rank]) -> None:
    r = make(ranks, "v015_flash_attn_nhd", "cpu")
    hasher = ChunkHasher(r.ns, CHUNK)
    k1, k2 = hasher.keys(list(range(CHUNK))) + hasher.keys(list(range(1, CHUNK + 1)))
    r.compute(list(range(CHUNK)), [1, 2])
    r.run(r.plan(saves=[SaveSpec("A", 0, k1, (1, 2))]))
    r.run(r.plan(loads=[LoadSpec("B", 0, k2, (3, 4)), LoadSpec("B", 1, k1, (5, 6))]))
    assert r.worker.take_load_errors() == {3, 4, 5, 6}, "the wrong chunk and everything after it"
    r.run(r.plan(loads=[LoadSpec("C", -1, k1, (7, 8), skip_blocks=1)]))
    assert r.worker.take_load_errors() == {8}


def test_plan_from_a_differently_configured_scheduler_is_refused(ranks: list[Rank]) -> None:
    r = make(ranks, "v015_flash_attn_nhd", "cpu")
    with pytest.raises(Exception, match="same config"):
        r.worker.bind(StepPlan(1, r.worker.geometry.num_slots + 1))  # type: ignore[union-attr]


def test_geometry_matches_between_scheduler_and_worker(ranks: list[Rank]) -> None:
    r = make(ranks, "v033_unified_BLNHC", "cpu")
    chunk_bytes = L * 2 * CHUNK * H * D * 2
    assert slot_geometry(config(), chunk_bytes, 1) == r.worker.geometry


def test_importing_kvortex_never_imports_vllm() -> None:
    code = ("import sys, kvortex_core, kvortex_vllm, kvortex_vllm.worker, kvortex_vllm.scheduler, "
            "kvortex_vllm.metadata, kvortex_vllm.compat, kvortex_vllm.startup; "
            "assert 'vllm' not in sys.modules, 'vllm was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
